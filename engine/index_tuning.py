"""Tuning an index to a recall target: after it is built, measure recall@k of the whole search
(index search, then exact re-ranking where the index's scores are compressed) against exact
search, on a held-out random sample of the stored vectors used as queries, and take the cheapest
search settings (``nprobe`` / ``efSearch``, and the re-ranking depth) whose recall reaches the
target with 95 % confidence (``reaches``: the sample's recall, less its margin of error).

"Held out": each query is a stored vector, and its own id is left out of both the exact answer
and the index's, so it is measured as a photo the index has not seen would be, without building
a second index. A hit counts as found when its exact score reaches the k-th exact score (so ties
between identical vectors are no misses).

The exact answer is computed in chunks as the vectors stream past (``ExactNeighbours``), so the
build's one pass over the stored vectors serves both the index and the measurement.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from engine.config import DEFAULT_RECALL
from engine.index import SearchSettings
from engine.rerank import exact_scores

if TYPE_CHECKING:
    from engine.index import VectorIndex

log = logging.getLogger(__name__)

# Cost model for comparing settings that all reach the target (deterministic, so a rebuild of
# the same vectors tunes the same way). Nanoseconds, measured on this project's machine (2-core
# Xeon, one thread; see README "Index choice"): scanning one code of each kind, per dimension or
# per sub-quantiser; re-ranking one candidate (database fetch by primary key of a stored vector
# plus its inner product); one HNSW distance per dimension.
SCAN_NS = {"flat": 0.4, "sq": 0.5, "pq": 1.2, "pqfs": 0.06}  # per dimension (flat, sq) / sub-quantiser (pq)
RERANK_NS = 6000.0
GRAPH_NS_PER_DIM = 0.5
_TIE = 1e-5  # scores within this of the k-th exact score count as reaching it
# A setting counts as reaching the target only when the recall measured on the sample exceeds it by
# this many standard errors (one-sided 95 %): the sample is a few hundred queries, and a setting
# that only just reaches the target on it fell short on fresh queries (1M x 1280-d: 0.9517 on the
# sample, 0.939 on 1,000 new queries).
CONFIDENCE_Z = 1.645


@dataclass(frozen=True)
class TuningConfig:
    """target: recall@k to reach (0 < target <= 1); k: hits per search measured; queries: how
    many held-out stored vectors are searched; seed: which ones."""

    target: float = DEFAULT_RECALL
    k: int = 10
    queries: int = 400
    seed: int = 0


def reaches(recall: float, samples: int, target: float) -> bool:
    """Whether a recall measured over ``samples`` hits (queries x k) shows, with one-sided 95 %
    confidence, that the true recall is at least ``target`` (normal approximation: perfect
    recall always does)."""
    if recall >= 1.0:
        return True
    margin = CONFIDENCE_Z * math.sqrt(max(recall * (1.0 - recall), 0.0) / max(1, samples))
    return recall - margin >= target


def held_out_ids(ids: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """A seeded random sample of ``count`` of ``ids`` (int64), ascending; all of them when fewer."""
    ids = np.asarray(ids, np.int64)
    if len(ids) <= count:
        return np.sort(ids)
    return np.sort(np.random.default_rng(seed).choice(ids, size=count, replace=False))


class ExactNeighbours:
    """The exact top-k neighbours (by inner product) of fixed query vectors over a collection fed
    in chunks, each query's own id left out.

    queries: float32 [Q, D]; query_ids: int64 [Q] (the stored ids the queries are, or -1)."""

    def __init__(self, queries: np.ndarray, query_ids: np.ndarray, k: int):
        self.queries = np.ascontiguousarray(queries, np.float32)
        self.query_ids = np.asarray(query_ids, np.int64)
        self.k = int(k)
        self.scores = np.full((len(self.queries), self.k), -np.inf, np.float32)
        self.ids = np.full((len(self.queries), self.k), -1, np.int64)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Take a chunk into account: ids int64 [n], vectors float32 [n, D]."""
        if not len(ids) or not len(self.queries):
            return
        ids = np.asarray(ids, np.int64)
        scores = self.queries @ np.ascontiguousarray(vectors, np.float32).T  # [Q, n]
        scores[self.query_ids[:, None] == ids[None, :]] = -np.inf
        all_scores = np.concatenate([self.scores, scores], axis=1)
        all_ids = np.concatenate([self.ids, np.broadcast_to(ids, scores.shape)], axis=1)
        keep = np.argpartition(-all_scores, self.k - 1, axis=1)[:, :self.k] if all_scores.shape[1] > self.k \
            else np.arange(all_scores.shape[1])[None, :].repeat(len(all_scores), 0)
        self.scores = np.take_along_axis(all_scores, keep, 1)
        self.ids = np.take_along_axis(all_ids, keep, 1)

    def kth_scores(self) -> np.ndarray:
        """float32 [Q]: each query's k-th best exact score (-inf where fewer than k exist)."""
        return np.sort(self.scores, axis=1)[:, 0] if self.k else np.full(len(self.queries), -np.inf, np.float32)


