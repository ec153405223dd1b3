"""``engine doctor``: check the database against the index against the disk, and repair what can be
repaired.

What is checked: the database file (SQLite's own page check, through a read-only connection), the
encoder file against the model the database remembers, rows without a stored vector, malformed or
orphaned vectors, indexed files that are gone or changed on disk, the index file (the checksum
recorded when it was saved, its sizes, kind and dimension, same ids as the stored embeddings, and
for exact indexes the same vectors) and temporary files left by a writer that died.

What ``--repair`` does, under the library's write lock: restore the encoder file from the model the
library was built with (when that still exists and matches), set a damaged or foreign index file
aside and rebuild the index from the stored embeddings, drop files that are gone, re-embed rows that
lost their vector, re-ingest changed files, and delete stale temporary files. A damaged database is
set aside together with its -wal and -shm files, never written to, and a new one is rebuilt from
what is readable of them (ingest.db_repair).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from db.vectors import TOLERANCE
from engine.checkpoint import save_checkpoint
from engine.config import is_pretrained
from engine.encoder import Encoder, load_checkpoint, load_encoder
from engine.errors import CorruptFileError, EngineError, ModelError
from engine.index import IndexFileError, VectorIndex
from engine.library import Library, ModelInfo, stale_temp_files
from engine.loader import ImageFileDataset, decode_batches
from engine.preprocess import build_transform, draft_size_for
from ingest.pipeline import IngestConfig, ingest_paths
from ingest.presence import UNMOUNTED, IndexedCounts, split_missing

log = logging.getLogger(__name__)

PROBLEM = "problem"
NOTE = "note"  # harmless, fixed by itself on the next open (or just tidied by --repair)
_EXAMPLES = 3


@dataclass
class Finding:
    """One thing doctor found. severity: ``problem`` (makes the library not ok) or ``note``;
    repairable: whether ``--repair`` can fix it; examples: a few paths or ids."""

    code: str
    message: str
    severity: str = PROBLEM
    repairable: bool = True
    count: int = 1
    examples: list[str] = field(default_factory=list)

    def line(self) -> str:
        text = f"{self.severity}: {self.message}"
        if self.examples:
            text += f" (e.g. {', '.join(self.examples)})"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "severity": self.severity, "message": self.message,
                "repairable": self.repairable, "count": self.count, "examples": self.examples}


@dataclass
class DoctorReport:
    """findings: what the check found; actions: what --repair did; remaining: findings of the check
    run again after the repair (None without --repair or when nothing needed repairing)."""

    home: str
    repair: bool = False
    facts: dict[str, Any] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    remaining: list[Finding] | None = None

    @property
    def problems(self) -> list[Finding]:
        """Problems still there: after a repair, those its re-check found."""
        current = self.findings if self.remaining is None else self.remaining
        return [f for f in current if f.severity == PROBLEM]

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        out = [_facts_line(self.home, self.facts)]
        out += [f.line() for f in self.findings]
        out += [f"repaired: {a}" for a in self.actions]
        if self.remaining is not None:
            out += [f"still: {f.line()}" for f in self.remaining if f.severity == PROBLEM]
        if self.ok:
            if not self.findings:
                out.append("ok: database, index and files agree")
            elif self.remaining is not None:
                out.append("ok: repaired; database, index and files agree")
            else:
                out.append("ok: nothing needs repairing (notes only)")
        elif not self.repair and any(f.repairable for f in self.problems):
            out.append("run `engine doctor --repair` to fix what can be fixed")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"home": self.home, "ok": self.ok, "repair": self.repair, "facts": self.facts,
                "findings": [f.to_dict() for f in self.findings], "actions": list(self.actions),
                "remaining": None if self.remaining is None else [f.to_dict() for f in self.remaining]}


def _facts_line(home: str, facts: dict[str, Any]) -> str:
    if "images" not in facts:
        return f"library {home}"
    text = (f"library {home}: {facts['images']} images, {facts['aliases']} aliases, "
            f"{facts['embeddings']} stored embeddings, "
            + ("no index yet (the library is empty)" if "vectors" not in facts
               else "an unreadable index" if facts["vectors"] is None else f"{facts['vectors']} indexed vectors"))
    model = facts.get("model")
    if model:
        text += f"; model {model['backbone']} ({model['dim']}-d)"
    return text


@dataclass
class _State:
    """What the inspection learned, for the repair."""

    usable: bool = False  # the database could be read and has a model
    database_damaged: bool = False  # set aside with its journal files and rebuilt from what is readable
    encoder_bad: bool = False
    index_bad: bool = False  # damaged, foreign, wrong dimension or duplicate ids: set aside, rebuild
    index_rebuild: bool = False  # readable but its vectors differ from the stored ones
    orphan_vectors: list[int] = field(default_factory=list)
    bad_vectors: list[int] = field(default_factory=list)
    missing_paths: list[str] = field(default_factory=list)
    changed_paths: list[str] = field(default_factory=list)
    unreachable: int = 0  # known paths whose stat failed for another reason than "not there"
    temp_files: list[Path] = field(default_factory=list)


def _n(count: int, noun: str) -> str:
    """``1 image``, ``2 images``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _examples(items: Iterable[Any]) -> list[str]:
    return [str(x) for x in list(items)[:_EXAMPLES]]


