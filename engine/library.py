"""A library: one home folder holding the metadata database, the FAISS index and the encoder
the library was built with.

The database is the source of truth (rows and their embeddings are committed together); the index
is derived from it and records the database generation it reflects. Whenever the two disagree
(a crash between commit and index save, or a query while an ingest is running) the index is
reconciled from stored embeddings by id: the ids are never reused, so the difference of id sets
is exactly what to add and remove.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from db.locks import StoreLockedError
from db.store import DatabaseDamagedError, MetadataStore, StoreError, StoreURLError
from engine.atomic import write_atomic
from engine.config import AUTO_INDEX, DEFAULT_RECALL, IndexConfig, LibraryPaths, default_home, is_pretrained
from engine.errors import CorruptFileError, EngineError, IndexMissingError, LockError, ModelError, ModelMismatchError
from engine.faults import fault_armed, fault_point
from engine.home_files import LibraryFiles, read_only_reason
from engine.index_growth import INDEX_OPTIONS_KEY, IndexGrowth
from engine.index import IndexFileError, IndexFileInfo, VectorIndex, file_identity
from engine.model_switch import ModelInfo, ModelSwitching, describe_model
from engine.shared_home import publish_encoder, sync_encoder

if TYPE_CHECKING:  # torch: imported only by the methods that build an encoder
    from engine.encoder import Encoder
    from engine.scripted import ScriptedEncoder

log = logging.getLogger(__name__)

DATABASE_URL_ENV = "ENGINE_DATABASE_URL"  # read here only, so the library honours it without the CLI


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def stale_temp_files(home: Path) -> list[Path]:
    """Temporary index files (``.index.faiss.PID.tmp``, ``.index.json.PID.tmp``) left by a writer
    that died mid-save. They are never read; this finds them so they can be deleted."""
    found = []
    for path in sorted(Path(home).glob(".index.*.tmp")):
        pid = path.name.split(".")[-2]
        if not pid.isdigit() or not _pid_alive(int(pid)):
            found.append(path)
    return found


def _check_list_count(factory: str, vectors: int) -> None:
    """Refuse an inverted-file type with more lists than there are vectors to train it on, with the
    reason and a count that would do (FAISS's own message names neither)."""
    match = re.search(r"(?:^|,)IVF(\d+)", factory)
    if match and int(match.group(1)) > vectors:
        lists = int(match.group(1))
        fits = factory[:match.start(1)] + str(max(1, int(math.sqrt(vectors)))) + factory[match.end(1):]
        raise EngineError(f"index type {factory!r} needs at least {lists} vectors to train its {lists} lists and the "
                          f"library has {vectors}: keep Flat until it is larger, or use about the square root of the "
                          f"number of vectors ({fits!r})")


class Library(LibraryFiles, IndexGrowth, ModelSwitching):
    """Open a library in ``home`` (default: ``$ENGINE_HOME``, see ``default_home``), created on first
    write. ``database_url`` overrides the default SQLite file with any SQLAlchemy URL; without one,
    ``$ENGINE_DATABASE_URL`` is used when set.

    read_only: True opens it for searching only (nothing in the home is written; every command
    that would change it raises ReadOnlyError); None (default) does so when ``$ENGINE_READ_ONLY``
    is set or the home folder or database file is not writable (a mounted backup, a shared
    folder). A read-only SQLite database is opened ``immutable`` unless its ``-wal`` and ``-shm``
    files are both there (see ``db.store``)."""

    def __init__(self, home: str | os.PathLike | None = None, *, device: str = "auto",
                 database_url: str | None = None, read_only: bool | None = None):
        self.paths = LibraryPaths(Path(home).expanduser() if home else default_home())
        self.device = device
        self.database_url = database_url or os.environ.get(DATABASE_URL_ENV) or None
        self.read_only_reason = read_only_reason(self.paths.home, None if self.database_url else self.paths.database,
                                                 read_only)
        self._store: MetadataStore | None = None
        self._encoder: Encoder | None = None
        self._scripted: ScriptedEncoder | None = None  # the TorchScript copy query_encoder() loaded
        self._lock_depth = 0

    # -- parts ---------------------------------------------------------------------------------
    @property
    def store(self) -> MetadataStore:
        """The MetadataStore, opened on first use (creating the home folder).

        A damaged database raises CorruptFileError naming the file (and the journal files that
        belong with it), both here and from any later read; it is never overwritten."""
        if self._store is None:
            if not self.read_only and self.database_url is None:  # the SQLite file lives in the home
                self.paths.home.mkdir(parents=True, exist_ok=True)
            url = self.database_url or f"sqlite:///{self.paths.database}"
            try:
                store = MetadataStore(url, on_corrupt=self._corrupt_database, read_only=self.read_only)
            except DatabaseDamagedError as exc:
                raise self._corrupt_database(str(exc)) from None
            except StoreURLError as exc:  # a setup mistake, not damage: no doctor advice
                raise EngineError(str(exc)) from None
            except StoreError as exc:
                raise CorruptFileError(f"{exc} (`engine doctor` checks the whole library)") from None
            if fault_armed("commit"):  # a listener on every commit only when a crash test asks
                store.on_commit(lambda: fault_point("commit"))
            self._store = store
        return self._store

    def _corrupt_database(self, message: str) -> CorruptFileError:
        return CorruptFileError(f"{message}; {self.database_advice()}")

    def exists(self) -> bool:
        """True when this home holds a library that has a model (something was ingested or set up)."""
        if self.database_url is None and not self.paths.database.exists():
            return False
        return self.model_info() is not None

    def model_info(self) -> ModelInfo | None:
        raw = self.store.get_meta("model")
        if raw is None:
            return None
        raw["input_size"] = tuple(raw.get("input_size") or ())
        return ModelInfo(**raw)

    def index_config(self) -> IndexConfig:
        """The library's index settings: its type (``auto`` unless chosen with `engine reindex
        --index-type`), memory budget and recall target (`--memory-budget`, `--recall`)."""
        options = self.store.get_meta(INDEX_OPTIONS_KEY) or {}
        budget = options.get("memory_budget") if isinstance(options, dict) else None
        recall = options.get("recall") if isinstance(options, dict) else None
        return IndexConfig(factory=self.store.get_meta("index_factory", AUTO_INDEX),
                           memory_budget=budget if isinstance(budget, int) and budget > 0 else None,
                           recall=float(recall) if isinstance(recall, (int, float)) and 0 < recall <= 1 else DEFAULT_RECALL)

    def encoder(self) -> Encoder:
        """The library's encoder, rebuilt from the checkpoint saved in its home (once, then kept)."""
        if self._encoder is None:
            from engine.encoder import load_checkpoint, resolve_device

            info = self.model_info()
            if info is None:
                raise IndexMissingError(f"no library in {self.paths.home} yet; run `engine ingest PATH` first")
            device = resolve_device(self.device)
            sync_encoder(self)  # a home sharing its database with others gets the encoder from it
            encoder: Encoder | None = None
            problem: EngineError
            if not self.paths.encoder.exists():
                problem = CorruptFileError(f"the library's encoder file {self.paths.encoder} is missing; "
                                           "run `engine doctor --repair` to restore it")
            else:
                try:
                    encoder = load_checkpoint(self.paths.encoder, device)
                except ModelError as exc:
                    problem = CorruptFileError(f"{exc}; run `engine doctor --repair` to restore the library's encoder")
                else:
                    if encoder.identity() != info.identity:  # queries would be compared with another model's vectors
                        encoder = None
                        problem = ModelMismatchError(
                            f"encoder file {self.paths.encoder} is not the encoder this library's vectors were made "
                            f"with ({info.spec}); run `engine doctor --repair`")
            if encoder is None:
                encoder = self._switched_encoder(info, device)
                if encoder is None:
                    raise problem
            self._encoder = encoder
        return self._encoder

    def query_encoder(self, count: int = 1) -> Encoder | ScriptedEncoder:
        """The encoder to embed ``count`` query images with: the library's TorchScript copy
        (``engine.scripted``: no timm import, no model construction) when it is recorded for the
        current encoder, ``count`` is small and the device is the CPU; else ``encoder()``, and then
        a missing or stale copy is written again (when the home is writable and no writer is busy).
        Both embed a small batch identically."""
        from engine.scripted import MAX_BATCH, RECORD_KEY, load_scripted_copy, on_cpu

        info = self.model_info()
        if self._encoder is not None or info is None or count > MAX_BATCH or not on_cpu(self.device):
            return self.encoder()
        if self._scripted is not None and self._scripted.identity() == info.identity:
            return self._scripted
        fast = load_scripted_copy(self.paths.home, self.store.get_meta(RECORD_KEY), info.identity, self.paths.encoder)
        if fast is not None:
            self._scripted = fast
            return fast
        encoder = self.encoder()
        self.save_scripted_copy(encoder)
        return encoder

    def save_scripted_copy(self, encoder: Encoder) -> bool:
        """Write ``encoder.ts``, the checked TorchScript copy of ``encoder`` (the library's, on the
        CPU), and its record; False, writing nothing, when the library is read-only, a writer holds
        the lock, the encoder is not the library's, or the copy cannot be made or checked. The
        record ties the copy to the bytes of ``encoder.pt`` too (its file must hold ``encoder``)."""
        from engine.scripted import RECORD_KEY, write_scripted_copy

        info = self.model_info()
        if self.read_only or info is None or encoder.device.type != "cpu":
            return False
        try:
            with self.write_lock(wait=False):
                if encoder.identity() != info.identity:
                    return False
                self.store.set_meta(RECORD_KEY, write_scripted_copy(encoder, self.paths.home, self.paths.encoder))
        except (EngineError, StoreError, OSError, ValueError, RuntimeError) as exc:
            log.info("no TorchScript copy of the encoder written: %s", exc)
            return False
        return True

    def forget_encoder(self) -> None:
        """Drop the encoder kept by ``encoder()``, so the next call reads the file in the home again
        (after something replaced that file)."""
        self._encoder = None
        self._scripted = None

    def load_model(self, spec: str, *, backbone: str | None = None, weights: str | None = None) -> Encoder:
        """Build the encoder ``spec`` names (``pretrained`` or a checkpoint path) on this library's
        device, writing nothing: a model that cannot be built leaves no trace. Raises ModelError."""
        from engine.encoder import load_encoder, resolve_device

        return load_encoder(spec, resolve_device(self.device), backbone=backbone, weights=weights)

    def set_model(self, spec: str, *, backbone: str | None = None, weights: str | None = None,
                  index_factory: str | None = None, encoder: Encoder | None = None) -> Encoder:
        """Give a new library its encoder (``pretrained`` or a checkpoint path), saved into its home.
        encoder: the one ``load_model(spec)`` already built, if any. Returns the encoder. Does not
        touch existing vectors: ``reindex`` does that."""
        from engine.checkpoint import save_checkpoint

        if encoder is None:
            encoder = self.load_model(spec, backbone=backbone, weights=weights)
        self.paths.home.mkdir(parents=True, exist_ok=True)
        save_checkpoint(encoder, self.paths.encoder)
        info = describe_model(spec, encoder)
        self.store.set_meta("model", info.to_dict())
        publish_encoder(self)  # for the other homes of a shared database
        if index_factory is not None or self.store.get_meta("index_factory") is None:
            self.store.set_meta("index_factory", index_factory or AUTO_INDEX)
        self._encoder = encoder
        self.save_scripted_copy(encoder)
        return encoder

    def ensure_model(self, spec: str | None = None, **kwargs: Any) -> Encoder:
        """The library's encoder; set it from ``spec`` when the library is new. A ``spec`` that names
        a different encoder from the remembered one is refused."""
        info = self.model_info()
        if info is None:
            return self.set_model(spec or "pretrained", **kwargs)
        if spec is not None:
            self.check_model(spec)
        return self.encoder()

    def check_model(self, spec: str) -> None:
        """Raise ModelMismatchError when ``spec`` is not the encoder this library was built with."""
        info = self.model_info()
        if info is None:
            return
        if is_pretrained(spec):
            same = info.spec == spec
        else:
            from engine.encoder import load_checkpoint

            same = load_checkpoint(spec, "cpu").identity() == info.identity
        if not same:
            raise ModelMismatchError(
                f"this library was built with {info.spec} (encoder {info.identity}); "
                f"use that model, or `engine reindex --model {spec}` to re-embed it")

    # -- index ---------------------------------------------------------------------------------
    def index_holds_current_vectors(self) -> bool:
        """False when the index file was built from the vectors of an earlier encoder (a reindex
        switched the stored vectors and stopped before saving the new index): such an index has the
        same ids as the stored vectors, so reconciling by id cannot mend it; it is rebuilt. A state
        file written before epochs were recorded counts as epoch 0."""
        state = self._read_state()
        if state.get("epoch", 0) != self.store.embeddings_epoch():
            return False
        info = self.model_info()
        return info is None or state.get("model", info.identity) == info.identity

    def open_index(self, *, required: bool = True) -> VectorIndex | None:
        """The index, reconciled with the database when its recorded generation is stale.

        required=True raises IndexMissingError for a library with nothing in it (and never
        returns None)."""
        info = self.model_info()
        if info is None:
            if required:
                raise IndexMissingError(f"no index in {self.paths.home} yet; run `engine ingest PATH` first")
            return None
        index: VectorIndex | None = None
        trouble: IndexFileError | None = None
        if self.paths.index.exists() and not self.index_holds_current_vectors():
            log.info("the index file holds the vectors of an earlier encoder; rebuilding it from stored embeddings")
        elif self.paths.index.exists():
            try:  # a damaged, foreign or unverifiable file is derived data: rebuilt, never trusted
                index = self.read_index()
            except IndexFileError as exc:
                if exc.code != "index-missing":
                    (log.info if exc.code == "index-unverified" else log.warning)(
                        "%s; searching an index rebuilt from the stored embeddings", str(exc).split("; ")[0])
                    trouble = exc
            else:
                if not self.index_is_current(index):
                    self.reconcile(index)
        if index is None:
            index = self._rebuild_and_save_if_free(trouble)
        if required and index.ntotal == 0 and self.store.count() == 0:
            raise IndexMissingError(f"the library in {self.paths.home} is empty; run `engine ingest PATH` first")
        return index

    def _rebuild_and_save_if_free(self, trouble: IndexFileError | None = None) -> VectorIndex:
        """The index rebuilt from stored embeddings; saved when no writer is at work, the home is
        writable and the file on disk is still missing, of earlier vectors, or the one ``trouble``
        was found in (a damaged or foreign one is first set aside; a reader never waits for the
        lock, and leaves a file a writer replaced meanwhile to that writer)."""
        generation, epoch = self.store.generation(), self.store.embeddings_epoch()  # taken first: see save_index
        index = self.rebuild_index(save=False)
        if self.read_only:
            return index
        try:
            with self.write_lock(wait=False):
                on_disk = file_identity(self.paths.index)
                if trouble is not None and on_disk is not None and on_disk == trouble.identity:
                    if trouble.code != "index-unverified":
                        log.warning("the unusable index file was set aside to %s", self.set_aside_index())
                    self.save_index(index, generation=generation, epoch=epoch)
                elif on_disk is None or not self.index_holds_current_vectors():
                    self.save_index(index, generation=generation, epoch=epoch)
        except (LockError, OSError):
            pass
        return index

    def reconcile(self, index: VectorIndex) -> tuple[int, int]:
        """Bring ``index`` in line with the stored embeddings by id, in place; returns (added,
        removed). An index type that cannot remove is rebuilt instead when it holds extra ids."""
        info = self.model_info()
        stored = self.store.embedding_ids()
        held = index.ids()
        missing = np.setdiff1d(stored, held, assume_unique=True)
        extra = np.setdiff1d(held, stored, assume_unique=True)
        if len(extra):
            if not index.supports_removal:
                index.replace_with(self.rebuild_index(save=False))
                return len(stored), len(extra)
            index.remove(extra)
        for start in range(0, len(missing), 20000):
            ids, vectors = self.store.get_embeddings(missing[start:start + 20000], info.dim)
            if not index.is_trained:
                index.train(vectors)
            index.add(vectors, ids)
        if len(missing) or len(extra):
            log.info("index reconciled with the database: %d added, %d removed", len(missing), len(extra))
        return len(missing), len(extra)

    def rebuild_index(self, factory: str | None = None, *, save: bool = True) -> VectorIndex:
        """A fresh index from stored embeddings alone (no image is decoded).

        factory: an explicit type, built strictly (EngineError when it cannot be built or trained
        on the stored vectors; see ``build_index``). Without one, the stored type is used, and an
        index that cannot be made of it (too few vectors to train, a type this FAISS lacks) falls
        back to exact ``Flat`` with a warning: a derived file never makes the library unusable."""
        if factory is None:
            factory = self.index_config().factory
            strict = False
        else:
            strict = True
        generation, epoch = self.store.generation(), self.store.embeddings_epoch()  # taken first: see save_index
        try:
            index = self.build_index(factory)
        except EngineError as exc:
            if strict or factory == "Flat":
                raise
            log.warning("%s; using an exact Flat index until `engine reindex --index-type` is run", exc)
            index = self.build_index("Flat")
        if save:
            self.save_index(index, generation=generation, epoch=epoch)
        return index

    def build_index(self, factory: str, *, pending: bool = False, sample: int | None = None, seed: int = 0,
                    tune: bool = True, config: IndexConfig | None = None) -> VectorIndex:
        """A new index of type ``factory`` (``auto``: the one ``plan_index`` chooses for the
        vectors there are) holding every stored vector (with ``pending``: every vector staged by
        a reindex, made by ``self.pending_model()``), trained first, for IVF/PQ types, on a seeded
        random sample of them (``sample`` at most; default: what the type needs, see
        ``engine.index_policy.training_size``). With ``tune``, an approximate type is then tuned to
        the library's recall target on held-out stored vectors (``engine.index_tuning``; the exact
        answers are computed in the same pass over the vectors). config: the memory budget and
        recall target to build with (default: the library's, ``index_config``). Nothing is saved.

        Raises EngineError, having changed nothing, when the type cannot be built for this
        dimension or cannot be trained on the vectors there are (with the reason: too few vectors
        for the number of lists, or for a product quantiser's codebooks)."""
        from engine.index_policy import training_size
        from engine.index_tuning import ExactNeighbours, TuningConfig, held_out_ids, tune_index

        info = self.pending_model() if pending else self.model_info()
        if info is None:
            raise IndexMissingError(f"no library in {self.paths.home} yet")
        store = self.store
        ids = store.pending_ids() if pending else store.embedding_ids()
        config = config or self.index_config()
        if factory == AUTO_INDEX:
            factory = self.plan_index(len(ids), info.dim, config=config).factory
        index = VectorIndex.build(info.dim, factory)
        read = store.get_pending if pending else store.get_embeddings
        if not index.is_trained:
            if not len(ids):
                return VectorIndex.build(info.dim, "Flat")  # nothing to train on yet: exact until there is
            _check_list_count(factory, len(ids))
            size = min(sample or training_size(factory, len(ids)), len(ids))
            chosen = np.sort(np.random.default_rng(seed).choice(ids, size=size, replace=False))
            index.train(read(chosen, info.dim)[1])
        tuning = TuningConfig(target=config.recall, seed=seed)
        truth = None
        if tune and not index.is_exact and len(ids) > tuning.k + 1:
            query_ids, queries = read(held_out_ids(ids, tuning.queries, seed + 1), info.dim)
            truth = ExactNeighbours(queries, query_ids, tuning.k)
        try:
            for start in range(0, len(ids), 20000):
                got, vectors = read(ids[start:start + 20000], info.dim)
                index.add(vectors, got)
                if truth is not None:
                    truth.add(got, vectors)
            if index.ntotal:  # a type that builds and trains but cannot answer is refused here, not by a query
                index.search(vectors[:1], 1)
        except RuntimeError as exc:
            raise EngineError(f"index type {factory!r} cannot be used: {str(exc).splitlines()[0]}") from None
        index.built_rows = index.ntotal
        if truth is not None:
            settings = tune_index(index, lambda wanted: read(wanted, info.dim), truth.queries, truth.query_ids, truth,
                                  tuning)
            log.info("index %s tuned: %s, re-ranking %d, recall@%d %.3f (target %.3f)", factory,
                     settings.params or "defaults", settings.rerank, settings.k, settings.recall or 0, settings.target)
        return index

    def save_index(self, index: VectorIndex, *, generation: int | None = None, epoch: int | None = None) -> None:
        """Save the index with a record of the database generation, the embeddings epoch and the
        encoder identity it reflects, and of the file itself (size, mtime, checksum: only a file
        matching it is ever read back). Both files are written atomically, the record first; it
        keeps the record of the file it replaces, so a crash in between leaves both consistent.

        generation, epoch: the ones the index reflects when it was built from an earlier read
        (default: the current ones, right for a writer holding the write lock). Recording an older
        generation is always safe: the next open just reconciles by id; an older epoch makes the
        next open rebuild it. Temporary files left by a writer that died mid-save are deleted."""
        self.require_writable()
        self.paths.home.mkdir(parents=True, exist_ok=True)
        if generation is None:
            generation = self.store.generation()
        if epoch is None:
            epoch = self.store.embeddings_epoch()
        info = self.model_info()
        for stale in stale_temp_files(self.paths.home):
            with contextlib.suppress(OSError):
                stale.unlink()
        state = {"generation": generation, "ntotal": index.ntotal, "factory": index.factory, "epoch": epoch,
                 "model": info.identity if info is not None else None, "search": index.settings.to_dict(),
                 "built_rows": index.built_rows}
        previous = self._read_state()  # the record of the file on disk, which stays valid until it is replaced

        def record(saved: IndexFileInfo) -> None:  # before the new file replaces the old one: see home_files
            write_atomic(self.paths.index_state, json.dumps(dict(state, file=saved.to_dict(), previous=previous or None)))
            fault_point("index-state-written")

        started = time.monotonic()
        index.save(self.paths.index, before_replace=record)
        self.saved_index(time.monotonic() - started)
        fault_point("index-replaced")

    # -- locking -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def write_lock(self, on_wait: Callable[[], None] | None = None, *, wait: bool = True) -> Iterator[None]:
        """Hold the library's write lock: a second writer waits (after calling ``on_wait``) or, with
        wait=False, gets LockError. Readers never take it. Re-entrant within one Library object
        (``engine doctor --repair`` re-ingests changed files while holding it). Raises
        ReadOnlyError, before touching anything, when the library is opened read-only."""
        self.require_writable()
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        self.paths.home.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # no advisory locks on this platform: single writer assumed
            yield
            return
        with open(self.paths.lock, "a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    raise LockError(f"another process is writing to the library in {self.paths.home}") from None
                if on_wait:
                    on_wait()
                fcntl.flock(fh, fcntl.LOCK_EX)
            with contextlib.ExitStack() as shared:
                if self.database_url is not None:  # other homes may write this database: its own lock too
                    try:
                        shared.enter_context(self.store.write_lock(wait=wait, on_wait=on_wait))
                    except StoreLockedError:
                        fcntl.flock(fh, fcntl.LOCK_UN)
                        raise LockError(f"another process is writing to the library in {self.store.where}") from None
                self._lock_depth = 1
                try:
                    yield
                finally:
                    self._lock_depth = 0
                    fcntl.flock(fh, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
