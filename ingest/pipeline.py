"""The ingest pipeline: reader (walk + stat against the database) -> decoder (worker processes:
read, hash, decode, transform) -> encoder (batches) -> writer (one transaction per batch, then the
index).

Each batch is committed before the next is embedded, so an interrupted run loses at most the batch
in flight and a rerun picks up where it stopped: files whose size and mtime match the database are
not even opened. Before any decoding, what needs no model (touched files, renames as moves, copies
of indexed bytes as aliases) is decided by ``ingest.changes`` and committed in one transaction.
"""

from __future__ import annotations

import bisect
import logging
import os
import stat
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np

from engine.progress import StageClock
from engine.atomic import write_atomic
from engine.errors import EngineError, IndexMissingError
from engine.files import Discovery, find_images, nothing_found_message
from engine.output import printable
from engine.index import VectorIndex
from engine.faults import fault_point
from engine.loader import Batch, ImageFileDataset, decode_batches
from engine.preprocess import build_transform, draft_size_for, image_suffixes
from ingest.changes import Reconciler
from ingest.presence import GONE, probe
from ingest.prune import prune_roots, under, unwalked_roots

if TYPE_CHECKING:
    from db.changes import ChangeSet, StoredFile
    from engine.encoder import Encoder
    from engine.library import Library
    from engine.progress import ProgressFn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestConfig:
    """batch_size: images per forward pass and per commit; workers: decode processes (None = one per
    four cores, at least one); exclude: globs on names or paths; prune: forget indexed files under
    the given roots that are gone from disk; save_every_s: the least time between two saves of
    the index file during a run (longer for a large index, see ``engine.index_growth``; the
    database is committed every batch regardless, and the stored vectors are the journal)."""

    batch_size: int = 32
    workers: int | None = None
    exclude: tuple[str, ...] = ()
    prune: bool = False
    save_every_s: float = 120.0


@dataclass
class StageSeconds(StageClock):
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


@dataclass
class IngestReport:
    """What an ingest did. Each file found counts once: added (new content at a new path), moved
    (a new path holding the bytes of an indexed photo whose file is gone or changed: the photo
    moved there, keeping its id and vector; also an alias that took over from a gone file),
    duplicates (a new path holding indexed bytes: an alias), updated (a known path whose content
    changed), unchanged, or failed: (path, reason) for each file that could not be indexed.
    removed: paths ``--prune`` forgot; prune_kept: (folder, reason, indexed paths kept) for each
    place ``--prune`` refused to forget anything under; unwalked: roots that could not be walked at
    all. embedded: images that went through the model; seconds: wall time of the whole call, split
    by stage in ``stages``."""

    added: int = 0
    unchanged: int = 0
    updated: int = 0
    duplicates: int = 0
    moved: int = 0
    removed: int = 0
    prune_kept: list[tuple[str, str, int]] = field(default_factory=list)
    unwalked: list[str] = field(default_factory=list)
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
                "duplicates": self.duplicates, "moved": self.moved, "failed": len(self.failed),
                "removed": self.removed, "unwalked": list(self.unwalked),
                "prune_kept": [{"path": p, "reason": r, "kept": n} for p, r, n in self.prune_kept],
                "failures": [{"path": p, "reason": r} for p, r in self.failed],
                "embedded": self.embedded, "seconds": round(self.seconds, 3),
                "images_per_second": round(self.images_per_second, 2), "stages": self.stages.to_dict(),
                "embed_share": round(self.embed_share, 3), "report": self.report_path}


def _write_failures(path: str | os.PathLike, failed: Sequence[tuple[str, str]]) -> None:
    """The failures report: UTF-8 TSV, a ``path<TAB>reason`` header, then one line per failed file;
    both fields are written as engine.output.printable makes them (tab, newline, control
    characters, backslash and undecodable bytes escaped), so no field can split a record."""
    lines = ["path\treason\n"] + [f"{printable(p)}\t{printable(reason)}\n" for p, reason in failed]
    write_atomic(path, "".join(lines).encode("utf-8"))