def _first_line(text: str) -> str:
    return text.splitlines()[0] if text else text


def check_library(library: Library, *, repair: bool = False, on_wait: Callable[[], None] | None = None,
                  config: IngestConfig | None = None, deep: bool = False) -> DoctorReport:
    """Check ``library``; with repair=True fix what can be fixed (under its write lock) and check
    again. Never raises for a damaged file: each one is a finding. config: the IngestConfig used to
    re-embed and re-ingest (default: small batches, decoding in-process). deep: also hash every
    indexed file (``ingest.deep_check``)."""
    paths = library.paths
    report = DoctorReport(home=os.fspath(paths.home), repair=repair)
    if library.database_url is None and not paths.database.exists():
        leftovers = [p.name for p in (paths.index, paths.encoder) if p.exists()]
        if leftovers:
            report.findings.append(Finding(
                "database-missing", f"database file {paths.database} is missing but {' and '.join(leftovers)} "
                "remain: the records cannot be rebuilt from them; restore a backup, or move the folder aside "
                "and run `engine ingest PATH` again", repairable=False))
        else:
            report.findings.append(Finding("empty", f"no library in {paths.home} yet; run `engine ingest PATH` "
                                                    "first", severity=NOTE, repairable=False))
        return report
    if not repair:
        _inspect_deep(library, _inspect(library, report.findings, report.facts), report.findings, report.facts, deep)
        return report
    with library.write_lock(on_wait):
        state = _inspect(library, report.findings, report.facts)
        if state.database_damaged and library.database_url is None:  # another server's database: its own tools
            _repair_database(library, report, config)
            return report
        deep_result = _inspect_deep(library, state, report.findings, report.facts, deep)
        if state.usable and any(f.repairable for f in report.findings):
            _repair(library, state, report, config)
            if deep_result is not None:
                from ingest.deep_check import deep_repair
                report.actions += deep_repair(library, deep_result, config)
            report.remaining, report.facts = [], {}
            _inspect_deep(library, _inspect(library, report.remaining, report.facts), report.remaining, report.facts,
                          deep)
    return report


def _inspect_deep(library: Library, state: _State, findings: list[Finding], facts: dict[str, Any],
                  deep: bool) -> Any:
    """With ``deep``, hash every indexed file the fast check found in place (ingest.deep_check);
    returns its DeepResult, or None when not asked or the library is not usable."""
    if not deep or not state.usable:
        return None
    from ingest.deep_check import deep_check, deep_findings  # imports this module

    result = deep_check(library, skip=set(state.missing_paths) | set(state.changed_paths))
    findings += deep_findings(result, facts)
    return result


def _repair_database(library: Library, report: DoctorReport, config: IngestConfig | None) -> None:
    """A damaged database: keep it (with its journal files), rebuild one from what is readable,
    then repair the rebuilt library as any other (ingest.db_repair)."""
    from ingest.db_repair import repair_database

    if not repair_database(library, report.actions):
        report.remaining = [Finding("database-missing", f"database file {library.paths.database} could not be "
                                    "rebuilt; the damaged one is kept beside it", repairable=False)]
        return
    later: list[Finding] = []
    state = _inspect(library, later, {})
    if state.usable and any(f.repairable for f in later):
        _repair(library, state, report, config)
    report.remaining, report.facts = [], {}
    _inspect(library, report.remaining, report.facts)


