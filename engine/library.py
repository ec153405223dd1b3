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
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from db.store import MetadataStore, StoreError
from engine.atomic import write_atomic
from engine.config import IndexConfig, LibraryPaths, default_home
from engine.errors import CorruptFileError, IndexMissingError, LockError, ModelError, ModelMismatchError
from engine.faults import fault_armed, fault_point
from engine.index import VectorIndex

if TYPE_CHECKING:  # torch: imported only by the methods that build an encoder
    from engine.encoder import Encoder

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


@dataclass(frozen=True)
class ModelInfo:
    """The encoder a library was built with, as remembered in its database."""

    spec: str
    identity: str
    backbone: str
    dim: int
    input_size: tuple[int, ...]
    weights_source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"spec": self.spec, "identity": self.identity, "backbone": self.backbone, "dim": self.dim,
                "input_size": list(self.input_size), "weights_source": self.weights_source}


class Library:
    """Open a library in ``home`` (default: ``$ENGINE_HOME``, see ``default_home``), created on first
    write. ``database_url`` overrides the default SQLite file with any SQLAlchemy URL; without one,
    ``$ENGINE_DATABASE_URL`` is used when set."""

    def __init__(self, home: str | os.PathLike | None = None, *, device: str = "auto",
                 database_url: str | None = None):
        self.paths = LibraryPaths(Path(home) if home else default_home())
        self.device = device
        self.database_url = database_url or os.environ.get(DATABASE_URL_ENV) or None
        self._store: MetadataStore | None = None
        self._encoder: Encoder | None = None
        self._lock_depth = 0

    # -- parts ---------------------------------------------------------------------------------
    @property
    def store(self) -> MetadataStore:
        """The MetadataStore, opened on first use (creating the home folder).

        A damaged database raises CorruptFileError naming the file, both here and from any later
        read; it is never overwritten."""
        if self._store is None:
            self.paths.home.mkdir(parents=True, exist_ok=True)
            url = self.database_url or f"sqlite:///{self.paths.database}"
            try:
                store = MetadataStore(url, on_corrupt=self._corrupt_database)
            except StoreError as exc:
                raise CorruptFileError(f"{exc} (`engine doctor` checks the whole library)") from None
            if fault_armed("commit"):  # a listener on every commit only when a crash test asks
                store.on_commit(lambda: fault_point("commit"))
            self._store = store
        return self._store

    @staticmethod
    def _corrupt_database(message: str) -> CorruptFileError:
        return CorruptFileError(f"{message}; it cannot be repaired automatically and is left untouched: restore a "
                                "backup, or move it aside and run `engine ingest PATH` again "
                                "(`engine doctor` checks the whole library)")

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
        return IndexConfig(factory=self.store.get_meta("index_factory", "Flat"))

    def encoder(self) -> Encoder:
        """The library's encoder, rebuilt from the checkpoint saved in its home (once, then kept)."""
        if self._encoder is None:
            from engine.encoder import load_checkpoint, resolve_device

            info = self.model_info()
            if info is None:
                raise IndexMissingError(f"no library in {self.paths.home} yet; run `engine ingest PATH` first")
            if not self.paths.encoder.exists():
                raise CorruptFileError(f"the library's encoder file {self.paths.encoder} is missing; "
                                       "run `engine doctor --repair` to restore it")
            try:
                encoder = load_checkpoint(self.paths.encoder, resolve_device(self.device))
            except ModelError as exc:
                raise CorruptFileError(f"{exc}; run `engine doctor --repair` to restore the library's encoder") from None
            if encoder.identity() != info.identity:  # queries would be compared with another model's vectors
                raise ModelMismatchError(f"encoder file {self.paths.encoder} is not the encoder this library's vectors "
                                         f"were made with ({info.spec}); run `engine doctor --repair`")
            self._encoder = encoder
        return self._encoder

    def forget_encoder(self) -> None:
        """Drop the encoder kept by ``encoder()``, so the next call reads the file in the home again
        (after something replaced that file)."""
        self._encoder = None

    def set_model(self, spec: str, *, backbone: str | None = None, weights: str | None = None,
                  index_factory: str | None = None) -> Encoder:
        """Give a new library its encoder (``pretrained`` or a checkpoint path), saved into its home.
        Returns the encoder. Does not touch existing vectors: ``reindex`` does that."""
        from engine.checkpoint import save_checkpoint
        from engine.encoder import load_encoder, resolve_device

        encoder = load_encoder(spec, resolve_device(self.device), backbone=backbone, weights=weights)
        self.paths.home.mkdir(parents=True, exist_ok=True)
        save_checkpoint(encoder, self.paths.encoder)
        info = ModelInfo(spec=spec if spec == "pretrained" else os.path.abspath(spec), identity=encoder.identity(),
                         backbone=encoder.config.backbone, dim=encoder.dim,
                         input_size=tuple(encoder.data_config["input_size"]),
                         weights_source=encoder.metadata.get("weights_source"))
        self.store.set_meta("model", info.to_dict())
        if index_factory is not None or self.store.get_meta("index_factory") is None:
            self.store.set_meta("index_factory", index_factory or "Flat")
        self._encoder = encoder
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
        if spec == "pretrained":
            same = info.spec == "pretrained"
        else:
            from engine.encoder import load_checkpoint

            same = load_checkpoint(spec, "cpu").identity() == info.identity
        if not same:
            raise ModelMismatchError(
                f"this library was built with {info.spec} (encoder {info.identity}); "
                f"use that model, or `engine reindex --model {spec}` to re-embed it")

    # -- index ---------------------------------------------------------------------------------
    def _read_state(self) -> dict[str, Any]:
        try:
            return json.loads(self.paths.index_state.read_text())
        except (OSError, ValueError):
            return {}

    def index_is_current(self, index: VectorIndex) -> bool:
        """True when the state file beside the index records the database's current generation and
        ``index``'s size: the index file was saved after the last database write."""
        state = self._read_state()
        return state.get("generation") == self.store.generation() and state.get("ntotal") == index.ntotal

    def read_index(self) -> VectorIndex:
        """The index file as it is on disk, not reconciled. Raises CorruptFileError when it is
        unreadable (a missing file included)."""
        return VectorIndex.load(self.paths.index, self.index_config().factory)

    def open_index(self, *, required: bool = True) -> VectorIndex | None:
        """The index, reconciled with the database when its recorded generation is stale.

        required=True raises IndexMissingError for a library with nothing in it (and never
        returns None)."""
        info = self.model_info()
        if info is None:
            if required:
                raise IndexMissingError(f"no index in {self.paths.home} yet; run `engine ingest PATH` first")
            return None
        if self.paths.index.exists():
            index = self.read_index()
            if index.dim != info.dim:
                raise CorruptFileError(f"index file {self.paths.index} has dimension {index.dim}, the library's "
                                       f"encoder {info.dim}; run `engine doctor --repair`")
            if not self.index_is_current(index):
                self.reconcile(index)
        else:
            generation = self.store.generation()
            index = self.rebuild_index(save=False)
            try:  # a reader saves the rebuilt index only while no writer is at work
                with self.write_lock(wait=False):
                    if not self.paths.index.exists():
                        self.save_index(index, generation=generation)
            except (LockError, OSError):
                pass
        if required and index.ntotal == 0 and self.store.count() == 0:
            raise IndexMissingError(f"the library in {self.paths.home} is empty; run `engine ingest PATH` first")
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
        """A fresh index from stored embeddings alone (no image is decoded). Raises EngineError when
        an IVF/PQ type cannot be trained on the vectors there are."""
        info = self.model_info()
        if info is None:
            raise IndexMissingError(f"no library in {self.paths.home} yet")
        factory = factory or self.index_config().factory
        generation = self.store.generation()  # taken first: the index holds at least this much
        index = VectorIndex.build(info.dim, factory)
        if not index.is_trained:
            # the first 100k stored vectors train the quantiser; only that slice is read for it
            first = next(self.store.iter_embeddings(info.dim, batch=100000), None)
            if first is None or len(first[1]) == 0:
                index = VectorIndex.build(info.dim, "Flat")  # nothing to train on yet
            else:
                index.train(first[1])
        for ids, vectors in self.store.iter_embeddings(info.dim):
            index.add(vectors, ids)
        if save:
            self.save_index(index, generation=generation)
        return index

    def save_index(self, index: VectorIndex, *, generation: int | None = None) -> None:
        """Save the index, then record the database generation it reflects (both atomically).

        generation: the one the index reflects when it was built from an earlier read (default: the
        current one, right for a writer holding the write lock). Recording an older generation is
        always safe: the next open just reconciles by id. Temporary files left by a writer that
        died mid-save are deleted."""
        self.paths.home.mkdir(parents=True, exist_ok=True)
        if generation is None:
            generation = self.store.generation()
        for stale in stale_temp_files(self.paths.home):
            with contextlib.suppress(OSError):
                stale.unlink()
        index.save(self.paths.index)
        fault_point("index-replaced")
        state = {"generation": generation, "ntotal": index.ntotal, "factory": index.factory}
        write_atomic(self.paths.index_state, json.dumps(state))

    # -- locking -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def write_lock(self, on_wait: Callable[[], None] | None = None, *, wait: bool = True) -> Iterator[None]:
        """Hold the library's write lock: a second writer waits (after calling ``on_wait``) or, with
        wait=False, gets LockError. Readers never take it. Re-entrant within one Library object
        (``engine doctor --repair`` re-ingests changed files while holding it)."""
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