def walk_inputs(library: Library, roots: Sequence[str], config: IngestConfig, stages: StageSeconds) -> Discovery:
    """The image files under ``roots`` (``engine.files.find_images``'s answer), walked first so
    that a mistyped path or an empty folder leaves no library behind: EngineError naming what was
    looked at when nothing is found (an empty walk is fine for ``prune`` on an existing library)."""
    with stages.timing("walk"):
        found = find_images(roots, image_suffixes(), exclude=config.exclude)
    if not found.files and not (config.prune and library.exists()):
        raise EngineError(nothing_found_message(roots, found, image_suffixes()))
    return found


def _stat_files(files: Sequence[str], report: IngestReport) -> tuple[list[str], dict[str, tuple[int, float]]]:
    """The regular files among ``files`` with their (size, mtime); the others are reported."""
    regular: list[str] = []
    seen: dict[str, tuple[int, float]] = {}
    for path in files:
        try:
            st = os.stat(path)
        except OSError as exc:
            report.failed.append((path, f"cannot stat: {exc.strerror or exc}"))
            continue
        if not stat.S_ISREG(st.st_mode):  # a fifo or device named like an image would block or never end
            report.failed.append((path, "not a regular file"))
            continue
        regular.append(path)
        seen[path] = (st.st_size, st.st_mtime)
    return regular, seen


def _plan(library: Library, roots: Sequence[str], files: Sequence[str], report: IngestReport,
          reconciler: Reconciler) -> tuple[ChangeSet, list[str]]:
    """Compare what the walk found with what the library records under ``roots``: the first
    transaction of the run (touches, moves and aliases that need no model) and the files to decode."""
    regular, seen = _stat_files(files, report)
    recorded = library.store.paths_under(roots)
    walked = set(files)
    gone: list[StoredFile] = [state for path, state in recorded.items()
                              if path not in walked and probe(path)[0] == GONE]
    known = {p: recorded[p] for p in regular if p in recorded}
    return reconciler.plan(regular, seen, known, gone)


class Planned(NamedTuple):
    """An ingest under the write lock, planned: the library's encoder, the roots as absolute paths
    (deduplicated), the reconciler of the run, its first transaction (touches, moves and aliases
    that need no model) and the files to decode."""

    encoder: Encoder
    roots: list[str]
    reconciler: Reconciler
    first: ChangeSet
    todo: list[str]


@contextmanager
def planned_ingest(library: Library, roots: Sequence[str | os.PathLike], found: Discovery, report: IngestReport, *,
                   model: str | None, progress: ProgressFn | None,
                   on_wait: Callable[[], None] | None) -> Iterator[Planned]:
    """The start every ingest shares (plain and on Ray): a new library's encoder built before the
    write lock (a model that cannot be built leaves no home or database), then under the lock the
    library's encoder made sure of (``Library.ensure_model``, which also finishes a model switch a
    reindex left), the walk's missing and unwalked roots reported, and the run planned. The lock
    is held for the body of the ``with``."""
    stages = report.stages
    new_model: dict[str, Any] = {}
    if not library.exists():
        if progress:
            progress(0, None)  # the paths are good; the slow part begins (the encoder)
        with stages.timing("model"):
            new_model["encoder"] = library.load_model(model or "pretrained")
    with library.write_lock(on_wait):
        if progress:
            progress(0, None)
        with stages.timing("model"):
            encoder = library.ensure_model(model, **new_model)
        report.failed.extend(found.missing)
        roots_abs = list(dict.fromkeys(os.path.abspath(os.fspath(r)) for r in roots))
        report.unwalked = list(unwalked_roots(roots_abs, found))
        reconciler = Reconciler(library.store, report)
        with stages.timing("plan"):
            first, todo = _plan(library, roots_abs, found.files, report, reconciler)
        yield Planned(encoder, roots_abs, reconciler, first, todo)


def _apply(library: Library, index: VectorIndex, changes: ChangeSet, reconciler: Reconciler,
           report: IngestReport) -> None:
    """Commit ``changes`` (one transaction), then bring the index in line: rows deleted leave it,
    new rows (with ``changes.vectors``) join it; moved rows keep their vectors."""
    stages = report.stages
    with stages.timing("commit"):
        applied = library.store.apply_changes(changes)
        reconciler.committed(applied)
    fault_point("batch-committed")
    report.embedded += len(applied.new_ids)
    with stages.timing("index"):
        if applied.dropped_ids:
            _remove_from_index(library, index, applied.dropped_ids)
        if applied.new_ids and changes.vectors is not None:
            if not index.is_trained:
                index.train(changes.vectors)
            index.add(changes.vectors, np.asarray(applied.new_ids, np.int64))