def _ladder(top: int, start: int = 1) -> list[int]:
    """start, then steps of about sqrt(2) (1, 2, 3, 4, 6, 8, 12, 16, ...) up to ``top`` inclusive."""
    out, value = [], max(1, start)
    while value < top:
        out.append(value)
        nxt = value * 3 // 2 if (value & (value - 1)) == 0 else value * 4 // 3
        value = max(value + 1, nxt)
    out.append(top)
    return sorted(set(out))


def _knob(index: VectorIndex) -> tuple[str, list[int], Callable[[int], str], Callable[[int], float]] | None:
    """(name, values, params of a value, scan cost in ns of a value) of the search knob of
    ``index``'s type: nprobe for an inverted file, efSearch for a graph; None when it has none."""
    import faiss

    raw = index._index
    ivf = faiss.try_extract_index_ivf(faiss.downcast_index(raw.index) if index._mapped else raw)
    if ivf is not None:
        ivf = faiss.downcast_index(ivf)
        per_list = index.ntotal / max(1, ivf.nlist)
        code = _code_cost(ivf, index.dim)
        graph = isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSW)
        coarse = (ivf.nlist if not graph else 64 * 32) * index.dim * SCAN_NS["flat"]

        def params(p: int) -> str:
            return f"nprobe={p},quantizer_efSearch={max(64, 2 * p)}" if graph else f"nprobe={p}"

        return "nprobe", _ladder(ivf.nlist), params, lambda p: coarse + p * per_list * code
    inner = faiss.downcast_index(raw.index) if index._mapped else raw
    if isinstance(inner, faiss.IndexHNSW):
        m = inner.hnsw.nb_neighbors(0)
        return ("efSearch", _ladder(1024, 16), lambda e: f"efSearch={e}",
                lambda e: e * m * index.dim * GRAPH_NS_PER_DIM)
    return None


def _code_cost(ivf: object, dim: int) -> float:
    """Nanoseconds to score one code of the inverted file ``ivf`` (see SCAN_NS)."""
    import faiss

    if isinstance(ivf, faiss.IndexIVFPQFastScan):
        return ivf.pq.M * SCAN_NS["pqfs"]
    if isinstance(ivf, faiss.IndexIVFPQ):
        return ivf.pq.M * SCAN_NS["pq"]
    if isinstance(ivf, faiss.IndexIVFScalarQuantizer):
        return ivf.d * SCAN_NS["sq"]
    return ivf.d * SCAN_NS["flat"]


def _rerank_ladder(k: int, ntotal: int, exact: bool) -> list[int]:
    """Re-ranking depths to try: k alone when the index's scores are exact; else k to 64k."""
    if exact:
        return [k]
    return sorted({min(ntotal, k * m) for m in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)})


def _search_without_self(index: VectorIndex, queries: np.ndarray, query_ids: np.ndarray,
                         depth: int) -> np.ndarray:
    """The index's first ``depth`` candidates per query with the query's own id left out: int64
    [Q, depth] (-1 past the end)."""
    _, found = index.search(queries, min(index.ntotal, depth + 1))
    out = np.full((len(found), depth), -1, np.int64)
    for q, row in enumerate(found):
        row = row[row != query_ids[q]][:depth]
        out[q, :len(row)] = row
    return out


def recall_at(candidates: np.ndarray, scores: np.ndarray, kth: np.ndarray, k: int, depth: int) -> float:
    """Recall@k of a search that re-ranks its first ``depth`` candidates exactly: candidates int64
    [Q, R] in the index's order, ``scores`` their exact scores float32 [Q, R], ``kth`` float32 [Q]
    each query's k-th exact score. A found hit counts when it reaches ``kth``."""
    head = scores[:, :depth]
    top = -np.sort(-head, axis=1)[:, :k]
    if top.shape[1] < k:
        top = np.pad(top, ((0, 0), (0, k - top.shape[1])), constant_values=-np.inf)
    reachable = np.isfinite(kth)
    if not reachable.any():
        return 1.0
    return float(np.mean(top[reachable] >= kth[reachable, None] - _TIE))