# -- inspection ----------------------------------------------------------------------------------
def _inspect(library: Library, findings: list[Finding], facts: dict[str, Any]) -> _State:
    state = _State()
    try:
        damage = library.database_damage()  # before anything opens it for writing
        if damage:
            state.database_damaged = True
            where = library.store.where if library.database_url else library.paths.database
            findings.append(Finding("database-damaged", f"database file {where} is damaged "
                                    f"({_first_line(damage[0])}); {library.database_advice()}",
                                    repairable=library.database_url is None))
            return state
        store = library.store
        info = library.model_info()
        if info is None:
            facts.update(images=store.count(), aliases=store.count_aliases(), embeddings=store.count_embeddings())
            findings.append(Finding("empty", "the library is empty: nothing has been ingested yet; run "
                                    "`engine ingest PATH`", severity=NOTE, repairable=False))
            return state
        state.usable = True
        facts.update(images=store.count(), aliases=store.count_aliases(), embeddings=store.count_embeddings(),
                     generation=store.generation(), model=info.to_dict())
        _check_encoder(library, info, state, findings)
        image_ids, embedding_ids = _check_rows(library, info, state, findings)
        _check_files(library, state, findings)
        _check_index(library, info, embedding_ids, state, findings, facts)
        state.temp_files = stale_temp_files(library.paths.home)
        if state.temp_files:
            findings.append(Finding("temp-files", f"{_n(len(state.temp_files), 'temporary index file')} left by "
                                    "an interrupted save (never read; deleted by the next save)", severity=NOTE,
                                    count=len(state.temp_files), examples=_examples(p.name for p in state.temp_files)))
    except CorruptFileError as exc:  # damage that only a read reached
        state.database_damaged = True
        findings.append(Finding("database-damaged", str(exc), repairable=library.database_url is None))
        state.usable = False
    return state


def _check_encoder(library: Library, info: ModelInfo, state: _State, findings: list[Finding]) -> None:
    path = library.paths.encoder
    pending = library.pending_model()
    if pending is not None:
        findings.append(Finding("reindex-pending", f"a reindex to {pending.spec} has not finished "
                                f"({_n(len(library.store.pending_ids()), 'vector')} staged beside the live ones, which "
                                f"queries still use): `engine reindex --model {pending.spec}` finishes it, "
                                f"`engine reindex --model {info.spec}` drops it", severity=NOTE, repairable=False))
    if library.encoder_switch_unfinished():
        findings.append(Finding("encoder-switch", f"a reindex switched the library to {info.spec} and stopped before "
                                f"renaming {library.paths.encoder_pending.name} over {path.name}; the next use of the "
                                "encoder finishes it", severity=NOTE, repairable=False))
        return
    hint = (f"`engine doctor --repair` restores it from {info.spec} if that still matches, "
            f"else `engine reindex --model MODEL` re-embeds the library")
    if not path.exists():
        state.encoder_bad = True
        findings.append(Finding("encoder-missing", f"encoder file {path} is missing; {hint}"))
        return
    try:
        identity = load_checkpoint(path, "cpu").identity()
    except ModelError as exc:
        state.encoder_bad = True
        findings.append(Finding("encoder-unreadable", f"{exc}; {hint}"))
        return
    if identity != info.identity:
        state.encoder_bad = True
        findings.append(Finding("model-mismatch", f"encoder file {path} is encoder {identity}, but the stored "
                                f"vectors were made by {info.identity} ({info.spec}); {hint}"))


def _check_rows(library: Library, info: ModelInfo, state: _State,
                findings: list[Finding]) -> tuple[np.ndarray, np.ndarray]:
    """Rows against stored vectors. Returns (image ids, ids of well-formed stored vectors that
    belong to an image), both int64 ascending."""
    store = library.store
    image_ids = store.image_ids()
    embedding_ids = store.embedding_ids()
    without = np.setdiff1d(image_ids, embedding_ids, assume_unique=True)
    orphans = np.setdiff1d(embedding_ids, image_ids, assume_unique=True)
    bad = store.malformed_embedding_ids(info.dim)
    state.orphan_vectors = [int(i) for i in orphans]
    state.bad_vectors = bad
    if len(without):
        findings.append(Finding("rows-without-vectors", f"{_n(len(without), 'image')} without a stored vector (not "
                                "searchable); repair re-embeds them from their files", count=len(without),
                                examples=[f"id {i}" for i in without[:_EXAMPLES]]))
    if len(orphans):
        findings.append(Finding("vectors-without-rows", f"{_n(len(orphans), 'stored vector')} belonging to no "
                                "image; repair deletes them", count=len(orphans),
                                examples=[f"id {i}" for i in orphans[:_EXAMPLES]]))
    if bad:
        findings.append(Finding("malformed-vectors", f"{_n(len(bad), 'stored vector')} not made of {info.dim} "
                                "float16 values; repair re-embeds them", count=len(bad),
                                examples=[f"id {i}" for i in bad[:_EXAMPLES]]))
    unusable = np.asarray(sorted(set(state.bad_vectors) | set(state.orphan_vectors)), np.int64)
    return image_ids, np.setdiff1d(embedding_ids, unusable, assume_unique=True) if len(unusable) else embedding_ids


