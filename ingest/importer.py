"""``engine import DIR``: bring precomputed embeddings (``engine-shards/1``, see engine.shards) into
a library, without decoding an image.

The vectors must come from the library's own encoder: the manifest's model identity (what
``engine info --json`` shows as ``model.identity``) must equal the library's, else nothing is
imported. A new library takes the encoder named by ``--model`` (a checkpoint, or ``pretrained``;
default ``pretrained``), and only when that encoder's identity is the manifest's: the library must
be able to embed queries exactly as the shards were embedded, so an identity alone, with no
encoder to go with it, cannot start a library.

Each shard is validated whole before any of it is committed; a bad one is refused (reported with
its file and reason) and the others are imported. Rows are committed in transactions of
``batch_size`` rows (rows and vectors together, as ingest commits); a path the library already
holds (as an image or an alias) is skipped, so a rerun, or a run after ``kill -9`` at any moment,
adds each row exactly once. The index is brought up to date at the end (and by any later open,
which reconciles it with the stored vectors by id).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np

from engine.progress import StageClock
from engine.errors import ModelMismatchError
from engine.faults import fault_point
from engine.shards import Manifest, Shard, ShardError, count_rows, read_manifest, read_shard

if TYPE_CHECKING:
    from engine.encoder import Encoder
    from engine.library import Library
    from engine.model_switch import ModelInfo
    from engine.progress import ProgressFn

# what a row gets for a fact its shard does not give: an unknown hash and a size and mtime that
# never match a real file, so the next ingest of its folder checks the file rather than trusting it
UNKNOWN_FACTS: dict[str, Any] = {"content_hash": "", "bytes": 0, "mtime": 0.0}


@dataclass(frozen=True)
class ImportConfig:
    """batch_size: rows per database transaction (a kill loses at most the one in flight)."""

    batch_size: int = 5000


@dataclass
class ImportStages(StageClock):
    """Wall seconds per stage: model (build and check the encoder of a new library), read (open
    and validate the shards), lookup (find the paths the library already holds), commit (write
    rows and vectors), index (bring the index up to date). They never overlap."""

    model: float = 0.0
    read: float = 0.0
    lookup: float = 0.0
    commit: float = 0.0
    index: float = 0.0


@dataclass
class ImportReport:
    """What an import did: added (rows new to the library), skipped (rows whose path the library
    already held: a rerun skips everything), failed: (file, reason) for each shard refused whole;
    shards (in the manifest) and imported (shards accepted); seconds and per-stage ``stages``."""

    added: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    shards: int = 0
    imported: int = 0
    seconds: float = 0.0
    stages: ImportStages = field(default_factory=ImportStages)

    @property
    def rows_per_second(self) -> float:
        """Rows added per wall second of the whole call (0.0 when none were added)."""
        return self.added / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (what ``engine import --json`` prints)."""
        return {"added": self.added, "skipped": self.skipped, "failed": len(self.failed),
                "failures": [{"file": f, "reason": r} for f, r in self.failed],
                "shards": self.shards, "imported": self.imported, "seconds": round(self.seconds, 3),
                "rows_per_second": round(self.rows_per_second, 1), "stages": self.stages.to_dict()}


def _mismatch(manifest: Manifest, identity: str, whose: str) -> ModelMismatchError:
    return ModelMismatchError(
        f"{manifest.folder}: the shards were embedded by encoder {manifest.identity} ({manifest.dim}-d) and {whose} "
        f"is encoder {identity}; import them into a library of that encoder (or give --model with its checkpoint "
        "when the library is new)")


def _check_identity(manifest: Manifest, info: ModelInfo) -> None:
    if manifest.identity != info.identity or manifest.dim != info.dim:
        raise _mismatch(manifest, f"{info.identity} ({info.dim}-d)", f"this library ({info.spec})")


def _new_library_encoder(library: Library, manifest: Manifest, model: str | None) -> Encoder:
    """The encoder ``model`` (default ``pretrained``) names, built without writing anything,
    when its identity is the manifest's; ModelMismatchError naming both otherwise."""
    spec = model or "pretrained"
    encoder = library.load_model(spec)
    if encoder.identity() != manifest.identity or encoder.dim != manifest.dim:
        raise _mismatch(manifest, f"{encoder.identity()} ({encoder.dim}-d)", f"--model {spec}")
    return encoder


def _rows(columns: Mapping[str, list[Any]], picks: list[int]) -> list[dict[str, Any]]:
    """Image row dicts (the store's column names) for rows ``picks`` of a shard's columns, with
    UNKNOWN_FACTS where a required fact is absent. Every dict has the same keys (one executemany)."""
    names = list(columns)
    rows = [{name: columns[name][i] for name in names} for i in picks]
    for key, default in UNKNOWN_FACTS.items():
        if key not in columns:
            for row in rows:
                row[key] = default
        else:
            for row in rows:
                if row[key] is None:
                    row[key] = default
    return rows


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """float32 [n, D] rows scaled to norm 1 exactly as float32 allows (the shard's are within
    engine.shards.NORM_TOLERANCE of it), so imported vectors are like embedded ones."""
    vectors = np.array(vectors, dtype=np.float32, order="C")
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