def tune_index(index: VectorIndex, fetch: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
               queries: np.ndarray, query_ids: np.ndarray, truth: ExactNeighbours,
               config: TuningConfig = TuningConfig()) -> SearchSettings:
    """The cheapest search settings of ``index`` (its knob and, where its scores are compressed,
    the re-ranking depth) whose recall@k against ``truth`` reaches ``config.target``, applied to
    ``index`` and returned with the recall measured. When no setting reaches the target, the
    one with the highest recall is taken (and a warning logged).

    fetch(ids int64 [n]) -> (ids int64 [m], vectors float32 [m, D]): the stored vectors (for the
    exact re-ranking); queries float32 [Q, D] with their stored ids query_ids int64 [Q]; truth:
    the exact neighbours of the same queries over everything the index holds."""
    k = config.k
    if index.is_exact or index.ntotal == 0 or not len(queries):
        settings = SearchSettings(recall=1.0 if index.is_exact else None, target=config.target, k=k,
                                  queries=len(queries), rows=index.ntotal)
        index.apply(settings)
        return settings
    kth = truth.kth_scores()
    exact = index.exact_scores
    ladder = _rerank_ladder(k, index.ntotal, exact)
    short = [d for d in ladder if d <= 16 * k]  # deep enough almost always; the full ladder if not
    known = _KnownScores(len(queries))
    best, fallback = _sweep(index, short, queries, query_ids, fetch, known, kth, config)
    if best is None and short != ladder:
        best, fallback = _sweep(index, ladder, queries, query_ids, fetch, known, kth, config)
    if best is None:
        log.warning("index %s reaches recall@%d %.3f at most, below the target %.3f", index.factory, k, fallback[0],
                    config.target)
        recall, params, depth = fallback
    else:
        _, params, depth, recall = best
    settings = SearchSettings(params=params, rerank=depth, recall=round(recall, 4), target=config.target, k=k,
                              queries=len(queries), rows=index.ntotal)
    index.apply(settings)
    return settings


def _sweep(index: VectorIndex, depths: list[int], queries: np.ndarray, query_ids: np.ndarray,
           fetch: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], known: _KnownScores, kth: np.ndarray,
           config: TuningConfig) -> tuple[tuple[float, str, int, float] | None, tuple[float, str, int]]:
    """Raise ``index``'s knob value by value, measuring recall at each re-ranking depth of
    ``depths``: (the cheapest (cost, params, depth, recall) reaching the target or None, the
    (recall, params, depth) of the highest recall seen). Stops once a larger value cannot be
    cheaper than the best found, or recall is perfect."""
    k = config.k
    exact = index.exact_scores
    knob = _knob(index)
    best: tuple[float, str, int, float] | None = None
    fallback: tuple[float, str, int] = (-1.0, "", depths[-1])
    for value in knob[1] if knob else [0]:
        params = knob[2](value) if knob else ""
        scan = knob[3](value) if knob else 0.0
        if best is not None and scan + (0 if exact else depths[0] * RERANK_NS) >= best[0]:
            break  # every later value costs more than the best found
        if params:
            index.set_search_parameters(params)
        candidates = _search_without_self(index, queries, query_ids, depths[-1])
        scores = _exact_scores(queries, candidates, fetch, known)
        for depth in depths:
            recall = recall_at(candidates, scores, kth, k, depth)
            cost = scan + (0 if exact else depth * RERANK_NS)
            if reaches(recall, len(queries) * k, config.target) and (best is None or cost < best[0]):
                best = (cost, params, 0 if exact else depth, recall)
            if recall > fallback[0]:
                fallback = (recall, params, 0 if exact else depth)
        if fallback[0] >= 1.0 and best is not None:
            break
    return best, fallback


class _KnownScores:
    """Exact scores already computed, per query: sorted ids int64 and their scores float32, so
    raising the knob re-scores only the candidates it newly brings in."""

    def __init__(self, queries: int):
        self.ids = [np.zeros(0, np.int64) for _ in range(queries)]
        self.scores = [np.zeros(0, np.float32) for _ in range(queries)]

    def lookup(self, q: int, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(scores float32 [R], known bool [R]) of query ``q``'s ``candidates`` int64 [R]."""
        ids = self.ids[q]
        if not len(ids):
            return np.zeros(len(candidates), np.float32), np.zeros(len(candidates), bool)
        at = np.minimum(np.searchsorted(ids, candidates), len(ids) - 1)
        return self.scores[q][at], ids[at] == candidates

    def add(self, q: int, candidates: np.ndarray, scores: np.ndarray) -> None:
        ids, first = np.unique(np.concatenate([self.ids[q], candidates]), return_index=True)
        self.ids[q], self.scores[q] = ids, np.concatenate([self.scores[q], scores])[first]


def _exact_scores(queries: np.ndarray, candidates: np.ndarray,
                  fetch: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
                  known: _KnownScores, chunk: int = 20000) -> np.ndarray:
    """Exact scores float32 [Q, R] of ``candidates`` int64 [Q, R] (-inf for -1 or an id with no
    stored vector). Scores computed before are taken from ``known`` (and the new ones added), so
    only new candidates' vectors are fetched, ``chunk`` at a time (never all in memory at once)."""
    scores = np.full(candidates.shape, -np.inf, np.float32)
    fresh = candidates.copy()
    for q in range(len(candidates)):
        old, hit = known.lookup(q, candidates[q])
        scores[q, hit] = old[hit]
        fresh[q, hit] = -1
    computed = np.full(candidates.shape, -np.inf, np.float32)
    wanted = np.unique(fresh[fresh >= 0])
    for start in range(0, len(wanted), chunk):
        got_ids, vectors = fetch(wanted[start:start + chunk])
        np.maximum(computed, exact_scores(queries, fresh, got_ids, vectors), out=computed)
    new = fresh >= 0
    scores[new] = computed[new]
    for q in range(len(candidates)):
        if new[q].any():
            known.add(q, candidates[q, new[q]], computed[q, new[q]])
    return scores
