"""Compressed IVF index families compared with exact re-ranking, on densified real embeddings: the
sweep behind the index policy's choice of 8-bit PQ at 1280-d, SQ8 where it fits
(``engine/index_policy.py``).

Per FAISS factory (4-bit fast-scan PQ ``PQ64x4fs``, 8-bit PQ without polysemous training
``PQ64np``, ``SQ8``, ``SQ4``, OPQ and PCA rotations in front of them): train and add seconds, bytes
per vector of the serialized index, then for each nprobe of a ladder the single-query search time
(asking for the deepest re-ranking depth's candidates) and recall@k after re-scoring the top R
candidates exactly, for each depth R. The cheapest (nprobe, R) whose recall reaches the target is
picked by a cost model: the search time plus R candidates at ``candidate_ms`` each (fetching a
stored vector and a dot product: about 5 us on the development machine).

The indexes are built by FAISS directly, not through ``VectorIndex``: the point is to compare types
the engine does not build (4-bit codes, rotations) on equal terms. Re-ranking scores the float32
vectors themselves. Recall counts a re-ranked hit as found when its exact score reaches the k-th
exact score (ties are found), against brute force (``bench.scale_data.exact_knn``).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from bench.errors import BenchError
from bench.scale_data import DEFAULT_CACHE, Densifier, exact_knn, fit_dimension, real_embeddings

DATA_SEED = 1  # the seeds the policy's figures were measured with: rows, then queries
QUERY_SEED = 999
SCORE_SLACK = 1e-6  # float32 rounding between the brute-force scores and the re-ranking's


@dataclass(frozen=True)
class FamiliesConfig:
    """One sweep. n vectors of ``dim`` (densified from the real embeddings cached in ``cache``);
    ``factories``: FAISS factory strings (empty: ``default_factories(n)``); ``queries`` fresh
    queries; ``nprobes``: the nprobe ladder (values past an index's list count are skipped);
    ``rerank``: re-ranking depths R (ascending; the deepest is how many candidates are asked for);
    ``target``: the recall@k a setting must reach to be picked; ``stop_recall``: the sweep of a
    factory stops at the first nprobe whose deepest recall reaches it; ``candidate_ms``: the cost
    model's price of re-ranking one candidate; ``train_per_list``: training vectors per inverted
    list (a random sample); ``threads``: FAISS's."""

    n: int = 100_000
    dim: int = 1280
    k: int = 10
    queries: int = 300
    factories: tuple[str, ...] = ()
    nprobes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    rerank: tuple[int, ...] = (10, 20, 40, 80, 160, 320)
    target: float = 0.95
    stop_recall: float = 0.99
    candidate_ms: float = 0.005
    train_per_list: int = 64
    threads: int = 1
    seed: int = 0
    cache: Path = DEFAULT_CACHE


def family_lists(n: int) -> int:
    """The inverted-list count of the default factories for ``n`` vectors: 4 sqrt(n) rounded to a
    power of two in log scale (1,024 at 100,000; 4,096 at 1,000,000)."""
    return 2 ** round(math.log2(4 * math.sqrt(max(1, n))))


def default_factories(n: int) -> tuple[str, ...]:
    """The families compared by default, with ``family_lists(n)`` lists."""
    ivf = f"IVF{family_lists(n)}"
    return (f"{ivf},PQ64x4fs", f"{ivf},PQ128x4fs", f"{ivf},PQ320x4fs", f"OPQ64_256,{ivf},PQ64x4fs",
            f"PCAR256,{ivf},PQ64x4fs", f"{ivf},SQ8", f"{ivf},SQ4", f"{ivf},PQ64np", f"OPQ64_256,{ivf},PQ64np")


@contextlib.contextmanager
def faiss_threads(threads: int | None) -> Iterator[int]:
    """Run the block with FAISS's OpenMP thread count set to ``threads`` (None or 0: as it is),
    restoring the previous count afterwards. Yields the count in force."""
    import faiss

    before = faiss.omp_get_max_threads()
    if threads:
        faiss.omp_set_num_threads(int(threads))
    try:
        yield int(threads or before)
    finally:
        faiss.omp_set_num_threads(before)


def reranked_recall(queries: np.ndarray, database: np.ndarray, candidates: np.ndarray, kth: np.ndarray,
                    k: int) -> float:
    """Recall@k of re-scoring ``candidates`` (row positions int64 [Q, R], -1 for none) exactly:
    queries float32 [Q, D] against database float32 [N, D]; ``kth``: the k-th best exact score of
    each query, float32 [Q]. The share of the k best re-scored candidates whose score reaches it."""
    held = candidates >= 0
    scores = np.einsum("qd,qrd->qr", queries, database[np.where(held, candidates, 0)])
    scores[~held] = -np.inf
    top = -np.sort(-scores, axis=1)[:, :k]
    if top.shape[1] < k:  # fewer candidates than hits: the missing ones are not found
        top = np.pad(top, ((0, 0), (0, k - top.shape[1])), constant_values=-np.inf)
    return float(np.mean(top >= kth[:, None] - SCORE_SLACK))


def _nlist(index: Any) -> int | None:
    """The list count of ``index``'s inverted file (inside any rotation), None when it has none."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    return None if ivf is None else int(ivf.nlist)


def _nprobes(index: Any, ladder: Sequence[int]) -> list[int | None]:
    """The nprobe values to sweep on ``index``: the ladder up to its list count; [None] (its one
    way of searching) when it has no inverted file."""
    nlist = _nlist(index)
    if nlist is None:
        return [None]
    return [p for p in ladder if p <= nlist] or [nlist]


def measure_family(factory: str, database: np.ndarray, queries: np.ndarray, kth: np.ndarray,
                   config: FamiliesConfig) -> dict[str, Any]:
    """One factory's row: build it (inner product) over ``database`` float32 [N, D] (ids = row
    positions), trained on a seeded sample of ``config.train_per_list`` vectors per list, then sweep
    nprobe x re-ranking depth with ``queries`` float32 [Q, D] against ``kth`` float32 [Q] (each
    query's k-th exact score). Raises BenchError when FAISS cannot build or train it."""
    import faiss

    n, dim = database.shape
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise BenchError(f"FAISS cannot build {factory!r}: {str(exc).splitlines()[0]}") from None
    rng = np.random.default_rng(config.seed)
    sample = database[np.sort(rng.choice(n, min(n, config.train_per_list * family_lists(n)), replace=False))]
    t0 = time.perf_counter()
    try:
        index.train(sample)
    except RuntimeError as exc:
        reason = str(exc).splitlines()[0]
        raise BenchError(f"{factory!r} cannot be trained on {len(sample)} vectors: {reason}") from None
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    index.add(database)  # ids are row positions
    add_s = time.perf_counter() - t0
    bytes_per_vector = len(faiss.serialize_index(index)) / n
    depths = tuple(sorted(config.rerank))
    deepest = min(depths[-1], n)
    sweep: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    for nprobe in _nprobes(index, config.nprobes):
        if nprobe is not None:
            faiss.ParameterSpace().set_index_parameters(index, f"nprobe={nprobe}")
        t0 = time.perf_counter()
        for i in range(len(queries)):
            index.search(queries[i:i + 1], deepest)
        search_ms = (time.perf_counter() - t0) / len(queries) * 1e3
        _, found = index.search(queries, deepest)
        recalls = {depth: reranked_recall(queries, database, found[:, :depth], kth, config.k) for depth in depths}
        sweep.append({"nprobe": nprobe, "search_ms": round(search_ms, 3),
                      "recall": {depth: round(r, 4) for depth, r in recalls.items()}})
        for depth, recall in recalls.items():
            cost = search_ms + depth * config.candidate_ms
            if recall >= config.target and (best is None or cost < best["cost_ms"]):
                best = {"cost_ms": round(cost, 3), "nprobe": nprobe, "rerank": depth, "recall": round(recall, 4),
                        "search_ms": round(search_ms, 3)}
        if recalls[depths[-1]] >= config.stop_recall:  # deeper probing only costs time from here
            break
    return {"factory": factory, "train_s": round(train_s, 2), "add_s": round(add_s, 2),
            "bytes_per_vector": round(bytes_per_vector, 1), "best": best, "sweep": sweep}


def family_data(config: FamiliesConfig, real: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(database float32 [n, dim], queries float32 [queries, dim]): the real embeddings cached in
    ``config.cache`` (or ``real`` float32 [N, D]) brought to ``dim`` and densified, with the seeds
    the policy's figures were measured with."""
    real = fit_dimension(real_embeddings(config.cache) if real is None else real, config.dim)
    densifier = Densifier(real)
    database = np.concatenate(list(densifier.chunks(config.n, seed=DATA_SEED)))
    return database, densifier.sample(config.queries, seed=QUERY_SEED)


def bench_index_families(config: FamiliesConfig = FamiliesConfig(), *, database: np.ndarray | None = None,
                         queries: np.ndarray | None = None) -> dict[str, Any]:
    """The whole sweep (see the module's docstring): {"facts", "rows"}, one row per factory
    (``measure_family``). ``database`` float32 [N, D] and ``queries`` float32 [Q, D] (unit rows)
    replace the densified real embeddings when both are given (then ``config.n``, ``dim`` and
    ``queries`` are theirs)."""
    if (database is None) != (queries is None):
        raise BenchError("give both the database and the queries, or neither")
    if database is None or queries is None:
        database, queries = family_data(config)
        data = "real embeddings densified (bench.scale_data)"
    else:
        data = "given vectors"
    database = np.ascontiguousarray(database, np.float32)
    queries = np.ascontiguousarray(queries, np.float32)
    n = len(database)
    if n <= config.k or not len(queries):
        raise BenchError(f"need more than {config.k} vectors and at least one query, got {n} and {len(queries)}")
    factories = config.factories or default_factories(n)
    with faiss_threads(config.threads) as threads:
        scores, _ = exact_knn([database], queries, config.k)
        kth = np.ascontiguousarray(scores[:, -1], np.float32)
        rows = [measure_family(f, database, queries, kth, config) for f in factories]
    return {"facts": {"n": n, "dim": int(database.shape[1]), "k": config.k, "queries": len(queries),
                      "threads": threads, "data": data, "rerank": list(sorted(config.rerank)),
                      "target": config.target, "candidate_ms": config.candidate_ms},
            "rows": rows}


def format_families(results: dict[str, Any]) -> str:
    """The sweep as text: per factory its build and size, the cheapest setting reaching the target,
    and under it the recall at each depth per nprobe."""
    from bench.report import text_table

    f = results["facts"]
    k, depths = f["k"], f["rerank"]
    lines = [f"{f['n']:,} x {f['dim']}-d ({f['data']}), {f['queries']} queries, {f['threads']} FAISS thread(s); "
             f"cost = search ms + {f['candidate_ms']} ms a re-ranked candidate; target recall@{k} {f['target']}"]
    lines += text_table(["factory", "train s", "add s", "bytes/vector", "cheapest: nprobe", "re-ranked",
                         f"recall@{k}", "search ms", "cost ms"],
                        [[r["factory"], r["train_s"], r["add_s"], r["bytes_per_vector"],
                          *([b["nprobe"] or "-", b["rerank"], b["recall"], b["search_ms"], b["cost_ms"]]
                            if (b := r["best"]) else ["not reached", "", "", "", ""])] for r in results["rows"]])
    for r in results["rows"]:
        lines += ["", f"{r['factory']}: recall@{k} after re-ranking R candidates"]
        lines += text_table(["nprobe", "search ms", *[f"R={d}" for d in depths]],
                            [[s["nprobe"] or "-", s["search_ms"], *[s["recall"][d] for d in depths]]
                             for s in r["sweep"]])
    return "\n".join(lines)
