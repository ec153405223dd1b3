"""The ingest pipeline: reader (walk + stat against the database) -> decoder (worker processes:
read, hash, decode, transform) -> encoder (batches) -> writer (one transaction per batch, then the
index).

Each batch is committed before the next is embedded, so an interrupted run loses at most the batch
in flight and a rerun picks up where it stopped: files whose size and mtime match the database are
not even opened.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import time
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from engine.atomic import write_atomic
from engine.errors import EngineError
from engine.files import find_images
from engine.index import VectorIndex
from engine.faults import fault_point
from engine.loader import Batch, ImageFileDataset, decode_batches
from engine.preprocess import build_transform, draft_size_for, image_suffixes

if TYPE_CHECKING:
    from db.store import PathState
    from engine.encoder import Encoder
    from engine.library import Library
    from engine.progress import ProgressFn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestConfig:
    """batch_size: images per forward pass and per commit; workers: decode processes (None = one per
    four cores, at least one); exclude: globs on names or paths; prune: forget indexed files under
    the given roots that are gone from disk; save_every_s: how often the index file is rewritten
    during a run (the database is committed every batch regardless)."""

    batch_size: int = 32
    workers: int | None = None
    exclude: tuple[str, ...] = ()
    prune: bool = False
    save_every_s: float = 120.0


@dataclass
class StageSeconds:
    """Wall seconds an ingest spent in each stage, so the cost of everything around the model is
    a figure of every run. The stages never overlap, so they add up to at most the total.

    model: load (or first build) the encoder; walk: find the files; plan: stat them and look them
    up in the database; decode: wait for the decode workers (read, hash, decode, transform);
    embed: the forward passes; commit: classify and write each batch to the database (and
    ``--prune``'s deletions, and the failure report); index: open, add to, remove from and save
    the vector index.
    """

    model: float = 0.0
    walk: float = 0.0
    plan: float = 0.0
    decode: float = 0.0
    embed: float = 0.0
    commit: float = 0.0
    index: float = 0.0

    @contextlib.contextmanager
    def timing(self, stage: str) -> Iterator[None]:
        """Add the seconds spent in the ``with`` block to ``stage``."""
        started = time.perf_counter()
        try:
            yield
        finally:
            setattr(self, stage, getattr(self, stage) + time.perf_counter() - started)

    def to_dict(self) -> dict[str, float]:
        return {f.name: round(getattr(self, f.name), 4) for f in fields(self)}


@dataclass
class IngestReport:
    """What an ingest did. failed: (path, reason) for each file that could not be indexed;
    embedded: images that went through the model; seconds: wall time of the whole call, split
    by stage in ``stages``."""

    added: int = 0
    unchanged: int = 0
    updated: int = 0
    duplicates: int = 0
    removed: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    embedded: int = 0
    seconds: float = 0.0
    stages: StageSeconds = field(default_factory=StageSeconds)
    report_path: str | None = None

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    @property
    def embed_share(self) -> float:
        """The model's share of the wall time (1.0 would mean ingest costs no more than the bare
        model); 0.0 when nothing was embedded."""
        return self.stages.embed / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (what ``engine ingest --json`` prints); ``stages`` holds the seconds
        per stage (see StageSeconds)."""
        return {"added": self.added, "unchanged": self.unchanged, "updated": self.updated,
                "duplicates": self.duplicates, "failed": len(self.failed), "removed": self.removed,
                "failures": [{"path": p, "reason": r} for p, r in self.failed],
                "embedded": self.embedded, "seconds": round(self.seconds, 3),
                "images_per_second": round(self.images_per_second, 2), "stages": self.stages.to_dict(),
                "embed_share": round(self.embed_share, 3), "report": self.report_path}


def _write_failures(path: str | os.PathLike, failed: Sequence[tuple[str, str]]) -> None:
    lines = ["path\treason\n"] + [f"{p}\t{reason}\n" for p, reason in failed]
    write_atomic(path, "".join(lines).encode("utf-8", "backslashreplace"))


def _plan(library: Library, files: Sequence[str], report: IngestReport) -> tuple[list[str], dict[str, PathState]]:
    """Split discovered files into those to decode and those unchanged since the last run (counted
    in ``report``); also returns what the database knew of each known path."""
    known = library.store.lookup_paths(files)
    todo: list[str] = []
    for path in files:
        try:
            st = os.stat(path)
        except OSError as exc:
            report.failed.append((path, f"cannot stat: {exc.strerror or exc}"))
            continue
        if not stat.S_ISREG(st.st_mode):  # a fifo or device named like an image would block or never end
            report.failed.append((path, "not a regular file"))
            continue
        state = known.get(path)
        if state is not None and state.bytes == st.st_size and state.mtime == st.st_mtime:
            report.unchanged += 1
        else:
            todo.append(path)
    return todo, known