CommitFn = Callable[[Shard, int, int], tuple[int, int]]
"""Commits rows [start, stop) of a validated shard in one transaction; returns (added, skipped)."""


def new_paths_committer(library: Library, stages: ImportStages) -> CommitFn:
    """The import's commit: rows whose path the library does not hold (as an image or an alias)
    are inserted with their vectors; the others are skipped. The caller holds the write lock."""
    store = library.store
    # A library that held nothing when this run took the lock holds only this run's rows, whose
    # paths are unique across its shards (read_shard's ``taken``): no lookup can find one.
    empty = store.count() == 0 and store.count_aliases() == 0

    def commit(shard: Shard, start: int, stop: int) -> tuple[int, int]:
        paths = shard.paths
        with stages.timing("lookup"):
            known = {} if empty else store.lookup_paths(paths[start:stop])
        picks = [i for i in range(start, stop) if paths[i] not in known] if known else list(range(start, stop))
        if picks:
            with stages.timing("commit"):
                block = shard.vectors[start:stop]
                store.write_batch(_rows(shard.columns, picks),
                                  unit_rows(block if len(picks) == stop - start else block[np.asarray(picks) - start]))
        return len(picks), (stop - start) - len(picks)

    return commit


def _commit_shard(shard: Shard, batch_size: int, commit: CommitFn, report: ImportReport,
                  progress: Callable[[int], None]) -> None:
    """Commit ``shard`` ``batch_size`` rows per transaction through ``commit``."""
    for start in range(0, len(shard), batch_size):
        stop = min(start + batch_size, len(shard))
        added, skipped = commit(shard, start, stop)
        report.added += added
        report.skipped += skipped
        if added:
            fault_point("batch-committed")  # ingest's name for the same moment: rows in, index not yet
        progress(stop - start)


def import_shards(library: Library, folder: str | os.PathLike, config: ImportConfig = ImportConfig(), *,
                  model: str | None = None, progress: ProgressFn | None = None,
                  on_wait: Callable[[], None] | None = None,
                  committer: Callable[[Library, ImportStages], CommitFn] = new_paths_committer) -> ImportReport:
    """Import the ``engine-shards/1`` folder ``folder`` into ``library``; returns the report.

    model: for a new library, the encoder (``pretrained`` or a checkpoint path; default
    ``pretrained``) whose identity must be the manifest's; for an existing one, a check that it is
    the library's. progress(done, total): rows processed (added or skipped) of the rows the shards
    declare. on_wait: called when another writer holds the library and this call waits.
    committer(library, stages): makes the function that commits rows (default
    ``new_paths_committer``; the Ray ingest commits as ingest does, with its renames, copies and
    changed files), timing its work in ``stages``.

    Raises ShardError for a bad folder or manifest and ModelMismatchError for vectors of another
    encoder, having changed nothing. A bad shard is not raised: it is refused whole, reported in
    ``report.failed``, and the other shards are imported."""
    started = time.perf_counter()
    report = ImportReport()
    stages = report.stages
    manifest = read_manifest(folder)  # first: a mistyped folder leaves no library behind
    report.shards = len(manifest.shards)
    encoder: Encoder | None = None
    if progress:
        progress(0, None)
    with stages.timing("model"):
        if not library.exists():  # a model that cannot be built, or is not the shards', creates nothing
            encoder = _new_library_encoder(library, manifest, model)
        elif model is not None:
            library.check_model(model)
    with library.write_lock(on_wait):
        info = library.model_info()
        if info is not None:
            _check_identity(manifest, info)
        total = count_rows(manifest)
        done = 0

        def advance(rows: int) -> None:
            nonlocal done
            done += rows
            if progress:
                progress(done, total)

        commit = committer(library, stages)
        taken: set[str] = set()  # paths of the shards read so far: a path in two shards is refused
        for name in manifest.shards:
            try:
                with stages.timing("read"):
                    shard = read_shard(manifest, name, taken=taken)
            except ShardError as exc:
                report.failed.append((exc.file or name, exc.reason))
                advance(0)
                continue
            fault_point("import-shard-read")
            if info is None and len(shard):  # a new library gets its encoder with its first rows
                with stages.timing("model"):
                    if encoder is None:  # emptied by another process meanwhile: check afresh
                        encoder = _new_library_encoder(library, manifest, model)
                    library.set_model(model or "pretrained", encoder=encoder)
                    info = library.model_info()
            _commit_shard(shard, config.batch_size, commit, report, advance)
            report.imported += 1
        if info is not None:
            with stages.timing("index"):
                # one call: reconciles by id with what was committed, moves up a rung when the row
                # count crossed one, and saves only when the file would lag too far behind
                library.update_index()
    report.seconds = time.perf_counter() - started
    return report
