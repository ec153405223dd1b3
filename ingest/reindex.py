"""``engine reindex``: rebuild the index, as another type (``--index-type``), or re-embed the whole
library with another encoder (``--model``), never putting the library at risk.

Re-embedding stages the new vectors beside the live ones (``db.staging``), one committed batch at
a time, and switches them in with one transaction only when every row has one; until then every
query answers exactly as before (old encoder file, old vectors, old index). A killed run resumes:
rows already staged for the same encoder are not embedded again. Rows whose file cannot be read
(and none of whose byte-identical aliases can) keep their old state and are reported, and the
switch is refused unless ``allow_missing`` says to drop them. See ``engine.model_switch`` for the
order of the switch itself.

A new index type is built and trained on the stored vectors (a seeded random sample trains it)
and tuned to the recall target before anything is stored: a type that cannot be built is refused
with the reason, the old index and the stored type stand, and the stored type (``auto`` lets
``engine.index_policy`` choose it, within ``memory_budget``), budget and recall target change only
after the new index file is saved.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from engine.config import AUTO_INDEX
from engine.errors import EngineError
from engine.faults import fault_point
from engine.index import VectorIndex
from engine.loader import ImageFileDataset, decode_batches
from engine.preprocess import build_transform, draft_size_for
from ingest.pipeline import IngestConfig, _write_failures

if TYPE_CHECKING:
    from engine.config import IndexConfig
    from engine.encoder import Encoder
    from engine.library import Library, ModelInfo
    from engine.progress import ProgressFn

log = logging.getLogger(__name__)

REPORT_NAME = "reindex-failures.tsv"  # in the library's home: the files a re-embedding could not read


class ReindexRefusedError(EngineError):
    """Some indexed files could not be read, so the library was not switched to the new encoder
    (nothing of the live library changed; the vectors staged so far are kept for a rerun).
    ``report`` holds what was done and which files failed."""

    def __init__(self, message: str, report: ReindexReport):
        super().__init__(message)
        self.report = report


@dataclass
class ReindexReport:
    """What a reindex did.

    model: the library's encoder afterwards (ModelInfo.to_dict()); switched: the library moved to a
    new encoder in this run; reembedded: files embedded by this run; resumed: rows whose vector an
    earlier, interrupted run had already staged; failed: (path, reason) per row whose files could
    not be read; dropped: of those, rows forgotten (``allow_missing``); vectors, index: what the
    saved index holds and its type; notes: plain sentences about choices made (an index type that
    could not be used for the new vectors); search: the saved index's search settings and measured
    recall (``engine.index.SearchSettings``); report_path: the failure list, when there were failures."""

    model: dict[str, Any] | None = None
    switched: bool = False
    reembedded: int = 0
    resumed: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    dropped: int = 0
    vectors: int = 0
    index: str = ""
    search: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    report_path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (what ``engine reindex --json`` prints)."""
        return {"model": self.model, "switched": self.switched, "reembedded": self.reembedded,
                "resumed": self.resumed, "failed": len(self.failed),
                "failures": [{"path": p, "reason": r} for p, r in self.failed], "dropped": self.dropped,
                "vectors": self.vectors, "index": self.index, "search": self.search, "notes": list(self.notes),
                "seconds": round(self.seconds, 3), "report": self.report_path}


def reindex_library(library: Library, *, model: str | None = None, factory: str | None = None,
                    allow_missing: bool = False, config: IngestConfig = IngestConfig(),
                    progress: ProgressFn | None = None, on_wait: Callable[[], None] | None = None,
                    memory_budget: int | None = None, recall: float | None = None) -> ReindexReport:
    """``engine reindex``: rebuild the index from stored embeddings (no image decoded), as type
    ``factory`` when given (``auto``: chosen by ``engine.index_policy`` within ``memory_budget``
    bytes), tuned to ``recall``; with ``model`` (``pretrained`` or a checkpoint path), first
    re-embed every indexed image with that encoder and switch the library to it. Type, budget and
    recall target not given keep the library's.

    progress(done, total) counts rows with a new vector (staged ones from an earlier run at once).
    Raises EngineError, with nothing of the live library changed, for a type that cannot be built
    or trained, a model that cannot be loaded, and (ReindexRefusedError) files that cannot be read
    unless ``allow_missing``, which then forgets those rows at the switch."""
    started = time.perf_counter()
    report = ReindexReport()
    if not library.exists():  # refused before the lock: no home or database is created for nothing
        raise EngineError(f"no library in {library.paths.home} to reindex; run `engine ingest PATH` first")
    with library.write_lock(on_wait):
        info = library.model_info()
        if info is None:
            raise EngineError(f"no library in {library.paths.home} to reindex; run `engine ingest PATH` first")
        if factory is not None:
            factory = factory.strip()
            if factory != AUTO_INDEX:
                VectorIndex.build(info.dim, factory)  # a malformed type is refused before anything else
        options = library.index_config()
        options = replace(options, factory=factory or options.factory,
                          memory_budget=memory_budget if memory_budget is not None else options.memory_budget,
                          recall=recall if recall is not None else options.recall)
        index: VectorIndex | None = None
        if model is not None:
            index = _reembed(library, model, factory, allow_missing, config, progress, report, options)
        if index is None:
            index = _build(library, factory, pending=False, report=report, options=options)
            fault_point("reindex-index-built")
        library.save_index(index)
        fault_point("reindex-index-saved")
        if factory is not None and (index.factory == factory or factory == AUTO_INDEX):
            library.set_index_options(factory=factory)  # the stored type changes only now
        library.set_index_options(memory_budget=memory_budget, recall=recall)
        report.model = library.model_info().to_dict()
        report.vectors, report.index = index.ntotal, index.factory
        report.search = index.settings.to_dict()
    report.seconds = time.perf_counter() - started
    return report