def _check_files(library: Library, state: _State, findings: list[Finding], chunk: int = 1000) -> None:
    """Every known path against the disk, streamed from the database ``chunk`` at a time: only
    the paths found missing or changed are kept."""
    unreachable: list[str] = []
    for files in library.store.iter_files(chunk):
        for known in files:
            path = known.path
            try:
                st = os.stat(path)
            except (FileNotFoundError, NotADirectoryError):
                state.missing_paths.append(path)
                continue
            except OSError as exc:
                if len(unreachable) < _EXAMPLES:
                    unreachable.append(f"{path}: {exc.strerror or exc}")
                state.unreachable += 1
                continue
            if st.st_size != known.bytes or st.st_mtime != known.mtime:
                state.changed_paths.append(path)
    if state.missing_paths:
        n = len(state.missing_paths)
        findings.append(Finding("files-missing", f"{_n(n, 'indexed file')} gone from disk; repair drops them "
                                "from the database and the index", count=n, examples=_examples(state.missing_paths)))
    if state.changed_paths:
        n = len(state.changed_paths)
        findings.append(Finding("files-changed", f"{_n(n, 'indexed file')} changed on disk since indexed; "
                                "repair re-ingests them", count=n, examples=_examples(state.changed_paths)))
    if unreachable:
        findings.append(Finding("files-unreachable", f"{_n(state.unreachable, 'indexed file')} that cannot be checked "
                                "(left as they are)", severity=NOTE, repairable=False, count=state.unreachable,
                                examples=_examples(unreachable)))


def _check_index(library: Library, info: ModelInfo, embedding_ids: np.ndarray, state: _State,
                 findings: list[Finding], facts: dict[str, Any]) -> None:
    """The index file against the stored embeddings (``embedding_ids``: int64, ascending)."""
    paths = library.paths
    if not paths.index.exists():
        facts["vectors"] = 0
        if len(embedding_ids):
            findings.append(Finding("index-missing", f"index file {paths.index} is missing; it is rebuilt from the "
                                    "stored embeddings on the next open (or by repair)", severity=NOTE))
        return
    if not library.index_holds_current_vectors():  # a reindex switched the vectors, then stopped
        state.index_rebuild = True
        facts["vectors"] = 0
        findings.append(Finding("index-previous-vectors", f"index file {paths.index} was built from the vectors of "
                                "the library's previous encoder (a reindex stopped before saving the new index); it "
                                "is rebuilt from the stored embeddings on the next open (or by repair)", severity=NOTE))
        return
    try:  # checksum, size, structure, kind, dimension and duplicate ids: engine.index
        index = library.read_index()
    except IndexFileError as exc:
        facts["vectors"] = None
        if exc.code == "index-unverified":  # not damaged as far as anyone knows, but not trusted either
            state.index_rebuild = True
            findings.append(Finding(exc.code, str(exc).split("; ")[0] + "; it is rebuilt from the stored embeddings "
                                    "on the next open (or by repair)", severity=NOTE))
        else:
            state.index_bad = True
            findings.append(Finding(exc.code, str(exc)))
        return
    facts["vectors"] = index.ntotal
    held = index.ids()
    unique_held = np.unique(held)
    current = library.index_is_current(index)
    severity = PROBLEM if current else NOTE
    later = "" if current else " (the index file predates the last database write; this is reconciled on the next open)"
    extra = np.setdiff1d(unique_held, embedding_ids, assume_unique=True)
    missing = np.setdiff1d(embedding_ids, unique_held, assume_unique=True)
    if len(extra):
        findings.append(Finding("index-extra", f"{_n(len(extra), 'vector')} in the index without a stored embedding{later}",
                                severity=severity, count=len(extra), examples=[f"id {i}" for i in extra[:_EXAMPLES]]))
    if len(missing):
        findings.append(Finding("index-missing-vectors", f"{_n(len(missing), 'stored embedding')} missing from the index{later}",
                                severity=severity, count=len(missing),
                                examples=[f"id {i}" for i in missing[:_EXAMPLES]]))
    if not current and not len(extra) and not len(missing):
        findings.append(Finding("index-state", f"{paths.index_state} does not record the current database "
                                "generation; the index is brought up to date on the next open", severity=NOTE))
    differ = _differing_vectors(library, index, info.dim, np.intersect1d(unique_held, embedding_ids))
    if differ:
        state.index_rebuild = True
        findings.append(Finding("index-vectors", f"{_n(len(differ), 'vector')} in the index that differ from the "
                                "stored embeddings; repair rebuilds the index from the stored embeddings",
                                count=len(differ), examples=[f"id {i}" for i in differ[:_EXAMPLES]]))