@dataclass
class _BatchPlan:
    """What one batch does to the database: rows to insert (and which batch positions to embed
    for them), paths whose content changed, aliases of known content, files only touched."""

    new_rows: list[dict] = field(default_factory=list)
    embed_rows: list[int] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    aliases: list[dict] = field(default_factory=list)
    touched: list[tuple[bool, str, float]] = field(default_factory=list)


def _classify(library: Library, batch: Batch, known: dict[str, PathState], report: IngestReport) -> _BatchPlan:
    """Sort a decoded batch's files into new, changed, duplicate and touched, counting them in
    ``report``."""
    plan = _BatchPlan()
    stored = library.store.lookup_hashes(it.content_hash for it in batch.items if it.content_hash)
    batch_hashes: dict[str, int] = {}
    for position, it in enumerate(batch.items):
        state = known.get(it.path)
        if state is not None and state.content_hash == it.content_hash:
            plan.touched.append((state.is_alias, it.path, it.mtime))  # touched, not changed
            report.unchanged += 1
            continue
        if state is not None:
            plan.replaced.append(it.path)
            report.updated += 1
        alias = {"path": it.path, "bytes": it.size, "mtime": it.mtime}
        if it.content_hash in stored and state is None:
            plan.aliases.append(dict(alias, image_id=stored[it.content_hash]))
            report.duplicates += 1
        elif it.content_hash in batch_hashes:
            plan.aliases.append(dict(alias, new_row=batch_hashes[it.content_hash]))
            report.duplicates += state is None
        else:
            batch_hashes[it.content_hash] = len(plan.new_rows)
            info = it.info
            plan.new_rows.append({"path": it.path, "content_hash": it.content_hash, "bytes": it.size,
                                  "mtime": it.mtime, "width": info.width, "height": info.height, "format": info.format,
                                  "taken_at": info.taken_at, "camera": info.camera[:128] if info.camera else None})
            plan.embed_rows.append(position)
            report.added += state is None
    return plan


def _commit_batch(library: Library, index: VectorIndex, encoder: Encoder, batch: Batch,
                  known: dict[str, PathState], report: IngestReport) -> None:
    """Classify one decoded batch, embed what is new, commit rows + vectors, update the index."""
    report.failed.extend((it.path, it.error or "unknown error") for it in batch.failures)
    if not batch.items or batch.images is None:
        return
    stages = report.stages
    with stages.timing("commit"):
        plan = _classify(library, batch, known, report)
    with stages.timing("embed"):
        vectors = encoder.embed(batch.images[plan.embed_rows]) if plan.embed_rows else None
    fault_point("batch-embedded")
    with stages.timing("commit"):
        ids, gone = library.store.write_batch(plan.new_rows, vectors, replaced_paths=plan.replaced,
                                              aliases=plan.aliases, touched=plan.touched)
    fault_point("batch-committed")
    report.embedded += len(ids)
    with stages.timing("index"):
        if gone:
            _remove_from_index(library, index, gone)
        if ids and vectors is not None:
            if not index.is_trained:
                index.train(vectors)
            index.add(vectors, np.asarray(ids, np.int64))


def _remove_from_index(library: Library, index: VectorIndex, ids: Sequence[int]) -> None:
    if index.supports_removal:
        index.remove(ids)
    else:  # index types without removal (HNSW): reconcile rebuilds it
        library.reconcile(index)


def _open_or_build_index(library: Library, encoder: Encoder) -> VectorIndex:
    index = library.open_index(required=False)
    if index is None or index.ntotal == 0 and not index.is_trained:
        index = VectorIndex.build(encoder.dim, "Flat")  # IVF/PQ need data to train: start exact
    return index


def ingest_paths(library: Library, roots: Sequence[str | os.PathLike], config: IngestConfig = IngestConfig(), *,
                 model: str | None = None, progress: ProgressFn | None = None,
                 on_wait: Callable[[], None] | None = None) -> IngestReport:
    """Index every image under ``roots`` into ``library``; returns the report.

    model: ``pretrained`` or a checkpoint path; chooses the encoder of a new library and must match
    the encoder of an existing one. progress(done, total) is called as files are processed (total:
    every image found, unchanged ones counted done at once). on_wait: called when another writer
    holds the library and this call waits for it.
    Never raises for a bad file: each one is reported in ``report.failed`` and in the library's
    failure report file. Raises EngineError when the library itself cannot be used.
    """
    started = time.perf_counter()
    report = IngestReport()
    stages = report.stages
    with library.write_lock(on_wait):
        with stages.timing("model"):
            encoder = library.ensure_model(model)
        with stages.timing("walk"):
            found = find_images(roots, image_suffixes(), exclude=config.exclude)
        report.failed.extend(found.missing)
        with stages.timing("plan"):
            todo, known = _plan(library, found.files, report)
        with stages.timing("index"):
            index = _open_or_build_index(library, encoder)
        total = len(found.files)
        done = total - len(todo)
        if progress:
            progress(done, total)
        last_save = time.monotonic()
        if todo:
            dataset = ImageFileDataset(todo, build_transform(encoder.data_config), draft_size_for(encoder.data_config),
                                       with_facts=True)
            for batch in _timed(decode_batches(dataset, config.batch_size, config.workers), stages):
                _commit_batch(library, index, encoder, batch, known, report)
                done += len(batch.items) + len(batch.failures)
                if progress:
                    progress(done, total)
                if time.monotonic() - last_save > config.save_every_s:
                    with stages.timing("index"):
                        library.save_index(index)
                    last_save = time.monotonic()
        if config.prune:
            report.removed = _prune(library, index, roots, set(found.files), stages)
        with stages.timing("index"):
            library.save_index(index)
        report.report_path = os.fspath(library.paths.report)
        with stages.timing("commit"):
            _write_failures(library.paths.report, report.failed)
    report.seconds = time.perf_counter() - started
    return report