def _build(library: Library, factory: str | None, *, pending: bool, report: ReindexReport,
           options: IndexConfig) -> VectorIndex:
    """The index of the stored (or, with ``pending``, staged) vectors, built with ``options``
    (budget, recall target): of type ``factory`` strictly when given; else of the stored type,
    falling back to Flat (said in ``report.notes``) when that type cannot be made of these vectors."""
    if factory is not None:
        index = library.build_index(factory, pending=pending, config=options)
        if index.factory != factory and factory != AUTO_INDEX:  # an untrained type and no vector to train it on
            raise EngineError(f"index type {factory!r} is trained on the stored vectors and the library has none yet; "
                              "ingest photos first")
        return index
    stored = options.factory
    try:
        return library.build_index(stored, pending=pending, config=options)
    except EngineError as exc:
        if stored in ("Flat", AUTO_INDEX):
            raise
        report.notes.append(f"{exc}; built a Flat index instead (`engine reindex --index-type` changes it)")
        return library.build_index("Flat", pending=pending, config=options)


def _reembed(library: Library, spec: str, factory: str | None, allow_missing: bool, config: IngestConfig,
             progress: ProgressFn | None, report: ReindexReport, options: IndexConfig) -> VectorIndex | None:
    """Stage vectors of ``spec``'s encoder for every row, then switch; returns the index built from
    them (None when the library already uses this encoder: only rows without a vector, if any,
    are embedded, and the caller rebuilds the index)."""
    from engine.encoder import load_encoder, resolve_device

    store = library.store
    encoder = load_encoder(spec, resolve_device(library.device))
    if factory is not None and factory != AUTO_INDEX:
        VectorIndex.build(encoder.dim, factory)  # refused before any image is decoded
    current = library.model_info()
    library.finish_encoder_switch()  # an earlier switch's encoder file first: staging overwrites encoder.pending.pt
    if encoder.identity() == current.identity:
        _fill_unembedded(library, encoder, allow_missing, config, progress, report)
        return None
    info, resumed = library.stage_model(spec, encoder)
    rows = store.image_ids()
    staged = np.intersect1d(store.pending_ids(), rows, assume_unique=True)
    report.resumed = len(staged)
    todo = np.setdiff1d(rows, staged, assume_unique=True)
    if resumed and len(staged):
        log.info("resuming the re-embedding with %s: %d of %d rows already staged", info.spec, len(staged), len(rows))
    lost = _embed_rows(library, encoder, todo, store.put_pending, config, report,
                       progress=(lambda done, _total: progress(len(staged) + done, len(rows))) if progress else None,
                       fault="reindex-staged")
    _report_failures(library, lost, report)
    if lost and not allow_missing:
        raise ReindexRefusedError(_refusal(lost, len(rows), current, info, report), report)
    index = _build(library, factory, pending=True, report=report, options=options)  # before the switch: a refusal changes nothing
    library.switch_model(info, encoder, drop_ids=sorted(lost))
    report.switched, report.dropped = True, len(lost)
    return index


def _fill_unembedded(library: Library, encoder: Encoder, allow_missing: bool, config: IngestConfig,
                     progress: ProgressFn | None, report: ReindexReport) -> None:
    """The library already uses ``encoder``: drop any vectors staged for another one (a reindex
    given up), finish an encoder-file switch a crash interrupted, and embed the rows that have no
    vector (a library damaged by an older engine) straight into the live table."""
    store = library.store
    pending = library.pending_model()
    if pending is not None:
        report.notes.append(f"dropped the vectors staged for {pending.spec} by an unfinished reindex")
        store.discard_pending()
        library.paths.encoder_pending.unlink(missing_ok=True)
    todo = np.setdiff1d(store.image_ids(), store.embedding_ids(), assume_unique=True)
    lost = _embed_rows(library, encoder, todo, store.put_embeddings, config, report, progress=progress,
                       fault="reindex-staged")
    _report_failures(library, lost, report)
    if lost and not allow_missing:
        raise ReindexRefusedError(
            f"{_count(len(lost), 'row')} of the library {'has' if len(lost) == 1 else 'have'} no vector and no "
            f"readable file ({_example(report.failed)}); they are kept as they are: make the files reachable and "
            f"run the command again, or add --allow-missing to forget them (all listed in {report.report_path})",
            report)
    if lost:
        store.remove_ids(sorted(lost))
        report.dropped = len(lost)


