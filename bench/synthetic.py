"""Synthetic vectors for the index and query sections, their exact neighbours, and recall.

Uniform noise would make every approximate index look hopeless, so the vectors have the structure
of image embeddings instead: unit vectors around cluster centres, spread along a shared
low-dimensional subspace, plus isotropic noise. Recall figures on them are of the same kind as on
real embeddings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

import numpy as np

if TYPE_CHECKING:
    from engine.index import VectorIndex


class SyntheticEmbeddings:
    """Unit vectors float32 [n, dim] with the structure of image embeddings: ``clusters`` centres,
    spread along a shared ``intrinsic``-dimensional subspace, plus isotropic noise.

    The structure is fixed by ``seed``; ``sample(n, seed)`` draws independent points from it, so
    queries (another seed) come from the same distribution as the database without being in it.
    """

    def __init__(self, dim: int, seed: int = 0, clusters: int = 256, intrinsic: int = 64,
                 spread: float = 0.8, noise: float = 0.3):
        rng = np.random.default_rng(seed)
        self.dim = int(dim)
        r = min(intrinsic, dim)
        self.centres = (rng.standard_normal((clusters, dim), dtype=np.float32) / np.sqrt(dim)).astype(np.float32)
        basis, _ = np.linalg.qr(rng.standard_normal((dim, r)).astype(np.float32))
        self.basis = np.ascontiguousarray(basis.T * (spread / np.sqrt(r)), dtype=np.float32)  # [r, dim]
        self.noise = float(noise) / np.sqrt(dim)

    def sample(self, n: int, seed: int) -> np.ndarray:
        """``n`` unit vectors float32 [n, dim], drawn with ``seed``."""
        rng = np.random.default_rng(seed)
        labels = rng.integers(0, len(self.centres), n)
        z = rng.standard_normal((n, self.basis.shape[0]), dtype=np.float32)
        x = self.centres[labels] + z @ self.basis
        x += rng.standard_normal((n, self.dim), dtype=np.float32) * np.float32(self.noise)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    def chunks(self, n: int, seed: int, chunk: int = 50_000) -> Iterator[np.ndarray]:
        """``n`` vectors in slices of ``chunk`` (so a million never exist twice in memory)."""
        for i, start in enumerate(range(0, n, chunk)):
            yield self.sample(min(chunk, n - start), seed * 1_000_003 + i)


def exact_neighbours(database: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Row positions int64 [Q, k] of the exact top-k of float32 [N, D] ``database`` for each of
    float32 [Q, D] ``queries`` by inner product (FAISS brute force)."""
    import faiss

    flat = faiss.IndexFlatIP(database.shape[1])
    flat.add(np.ascontiguousarray(database, dtype=np.float32))
    return flat.search(np.ascontiguousarray(queries, dtype=np.float32), k)[1]


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / k, for int64 id arrays [Q, k] of the same shape
    (-1, FAISS's "no result", never matches a true id): FAISS's own
    ``knn_intersection_measure``."""
    from faiss.contrib.evaluation import knn_intersection_measure

    from bench.errors import BenchError

    if found.shape != truth.shape:
        raise BenchError(f"result table of shape {found.shape} against ground truth of shape {truth.shape}")
    return float(knn_intersection_measure(found, truth))


def build_synthetic_index(n: int, dim: int, factory: str = "Flat", *, seed: int = 0,
                          gen: SyntheticEmbeddings | None = None) -> "VectorIndex":
    """A ``VectorIndex`` holding ``n`` synthetic unit vectors under ids 1..n, built in slices
    (trained on the first slice when the index type needs training)."""
    from engine.index import VectorIndex

    gen = gen or SyntheticEmbeddings(dim, seed)
    index = VectorIndex.build(dim, factory)
    start = 1
    for chunk in gen.chunks(n, seed + 1):
        if not index.is_trained:
            index.train(chunk)
        index.add(chunk, np.arange(start, start + len(chunk), dtype=np.int64))
        start += len(chunk)
    return index