def _timed(batches: Iterator[Batch], stages: StageSeconds) -> Iterator[Batch]:
    """The loader's batches, adding the time spent waiting for each one to ``stages.decode``
    (with workers, decoding overlaps the model and only the wait is a cost)."""
    while True:
        with stages.timing("decode"):
            batch = next(batches, None)
        if batch is None:
            return
        yield batch


def _under(path: str, roots: Sequence[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def _prune(library: Library, index: VectorIndex, roots: Sequence[str | os.PathLike], present: set[str],
           stages: StageSeconds) -> int:
    """Forget indexed paths under ``roots`` that no longer exist on disk; returns how many."""
    roots_abs = [os.path.abspath(os.fspath(r)) for r in roots]
    with stages.timing("commit"):
        gone_paths = [p for p, _, _ in library.store.iter_paths()
                      if _under(p, roots_abs) and p not in present and not os.path.exists(p)]
        gone_ids = library.store.remove_paths(gone_paths) if gone_paths else []
    if gone_ids:
        with stages.timing("index"):
            _remove_from_index(library, index, gone_ids)
    return len(gone_paths)


def remove_paths(library: Library, paths: Sequence[str | os.PathLike], *,
                 on_wait: Callable[[], None] | None = None) -> int:
    """``engine remove``: forget these files (or every indexed file under these folders); their
    vectors leave the index at once. Returns how many paths were forgotten. on_wait: called when
    another writer holds the library and this call waits for it."""
    wanted = [os.path.abspath(os.fspath(p)) for p in paths]
    with library.write_lock(on_wait):
        index = library.open_index()
        known = [p for p, _, _ in library.store.iter_paths() if _under(p, wanted)]
        if known:
            _remove_from_index(library, index, library.store.remove_paths(known))
            library.save_index(index)
    return len(known)


def reindex_library(library: Library, *, model: str | None = None, factory: str | None = None,
                    config: IngestConfig = IngestConfig(), progress: ProgressFn | None = None,
                    on_wait: Callable[[], None] | None = None) -> dict[str, Any]:
    """``engine reindex``: with ``model``, re-embed every indexed image with that encoder (the
    library then remembers it); with only ``factory``, rebuild the index from stored embeddings
    (no image decoded). progress(done, total) counts re-embedded files. Returns a JSON-ready
    summary: reembedded, failed, vectors, index (factory string), model (dict), seconds."""
    started = time.perf_counter()
    with library.write_lock(on_wait):
        if library.model_info() is None:
            raise EngineError(f"no library in {library.paths.home} to reindex; run `engine ingest PATH` first")
        summary: dict[str, Any] = {"reembedded": 0, "failed": 0}
        if factory:
            library.store.set_meta("index_factory", factory)
        if model is not None:
            encoder = library.set_model(model)
            records = library.store.get_images(library.store.image_ids().tolist())
            ordered = sorted(records.values(), key=lambda r: r.id)
            dataset = ImageFileDataset([r.path for r in ordered], build_transform(encoder.data_config),
                                       draft_size_for(encoder.data_config))
            # Vectors are replaced under the same ids here, so an index holding old ones could never be
            # reconciled by id: it goes first, and a crash from now on leaves only a rebuild to do.
            library.paths.index.unlink(missing_ok=True)
            library.store.clear_embeddings()
            done, lost = 0, []
            for batch in decode_batches(dataset, config.batch_size, config.workers):
                if batch.items:
                    vectors = encoder.embed(batch.images)
                    library.store.put_embeddings([ordered[it.position].id for it in batch.items], vectors)
                    summary["reembedded"] += len(batch.items)
                lost.extend(ordered[it.position].id for it in batch.failures)
                done += len(batch.items) + len(batch.failures)
                if progress:
                    progress(done, len(ordered))
            if lost:  # files that vanished or broke since they were indexed cannot stay without a vector
                library.store.remove_ids(lost)
            summary["failed"] = len(lost)
        index = library.rebuild_index(factory)
        summary.update(vectors=index.ntotal, index=index.factory, model=library.model_info().to_dict(),
                       seconds=round(time.perf_counter() - started, 3))
    return summary