def _differing_vectors(library: Library, index: VectorIndex, dim: int, ids: np.ndarray,
                       chunk: int = 4096) -> list[int]:
    """Ids (of ``ids``, int64, all held by ``index``) whose indexed vector is not the stored one.
    Exact (Flat) indexes only: the others store vectors lossily, so they cannot be compared."""
    if not index.is_exact or not len(ids):
        return []
    differ: list[int] = []
    for start in range(0, len(ids), chunk):
        got_ids, stored = library.store.get_embeddings(ids[start:start + chunk], dim)
        if not len(got_ids):
            continue
        held = index.reconstruct(got_ids)  # as embedded, or as stored (float16: within TOLERANCE)
        bad = np.abs(held - stored).max(axis=1) > TOLERANCE
        differ.extend(int(i) for i in got_ids[bad])
    return differ


# -- repair --------------------------------------------------------------------------------------
def _move_aside(path: Path, tag: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.{tag}-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.{tag}-{stamp}-{n}")
    os.replace(path, target)
    return target


def _original_encoder(info: ModelInfo) -> Encoder | None:
    """The encoder the stored vectors were made with, rebuilt from the model the library
    remembers, or None when that is gone or no longer the same."""
    if not is_pretrained(info.spec) and not os.path.exists(info.spec):
        return None
    try:
        encoder = load_encoder(info.spec, "cpu")
    except EngineError as exc:
        log.info("cannot rebuild the library's encoder from %s: %s", info.spec, exc)
        return None
    return encoder if encoder.identity() == info.identity else None


def _repair(library: Library, state: _State, report: DoctorReport, config: IngestConfig | None) -> None:
    config = config or IngestConfig(batch_size=16, workers=0)
    paths, store, info = library.paths, library.store, library.model_info()
    actions = report.actions

    encoder_ok = not state.encoder_bad
    if state.encoder_bad:
        encoder = _original_encoder(info)
        if encoder is not None:
            note = ""
            if paths.encoder.exists():
                note = f" (the old one moved aside to {_move_aside(paths.encoder, 'mismatch').name})"
            save_checkpoint(encoder, paths.encoder)
            library.forget_encoder()
            encoder_ok = True
            actions.append(f"restored the encoder file {paths.encoder} from {info.spec}{note}")

    index_aside = None
    if state.index_bad and paths.index.exists():
        index_aside = library.set_aside_index()
        actions.append(f"set the unusable index file aside to {index_aside}")

    if state.orphan_vectors or state.bad_vectors:
        store.delete_embeddings(sorted(set(state.orphan_vectors) | set(state.bad_vectors)))
        if state.orphan_vectors:
            actions.append(f"deleted {_n(len(state.orphan_vectors), 'stored vector')} that belonged to no image")
        if state.bad_vectors:
            actions.append(f"deleted {_n(len(state.bad_vectors), 'malformed stored vector')} (re-embedded below)")

    # A folder whose indexed files are all gone at once is far likelier an unmounted drive than a deletion.
    # The database counts the files under each folder: a million paths are never loaded to compare.
    forget, kept = split_missing(state.missing_paths,
                                 IndexedCounts(store.count() + store.count_aliases(), store.count_under)) \
        if state.missing_paths else ([], {})
    if kept:
        actions.append(f"kept {_n(sum(kept.values()), 'missing file')} under {', '.join(sorted(kept)[:_EXAMPLES])}: "
                       f"{UNMOUNTED}; `engine remove PATH` forgets them if they are really gone")
    if forget:
        gone = store.remove_paths(forget)
        actions.append(f"dropped {_n(len(forget), 'file')} gone from disk ({_n(len(gone), 'vector')} removed)")

    reingest: list[str] = []
    reembedded: list[int] = []
    without = np.setdiff1d(store.image_ids(), store.embedding_ids(), assume_unique=True)
    if len(without):
        if encoder_ok:
            embedded, dropped = _reembed(library, [int(i) for i in without], config, reingest, reembedded)
            if embedded:
                actions.append(f"re-embedded {_n(embedded, 'image')} that had no stored vector")
            if dropped:
                actions.append(f"dropped {_n(dropped, 'image')} whose files changed or broke before they could be "
                               "re-embedded (their files are re-ingested below)")
        else:
            actions.append(f"could not re-embed {_n(len(without), 'image')}: the library's encoder is not available")

    known = store.lookup_paths(state.changed_paths)  # still indexed after the repairs above
    queued = set(reingest)
    reingest += [p for p in state.changed_paths if p in known and p not in queued]

    _repair_index(library, state, actions, rebuilt=index_aside is not None, stale_ids=reembedded)

    if reingest:
        if encoder_ok:
            try:
                done = ingest_paths(library, reingest, config)
            except EngineError as exc:
                actions.append(f"could not re-ingest {_n(len(reingest), 'changed file')}: {exc}")
            else:
                actions.append(f"re-ingested {_n(len(reingest), 'changed file')}: {done.added} added, {done.updated} "
                               f"updated, {done.unchanged} unchanged, {done.duplicates} duplicates, "
                               f"{len(done.failed)} failed")
        else:
            actions.append(f"could not re-ingest {_n(len(reingest), 'changed file')}: the library's encoder is not "
                           "available")

    for stale in stale_temp_files(paths.home):
        with contextlib.suppress(OSError):
            stale.unlink()
    if state.temp_files:
        actions.append(f"deleted {_n(len(state.temp_files), 'temporary index file')} left by an interrupted save")


def _repair_index(library: Library, state: _State, actions: list[str], *, rebuilt: bool,
                  stale_ids: list[int]) -> None:
    """Rebuild the index, or bring it in line by id; ``stale_ids`` got new stored vectors, so their
    indexed ones are replaced."""
    paths = library.paths
    if rebuilt or state.index_rebuild or not paths.index.exists():
        index = library.rebuild_index()
        actions.append(f"rebuilt the index from {_n(index.ntotal, 'stored embedding')}")
        return
    index = library.read_index()
    if stale_ids:
        if not index.supports_removal:  # the old vectors cannot be taken out: rebuild instead
            index = library.rebuild_index()
            actions.append(f"rebuilt the index from {_n(index.ntotal, 'stored embedding')}")
            return
        index.remove(stale_ids)
    added, removed = library.reconcile(index)
    library.save_index(index)
    if added or removed:
        actions.append(f"brought the index in line with the stored embeddings: {_n(added, 'vector')} added, "
                       f"{removed} removed")


def _reembed(library: Library, ids: list[int], config: IngestConfig, reingest: list[str],
             reembedded: list[int]) -> tuple[int, int]:
    """Give rows without a vector one again from their file, when the file still holds the content
    the row describes; other rows are dropped and their paths queued for re-ingest.
    Returns (re-embedded, dropped)."""
    store = library.store
    encoder = library.encoder()
    records = store.get_images(ids)
    ordered = [records[i] for i in sorted(records)]
    dataset = ImageFileDataset([r.path for r in ordered], build_transform(encoder.data_config),
                               draft_size_for(encoder.data_config), with_facts=True)
    lost: list[int] = []
    embedded = 0
    for batch in decode_batches(dataset, config.batch_size, config.workers or 0):
        keep = [n for n, it in enumerate(batch.items) if it.content_hash == ordered[it.position].content_hash]
        lost += [ordered[it.position].id for n, it in enumerate(batch.items) if n not in set(keep)]
        lost += [ordered[it.position].id for it in batch.failures]
        if keep:
            vectors = encoder.embed(batch.images[keep])
            kept_ids = [ordered[batch.items[n].position].id for n in keep]
            store.put_embeddings(kept_ids, vectors)
            reembedded.extend(kept_ids)
            embedded += len(keep)
    if lost:
        aliases = store.aliases_of(lost)
        for image_id in lost:
            reingest.append(records[image_id].path)
            reingest.extend(aliases.get(image_id, []))
        store.remove_ids(lost)
    return embedded, len(lost)