def _commit_batch(library: Library, index: VectorIndex, encoder: Encoder, batch: Batch,
                  reconciler: Reconciler, report: IngestReport) -> None:
    """Decide what one decoded batch changes, embed its new content, commit, update the index."""
    report.failed.extend((it.path, it.error or "unknown error") for it in batch.failures)
    if not batch.items or batch.images is None:
        return
    stages = report.stages
    with stages.timing("commit"):
        changes, embed = reconciler.resolve(batch.items)
    with stages.timing("embed"):
        changes.vectors = encoder.embed(batch.images[embed]) if embed else None
    fault_point("batch-embedded")
    _apply(library, index, changes, reconciler, report)


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
    failure report file. Raises EngineError when the library itself cannot be used, and when no
    image file was found under ``roots`` (paths that do not exist, folders without images; with
    ``prune`` on an existing library an empty walk is fine): nothing is created then.
    """
    started = time.perf_counter()
    report = IngestReport()
    stages = report.stages
    found = walk_inputs(library, roots, config, stages)
    with planned_ingest(library, roots, found, report, model=model, progress=progress,
                        on_wait=on_wait) as (encoder, roots_abs, reconciler, first, todo):
        with stages.timing("index"):
            index = _open_or_build_index(library, encoder)
        if first:
            _apply(library, index, first, reconciler, report)
        total = len(found.files)
        done = total - len(todo)
        if progress:
            progress(done, total)
        if todo:
            dataset = ImageFileDataset(todo, build_transform(encoder.data_config), draft_size_for(encoder.data_config),
                                       with_facts=True)
            for batch in _timed(decode_batches(dataset, config.batch_size, config.workers), stages):
                _commit_batch(library, index, encoder, batch, reconciler, report)
                done += len(batch.items) + len(batch.failures)
                if progress:
                    progress(done, total)
                with stages.timing("index"):  # a new rung when the library grew into one; a save when due
                    library.update_index(index, synced=True, final=False, min_interval_s=config.save_every_s)
        if config.prune:
            with stages.timing("commit"):
                gone_ids = prune_roots(library, roots_abs, found, report)
            if gone_ids:
                with stages.timing("index"):
                    _remove_from_index(library, index, gone_ids)
        with stages.timing("index"):
            library.update_index(index, synced=True)
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


def _not_indexed(wanted: Sequence[str], known: Sequence[str]) -> list[str]:
    """The paths of ``wanted`` that are neither an indexed file nor a folder holding one."""
    ordered = sorted(known)
    exact = set(known)
    out = []
    for path in wanted:
        prefix = path.rstrip(os.sep) + os.sep
        at = bisect.bisect_left(ordered, prefix)
        if path not in exact and not (at < len(ordered) and ordered[at].startswith(prefix)):
            out.append(path)
    return out


def remove_paths(library: Library, paths: Sequence[str | os.PathLike], *,
                 on_wait: Callable[[], None] | None = None) -> int:
    """``engine remove``: forget these files (or every indexed file under these folders); their
    vectors leave the index at once. Returns how many paths were forgotten. on_wait: called when
    another writer holds the library and this call waits for it. Raises EngineError, forgetting
    nothing, when one of ``paths`` is neither indexed nor a folder holding an indexed file."""
    wanted = [os.path.abspath(os.fspath(p)) for p in paths]
    if not library.exists():  # nothing to forget: and no home or database is created for nothing
        raise IndexMissingError(f"no library in {library.paths.home} yet; run `engine ingest PATH` first")
    with library.write_lock(on_wait):
        index = library.open_index()
        known = [p for p, _, _ in library.store.iter_paths() if under(p, wanted)]
        missing = _not_indexed(wanted, known)
        if missing:  # a mistyped path among several: forget nothing, say which
            raise EngineError(printable(f"not indexed: {', '.join(missing)}; nothing was removed (`engine info` "
                                        "lists the indexed folders)"))
        if known:
            _remove_from_index(library, index, library.store.remove_paths(known))
            library.save_index(index)
    return len(known)