def _embed_rows(library: Library, encoder: Encoder, ids: np.ndarray,
                put: Callable[[Sequence[int], np.ndarray], None], config: IngestConfig, report: ReindexReport, *,
                progress: ProgressFn | None, fault: str) -> dict[int, tuple[str, str]]:
    """Decode and embed the files of rows ``ids`` (int64), handing each batch's vectors to
    ``put(ids, float32 [B, D])``, which commits them. A row whose file fails is tried again through
    its aliases (byte-identical files). Returns {row id: (path, reason)} for rows no file of which
    could be read."""
    if not len(ids):
        return {}
    records = library.store.get_images(ids.tolist())
    ordered = sorted(records.values(), key=lambda r: r.id)
    done = 0

    def on_batch(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, len(ordered))

    lost = _embed_paths(encoder, [(r.id, r.path) for r in ordered], put, config, report, on_batch, fault)
    aliases = library.store.aliases_of(lost)
    if aliases:
        retry = [(i, path) for i, paths in sorted(aliases.items()) for path in sorted(paths)]
        still = _embed_paths(encoder, retry, put, config, report, None, fault)
        lost = {i: why for i, why in lost.items() if i not in aliases or i in still}
    return lost


def _embed_paths(encoder: Encoder, items: list[tuple[int, str]], put: Callable[[Sequence[int], np.ndarray], None],
                 config: IngestConfig, report: ReindexReport, on_batch: Callable[[int], None] | None,
                 fault: str) -> dict[int, tuple[str, str]]:
    """Embed (row id, path) items batch by batch into ``put``; returns {row id: (path, reason)} for
    ids none of whose paths decoded. Several items may share an id (a row's aliases): the first
    that decodes gives the row its vector."""
    dataset = ImageFileDataset([p for _, p in items], build_transform(encoder.data_config),
                               draft_size_for(encoder.data_config))
    failed: dict[int, tuple[str, str]] = {}
    embedded: set[int] = set()
    for batch in decode_batches(dataset, config.batch_size, config.workers):
        for it in batch.failures:
            failed.setdefault(items[it.position][0], (it.path, it.error or "unknown error"))
        if batch.items and batch.images is not None:
            keep: list[int] = []
            ids: list[int] = []
            for n, it in enumerate(batch.items):
                row = items[it.position][0]
                if row not in embedded and row not in ids:
                    keep.append(n)
                    ids.append(row)
            if keep:
                put(ids, encoder.embed(batch.images[keep]))
                embedded.update(ids)
                report.reembedded += len(ids)
                fault_point(fault)
        if on_batch:
            on_batch(len(batch.items) + len(batch.failures))
    return {i: why for i, why in failed.items() if i not in embedded}


def _report_failures(library: Library, lost: dict[int, tuple[str, str]], report: ReindexReport) -> None:
    """Record the rows no file of which could be read in ``report`` and in the home's failure list."""
    path = library.paths.home / REPORT_NAME
    report.failed = [lost[i] for i in sorted(lost)]
    if report.failed:
        _write_failures(path, report.failed)
        report.report_path = os.fspath(path)
    else:
        path.unlink(missing_ok=True)


def _refusal(lost: dict[int, tuple[str, str]], total: int, current: ModelInfo, new: ModelInfo,
             report: ReindexReport) -> str:
    staged = total - len(lost)
    what = (f"none of the {_count(total, 'indexed file')} could be read (is their drive mounted? {_example(report.failed)})"
            if staged == 0 else
            f"{len(lost)} of {_count(total, 'indexed file')} could not be read ({_example(report.failed)})")
    kept = f"; the {_count(staged, 'new vector')} made so far {'is' if staged == 1 else 'are'} kept for the next run" \
        if staged else ""
    return (f"{what}, so the library was not switched to {new.spec}: it still answers with {current.spec} and "
            f"nothing of it changed{kept}. Make the files reachable and run the same command again, or add "
            f"--allow-missing to forget those rows at the switch (all listed in {report.report_path})")


def _example(failed: Sequence[tuple[str, str]]) -> str:
    path, reason = failed[0]
    more = f", and {len(failed) - 1} more" if len(failed) > 1 else ""
    return f"e.g. {path}: {reason}{more}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
