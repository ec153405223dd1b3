"""The vector index: FAISS with ids equal to database row ids (``IDMap2``), inner product on
L2-normalised vectors (cosine similarity), saved atomically.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from engine.atomic import atomic_path

from engine.errors import CorruptFileError, EngineError


def _faiss():
    import faiss

    return faiss


def _as_vectors(embeddings: np.ndarray, dim: int) -> np.ndarray:
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != dim:
        raise EngineError(f"vectors of shape {x.shape} do not fit an index of dimension {dim}")
    return x


class VectorIndex:
    """A FAISS index keyed by int64 ids. Scores are inner products (cosine on unit vectors)."""

    def __init__(self, index, factory: str):
        self._index = index
        self.factory = factory

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
        """Train the quantiser of IVF/PQ indexes (no-op for Flat/HNSW); embeddings float32 [N, D]."""
        if not self._index.is_trained:
            self._index.train(_as_vectors(embeddings, self.dim))

    def add(self, embeddings: np.ndarray, ids: np.ndarray) -> None:
        """Add float32 [N, D] unit vectors under int64 [N] ids (the database row ids)."""
        x = _as_vectors(embeddings, self.dim)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(ids) != len(x):
            raise EngineError(f"{len(ids)} ids for {len(x)} vectors")
        if len(x):
            self._index.add_with_ids(x, ids)

    def remove(self, ids) -> int:
        """Remove vectors by id; returns how many were removed."""
        ids = np.ascontiguousarray(list(ids), dtype=np.int64)
        if not len(ids):
            return 0
        return int(self._index.remove_ids(ids))

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
