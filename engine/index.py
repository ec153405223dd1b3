"""The vector index: FAISS with ids equal to database row ids (``IDMap2``), inner product on
L2-normalised vectors (cosine similarity), saved atomically.

FAISS is imported on first use, so importing this module costs nothing at start-up.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np

from engine.atomic import atomic_path
from engine.errors import CorruptFileError, EngineError

if TYPE_CHECKING:
    import faiss as faiss_module


def _faiss():
    import faiss

    return faiss


def _as_vectors(embeddings: np.ndarray, dim: int) -> np.ndarray:
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != dim:
        raise EngineError(f"vectors of shape {x.shape} do not fit an index of dimension {dim}")
    return x


def _as_ids(ids: Iterable[int] | np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int64)


class VectorIndex:
    """A FAISS index keyed by int64 ids. Scores are inner products (cosine on unit vectors)."""

    def __init__(self, index: "faiss_module.Index", factory: str):
        """index: a FAISS ``IndexIDMap2`` over the real index; factory: the factory string after
        ``IDMap2`` (what is recorded beside the file)."""
        self._index = index
        self.factory = factory
        self._removable: bool | None = None  # probed once, on first question

    @classmethod
    def build(cls, dim: int, factory: str = "Flat") -> "VectorIndex":
        """An empty index of ``dim`` dimensions from a FAISS factory string (``Flat``, ``HNSW32``,
        ``IVF1024,Flat``, ``IVF1024,PQ32`` ...), wrapped in ``IDMap2`` so ids are ours."""
        faiss = _faiss()
        try:
            index = faiss.index_factory(int(dim), f"IDMap2,{factory}", faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise EngineError(f"bad index type {factory!r}: {str(exc).splitlines()[0]}") from None
        return cls(index, factory)

    @classmethod
    def load(cls, path: str | os.PathLike, factory: str = "Flat") -> "VectorIndex":
        """Read an index file. Raises CorruptFileError naming the file when it cannot be read."""
        faiss = _faiss()
        try:
            index = faiss.read_index(os.fspath(path))
        except RuntimeError:
            raise CorruptFileError(
                f"index file {path} is unreadable; run `engine doctor --repair` to rebuild it from stored embeddings"
            ) from None
        if not hasattr(index, "id_map"):  # a FAISS file, but not one of ours: its ids are not row ids
            raise CorruptFileError(f"index file {path} holds no row ids; run `engine doctor --repair` to rebuild "
                                   "it from stored embeddings")
        return cls(index, factory)

    @property
    def dim(self) -> int:
        return int(self._index.d)

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    @property
    def is_trained(self) -> bool:
        return bool(self._index.is_trained)

    def train(self, embeddings: np.ndarray) -> None:
        """Train the quantiser of IVF/PQ indexes (no-op for Flat/HNSW); embeddings float32 [N, D].
        Raises EngineError when FAISS refuses (too few vectors for the number of centroids)."""
        if self._index.is_trained:
            return
        x = _as_vectors(embeddings, self.dim)
        try:
            self._index.train(x)
        except RuntimeError as exc:
            raise EngineError(f"cannot train index {self.factory!r} on {len(x)} vectors: "
                              f"{str(exc).splitlines()[0]}") from None

    def add(self, embeddings: np.ndarray, ids: np.ndarray) -> None:
        """Add float32 [N, D] unit vectors under int64 [N] ids (the database row ids)."""
        x = _as_vectors(embeddings, self.dim)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(ids) != len(x):
            raise EngineError(f"{len(ids)} ids for {len(x)} vectors")
        if len(x):
            self._index.add_with_ids(x, ids)

    @property
    def supports_removal(self) -> bool:
        """Whether vectors can be removed by id. Graph indexes (HNSW) cannot: an index of that type
        is rebuilt instead. Asked of FAISS itself, by removing nothing from the inner index."""
        if self._removable is None:
            faiss = _faiss()
            inner = faiss.downcast_index(self._index.index)
            try:
                inner.remove_ids(faiss.IDSelectorRange(0, 0))
            except RuntimeError:
                self._removable = False
            else:
                self._removable = True
        return self._removable

    @property
    def is_exact(self) -> bool:
        """True for a flat index, which holds the vectors as added (so they can be compared with
        the stored ones); the others hold them lossily or search approximately."""
        faiss = _faiss()
        return isinstance(faiss.downcast_index(self._index.index), faiss.IndexFlat)

    def remove(self, ids: Iterable[int] | np.ndarray) -> int:
        """Remove vectors by id (int64 [N]; unknown ids are ignored); returns how many were removed.
        Raises EngineError when this index type cannot remove (see ``supports_removal``)."""
        ids = _as_ids(ids)
        if not len(ids):
            return 0
        if not self.supports_removal:
            raise EngineError(f"an index of type {self.factory!r} cannot remove vectors; rebuild it instead")
        return int(self._index.remove_ids(ids))

    def replace_with(self, other: "VectorIndex") -> None:
        """Take over ``other``'s vectors and type in place, so every holder of this object sees the
        replacement (a rebuilt index standing in for one that could not remove)."""
        self._index, self.factory, self._removable = other._index, other.factory, other._removable

    def reconstruct(self, ids: Iterable[int] | np.ndarray) -> np.ndarray:
        """The vectors held under ``ids`` (int64 [N], each held): float32 [N, D]. Exact only for a
        flat index (``is_exact``). Raises EngineError for an id not held."""
        ids = _as_ids(ids)
        if not len(ids):
            return np.zeros((0, self.dim), np.float32)
        try:
            return np.asarray(self._index.reconstruct_batch(ids), np.float32).reshape(len(ids), self.dim)
        except RuntimeError as exc:
            raise EngineError(f"cannot read vectors back from the index: {str(exc).splitlines()[0]}") from None

    def set_search_parameters(self, params: str) -> None:
        """Set search-time parameters in FAISS ``ParameterSpace`` syntax (``nprobe=16``,
        ``efSearch=64``, comma-separated). Raises EngineError for one this index type lacks."""
        faiss = _faiss()
        try:
            faiss.ParameterSpace().set_index_parameters(self._index, params)
        except RuntimeError as exc:
            raise EngineError(f"index {self.factory!r} does not take {params!r}: {str(exc).splitlines()[0]}") from None

    def ids(self) -> np.ndarray:
        """All ids held, int64 [ntotal] (insertion order)."""
        faiss = _faiss()
        return faiss.vector_to_array(self._index.id_map).astype(np.int64)

    def search(self, embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product: returns (scores float32 [Q, k], ids int64 [Q, k]); slots past
        the number of stored vectors have id -1 and score -inf."""
        x = _as_vectors(embeddings, self.dim)
        k = max(1, int(k))
        if self.ntotal == 0:
            return np.full((len(x), k), -np.inf, np.float32), np.full((len(x), k), -1, np.int64)
        D, I = self._index.search(x, k)
        D = D.astype(np.float32)
        D[I < 0] = -np.inf
        return D, I.astype(np.int64)

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically: a temporary file in the same folder, fsynced, then renamed over the
        old one, so a crash leaves either the old index or the new one, never half of one."""
        faiss = _faiss()
        with atomic_path(path) as tmp:
            faiss.write_index(self._index, os.fspath(tmp))
        return Path(path)

    def memory_bytes(self) -> int:
        """Serialised size of the index in bytes (what it costs on disk and, roughly, in RAM)."""
        faiss = _faiss()
        return int(faiss.serialize_index(self._index).nbytes)
