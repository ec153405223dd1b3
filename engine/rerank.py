"""Exact re-ranking: an index whose scores come from compressed codes (IVF-PQ, SQ, OPQ) finds
candidates; their stored vectors, fetched from the database by primary key, score them exactly.
So compression costs recall only where a true neighbour is not among the candidates (which the
tuning in ``engine.index_tuning`` makes rare), and every score shown is an exact cosine.

``search_exact`` is the search every ranking goes through (``engine.filters.rank_hits``: `engine
query` and the service); for an index with exact scores it is the index's own search.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from db.vectors import widen

if TYPE_CHECKING:
    from db.store import MetadataStore
    from engine.index import VectorIndex


def exact_scores(queries: np.ndarray, ids: np.ndarray, found_ids: np.ndarray,
                 found_vectors: np.ndarray) -> np.ndarray:
    """Exact inner products of each query with its candidates: queries float32 [Q, D], ids int64
    [Q, R] (-1 for no candidate), ``found_ids`` int64 [M] with their vectors [M, D] (the
    candidates that have a stored vector): float32, or float16 as stored (``MetadataStore.get_stored``),
    widened here a query's candidates at a time. Returns float32 [Q, R]; -inf where the candidate
    is -1 or has no stored vector (an image removed since the index was read)."""
    out = np.full(ids.shape, -np.inf, np.float32)
    if not len(found_ids):
        return out
    order = np.argsort(found_ids, kind="stable")
    sorted_ids = found_ids[order]
    slot = np.searchsorted(sorted_ids, ids)
    slot = np.minimum(slot, len(sorted_ids) - 1)
    present = (ids >= 0) & (sorted_ids[slot] == ids)
    rows = order[slot]
    for q in range(len(ids)):  # one small product per query: never a [Q, R, D] gather in memory
        hit = present[q]
        if hit.any():
            # widening a query's few candidates stays in cache; widening all M at once (60k x 1280
            # at 1M photos) cost 4.5 us a vector in memory traffic, more than fetching it
            out[q, hit] = widen(found_vectors[rows[q, hit]]) @ queries[q]
    return out


def rerank(store: MetadataStore, queries: np.ndarray, ids: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Re-score candidates exactly from their stored vectors and sort each row by that score:
    queries float32 [Q, D], ids int64 [Q, R]. Returns (scores float32 [Q, R], ids int64 [Q, R]),
    best first; candidates without a stored vector end each row as id -1, score -inf."""
    wanted = np.unique(ids[ids >= 0])
    found_ids, found_vectors = store.get_stored(wanted.tolist(), dim) if len(wanted) else \
        (np.zeros(0, np.int64), np.zeros((0, dim), np.float32))
    scores = exact_scores(np.ascontiguousarray(queries, np.float32), ids, found_ids, found_vectors)
    order = np.argsort(-scores, axis=1, kind="stable")
    scores = np.take_along_axis(scores, order, 1)
    ids = np.take_along_axis(ids, order, 1)
    ids = np.where(np.isneginf(scores), -1, ids)
    return scores, ids


def candidate_depth(index: VectorIndex, depth: int) -> int:
    """How many candidates a search of ``depth`` hits asks ``index`` for: ``depth`` itself when
    its scores are exact, else as many as its tuned re-ranking depth says (never fewer than
    ``depth``), at most what it holds."""
    if index.exact_scores:
        return depth
    return max(depth, min(index.ntotal, index.settings.rerank_depth(depth)))


def search_exact(store: MetadataStore, index: VectorIndex, queries: np.ndarray,
                 depth: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``depth`` best hits per query by exact score: queries float32 [Q, D]. Returns (scores
    float32 [Q, depth], ids int64 [Q, depth]) as ``VectorIndex.search`` does (-1 / -inf past the
    end). An index with compressed scores is asked for ``candidate_depth`` candidates, which are
    re-scored from the stored vectors (ids no longer stored are dropped)."""
    if index.exact_scores:
        return index.search(queries, depth)
    scores, ids = index.search(queries, candidate_depth(index, depth))
    scores, ids = rerank(store, queries, ids, index.dim)
    return scores[:, :depth], ids[:, :depth]
