"""A million photos, vectors only: the index the engine chooses and tunes for itself, against
hnswlib and FAISS's HNSW32, on densified real embeddings (``bench.scale_data``).

Per contender: build seconds, bytes per vector of its saved file, recall@k against exact search of
held-out queries (``faiss.contrib.evaluation.knn_intersection_measure``), single-query p50/p99 and
batch queries/s, all with the same threads. The engine's search is the one ``engine query`` runs
(``engine.rerank.search_exact``: the index, then exact re-ranking of its candidates from the
stored vectors where the index's scores are compressed), against a real metadata store holding the
vectors as a library does. Its build includes choosing, training, adding and tuning to the recall
target (the engine does all of it whenever it builds an index).

hnswlib is tuned to the same recall: for each M asked for, the smallest ef whose recall@k on a
separate set of tuning queries reaches the engine's measured recall; the fastest M is the one the
target is judged against. FAISS HNSW32 gets its efSearch the same way. Tuning never sees the
evaluation queries.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from bench.errors import BenchError
from bench.scale_data import (DEFAULT_CACHE, Densifier, ModelRef, exact_knn, fit_dimension, neighbour_cosine,
                              open_database, real_embeddings, slices, write_database)
from bench.synthetic import recall_at_k
from bench.timing import percentiles
from engine.index_tuning import DEFAULT_RECALL

if TYPE_CHECKING:
    from engine.progress import ProgressFn


SearchFn = Callable[[np.ndarray, int], np.ndarray]
"""search(queries float32 [Q, D], k) -> row positions int64 [Q, k] (-1 for none)."""


@dataclass(frozen=True)
class ScaleConfig:
    """n vectors of ``dim``; ``queries`` held-out evaluation queries, ``tune_queries`` others for
    tuning hnswlib and FAISS HNSW (the engine tunes itself on its stored vectors); ``single``:
    how many of the evaluation queries are also timed one by one; ``threads``: for every
    contender, build and search (None: the cores this process may use); ``hnsw_m``: hnswlib's M
    values tried; ``ef_construction``: hnswlib's; ``recall``: the engine's target."""

    n: int = 1_000_000
    dim: int = 1280
    k: int = 10
    queries: int = 1000
    tune_queries: int = 500
    single: int = 200
    threads: int | None = None
    hnsw_m: tuple[int, ...] = (16, 32)
    ef_construction: int = 100
    faiss_hnsw: bool = True
    recall: float = DEFAULT_RECALL
    memory_budget: int | None = None
    seed: int = 0
    cache: Path = DEFAULT_CACHE


@dataclass
class Row:
    """One contender's figures (JSON-ready through ``to_dict``)."""

    name: str
    config: str
    build_s: float
    bytes_per_vector: float
    recall: float
    single: dict[str, float]
    queries_per_s: float
    notes: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, k: int) -> dict[str, Any]:
        return {"name": self.name, "config": self.config, "build_s": round(self.build_s, 2),
                "bytes_per_vector": round(self.bytes_per_vector, 1), f"recall@{k}": round(self.recall, 4),
                "single_p50_ms": self.single["p50_ms"], "single_p99_ms": self.single["p99_ms"],
                "queries_per_s": round(self.queries_per_s, 1), **self.notes}


# -- measuring -----------------------------------------------------------------------------------
def measure(search: SearchFn, queries: np.ndarray, truth: np.ndarray, k: int, single: int) -> tuple[float, dict, float]:
    """(recall@k of the batch answer against ``truth`` int64 [Q, k], single-query percentiles over
    the first ``single`` queries, batch queries/s of all of them, best of two runs)."""
    search(queries[:2], k)  # warm: first-touch page faults and lazy set-up are no part of a query
    batch_s = float("inf")
    for _ in range(2):  # the best of two: the first also pages in the stored vectors it re-ranks
        t0 = time.perf_counter()
        found = search(queries, k)
        batch_s = min(batch_s, time.perf_counter() - t0)
    samples = []
    for q in queries[:single]:
        t1 = time.perf_counter()
        search(q[None], k)
        samples.append(time.perf_counter() - t1)
    return recall_at_k(np.asarray(found, np.int64), truth), percentiles(samples), len(queries) / batch_s


def smallest_setting(values: Sequence[int], recall_of: Callable[[int], float], target: float) -> tuple[int, float]:
    """The smallest of ``values`` (ascending) whose ``recall_of`` reaches ``target``, by bisection
    (recall grows with the setting), with its recall; the largest value when none reaches it."""
    lo, hi = 0, len(values) - 1
    best = (values[hi], recall_of(values[hi]))
    if best[1] < target:
        return best
    while lo < hi:  # values[hi] reaches the target throughout, and ``best`` is it
        mid = (lo + hi) // 2
        got = recall_of(values[mid])
        if got >= target:
            hi, best = mid, (values[mid], got)
        else:
            lo = mid + 1
    return best


EF_LADDER = (10, 12, 16, 20, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 256, 320, 384, 512, 640, 768, 1024)


def _file_bytes(save: Callable[[str], None]) -> int:
    """Bytes of what ``save(path)`` writes (into a temporary folder beside the cache)."""
    with tempfile.TemporaryDirectory(prefix="engine-scale-") as tmp:
        path = os.path.join(tmp, "index")
        save(path)
        return os.path.getsize(path)


# -- hnswlib and FAISS HNSW ----------------------------------------------------------------------
def _shape(parts: Sequence[np.ndarray]) -> tuple[int, int]:
    return sum(len(p) for p in parts), int(parts[0].shape[1])


def bench_hnswlib(parts: Sequence[np.ndarray], m: int, config: ScaleConfig, queries: np.ndarray, truth: np.ndarray,
                  tune: np.ndarray, tune_truth: np.ndarray, target: float, threads: int) -> Row:
    """hnswlib (inner product) with ``m`` links, built from the rows of ``parts`` (float32
    [rows, dim] each, read in slices), ef tuned on ``tune`` to ``target``, measured on
    ``queries``."""
    import hnswlib

    n, dim = _shape(parts)
    index = hnswlib.Index(space="ip", dim=dim)
    t0 = time.perf_counter()
    index.init_index(max_elements=n, M=m, ef_construction=config.ef_construction, random_seed=config.seed)
    start = 0
    for part in slices(parts):
        index.add_items(part, np.arange(start, start + len(part)), num_threads=threads)
        start += len(part)
    build_s = time.perf_counter() - t0
    k = config.k

    def search(q: np.ndarray, kk: int) -> np.ndarray:
        return index.knn_query(q, k=kk, num_threads=threads)[0].astype(np.int64)

    def recall_of(ef: int) -> float:
        index.set_ef(max(ef, k))
        return recall_at_k(search(tune, k), tune_truth)

    ef, tuned = smallest_setting(EF_LADDER, recall_of, target)
    index.set_ef(max(ef, k))
    recall, single, qps = measure(search, queries, truth, k, config.single)
    size = _file_bytes(index.save_index)
    return Row("hnswlib", f"M={m},efC={config.ef_construction},ef={ef}", build_s, size / n, recall, single, qps,
               {"tune_recall": round(tuned, 4)})


def bench_faiss_hnsw(parts: Sequence[np.ndarray], config: ScaleConfig, queries: np.ndarray, truth: np.ndarray,
                     tune: np.ndarray, tune_truth: np.ndarray, target: float, m: int = 32) -> Row:
    """FAISS ``HNSW32`` (inner product, FAISS's default efConstruction) of the rows of
    ``parts``, efSearch tuned on ``tune`` to ``target``, measured on ``queries``."""
    import faiss

    n, dim = _shape(parts)
    index = faiss.IndexHNSWFlat(dim, m, faiss.METRIC_INNER_PRODUCT)
    t0 = time.perf_counter()
    for part in slices(parts):
        index.add(part)
    build_s = time.perf_counter() - t0
    k = config.k

    def search(q: np.ndarray, kk: int) -> np.ndarray:
        return index.search(q, kk)[1]

    def recall_of(ef: int) -> float:
        index.hnsw.efSearch = max(ef, k)
        return recall_at_k(search(tune, k), tune_truth)

    ef, tuned = smallest_setting(EF_LADDER, recall_of, target)
    index.hnsw.efSearch = max(ef, k)
    recall, single, qps = measure(search, queries, truth, k, config.single)
    size = _file_bytes(lambda path: faiss.write_index(index, path))
    return Row("faiss", f"HNSW{m},efC={index_ef_construction()},efSearch={ef}", build_s, size / n, recall, single,
               qps, {"tune_recall": round(tuned, 4)})


def index_ef_construction() -> int:
    """FAISS's default efConstruction for HNSW (what ``HNSW32`` builds with)."""
    import faiss

    return int(faiss.IndexHNSWFlat(4, 32).hnsw.efConstruction)


# -- the engine --------------------------------------------------------------------------------
def imported_library(folder: Path, model_spec: str, home: Path, n: int,
                     factory: str | None = None) -> tuple[dict[str, Any], bool]:
    """The library in ``home`` holding the ``n`` rows of the shard folder ``folder``, made by the
    engine's own import (``ingest.importer.import_shards``, as ``engine import`` runs it; given
    index type ``factory`` first when one is asked for, else the engine chooses) unless it already
    holds them. Returns (the import's report, or {} when reused; whether it was made)."""
    from engine.library import Library
    from ingest.importer import import_shards

    library = Library(home, device="cpu")
    try:
        if library.exists() and library.store.count() == n:
            return {}, False
        if factory is not None and not library.exists():
            library.set_model(model_spec, index_factory=factory)
        report = import_shards(library, folder, model=model_spec)
        if report.failed or library.store.count() != n:
            raise BenchError(f"the import of {folder} into {home} failed: {report.failed[:1] or 'rows missing'}")
        return report.to_dict(), True
    finally:
        library.close()


def bench_engine(home: Path, n: int, config: ScaleConfig, queries: np.ndarray, truth: np.ndarray,
                 factory: str | None = None, *, built_s: float | None = None) -> Row:
    """The engine's index of the library in ``home`` (its rows in import order), searched as
    ``engine query`` searches. ``built_s``: the index was just built from the stored vectors (by
    the import) in this many seconds; else it is rebuilt as ``engine reindex`` does it (of type
    ``factory`` when given, else ``auto``: the type the engine chooses, tuned to
    ``config.recall``) and that is timed. Either is the same work: choose, train on a random
    sample, add every stored vector, tune, save."""
    from engine.library import Library
    from engine.rerank import search_exact
    from ingest.reindex import reindex_library

    library = Library(home, device="cpu")
    try:
        ids = library.store.embedding_ids()
        if len(ids) != n or ids[-1] - ids[0] + 1 != n:  # positions are ids - first id
            raise BenchError(f"the library in {home} does not hold rows 1..{n} in import order")
        first = int(ids[0])
        build_s = built_s
        if build_s is None:
            t0 = time.perf_counter()
            reindex_library(library, factory=factory or "auto", memory_budget=config.memory_budget,
                            recall=config.recall)
            build_s = time.perf_counter() - t0
        index = library.open_index()
        store = library.store

        def search(q: np.ndarray, k: int) -> np.ndarray:
            found = search_exact(store, index, q, k)[1]
            return np.where(found >= 0, found - first, -1)

        recall, single, qps = measure(search, queries, truth, config.k, config.single)
        settings = getattr(index, "settings", None)
        notes = {"tuned": settings.to_dict() if settings is not None else None,
                 "store_bytes_per_vector": round(database_bytes(library) / n, 1),
                 "built_by": "engine import" if built_s is not None else "engine reindex"}
        size = library.paths.index.stat().st_size
        return Row("engine", index.factory, build_s, size / n, recall, single, qps, notes)
    finally:
        library.close()


def database_bytes(library: Any) -> int:
    """Bytes of the library's database files (the SQLite file and its journals)."""
    base = library.paths.database
    return sum(p.stat().st_size for p in base.parent.glob(base.name + "*") if p.is_file())


# -- the whole comparison ------------------------------------------------------------------------
def search_threads(config: ScaleConfig) -> int:
    from bench.machine import usable_cores

    return int(config.threads or usable_cores() or 1)


def prepare_data(config: ScaleConfig, progress: ProgressFn | None = None, *, real: np.ndarray | None = None,
                 model: ModelRef | None = None) -> dict[str, Any]:
    """The vectors of the run: the real embeddings (embedded once; or ``real``, float32 [N, D]),
    densified into ``config.n`` rows in a shard folder claiming ``model`` (default: the
    pretrained encoder, or a projection of it; see ``model_for``), the evaluation and tuning
    queries drawn apart from them, and the exact neighbours of both (cached beside the shards).
    JSON-ready facts under ``facts``; arrays and paths under the other keys."""
    from bench.scale_data import model_for

    real = fit_dimension(real_embeddings(config.cache) if real is None else real, config.dim, config.seed)
    densifier = Densifier(real)
    model = model or model_for(config.dim, config.cache)
    folder = write_database(densifier, config.n, model, config.cache, seed=config.seed + 1, progress=progress)
    parts = open_database(folder)
    queries = densifier.sample(config.queries, seed=config.seed + 1001)
    tune = densifier.sample(config.tune_queries, seed=config.seed + 2002)
    cached = folder / f"truth-k{config.k}-q{config.queries}-t{config.tune_queries}-s{config.seed}.npz"
    t0 = time.perf_counter()
    if cached.exists():
        saved = np.load(cached, allow_pickle=False)
        scores, truth, tune_truth = saved["scores"], saved["truth"], saved["tune_truth"]
    else:
        both_scores, both = exact_knn(parts, np.concatenate([queries, tune]), config.k)
        scores, truth, tune_truth = both_scores[:len(queries)], both[:len(queries)], both[len(queries):]
        np.savez(cached, scores=scores, truth=truth, tune_truth=tune_truth)
    facts = {"n": config.n, "dim": config.dim, "k": config.k, "queries": config.queries,
             "tune_queries": config.tune_queries, "real_vectors": len(real), "shards": os.fspath(folder),
             "model": model.spec, "neighbour_cosine": neighbour_cosine(scores),
             "exact_search_s": round(time.perf_counter() - t0, 2)}
    return {"facts": facts, "folder": folder, "parts": parts, "model": model, "queries": queries,
            "truth": truth, "tune": tune, "tune_truth": tune_truth}


def run_scale(config: ScaleConfig = ScaleConfig(), *, engine_factory: str | None = None,
              progress: ProgressFn | None = None, real: np.ndarray | None = None,
              model: ModelRef | None = None) -> dict[str, Any]:
    """The whole comparison (see the module's docstring): {"facts", "import", "rows", "target"}.
    ``engine_factory``: build this FAISS type instead of the engine's own choice (for trying
    alternatives; the target is judged either way); ``real``, ``model``: see ``prepare_data``."""
    import faiss

    threads = search_threads(config)
    faiss.omp_set_num_threads(threads)
    data = prepare_data(config, progress, real=real, model=model)
    k = config.k
    home = config.cache / f"lib-{data['folder'].name}"
    imported, made = imported_library(data["folder"], data["model"].spec, home, config.n, engine_factory)
    # the import built the index the library asks for; with other tuning settings, rebuild it
    as_imported = made and config.recall == DEFAULT_RECALL and config.memory_budget is None
    engine = bench_engine(home, config.n, config, data["queries"], data["truth"], engine_factory,
                          built_s=imported["stages"]["index"] if as_imported else None)
    target = max(engine.recall, config.recall)  # hnswlib is tuned to at least what the engine reached
    rows = [engine]
    for m in config.hnsw_m:
        rows.append(bench_hnswlib(data["parts"], m, config, data["queries"], data["truth"], data["tune"],
                                  data["tune_truth"], target, threads))
    if config.faiss_hnsw:
        rows.append(bench_faiss_hnsw(data["parts"], config, data["queries"], data["truth"], data["tune"],
                                     data["tune_truth"], target))
    hnsw = [r for r in rows if r.name == "hnswlib"]
    best = max(hnsw, key=lambda r: r.queries_per_s) if hnsw else None
    verdict = None
    if best is not None:
        verdict = {"hnswlib": best.config, "recall_ok": engine.recall >= config.recall,
                   "qps_ratio": round(engine.queries_per_s / best.queries_per_s, 3),
                   "build_ratio": round(engine.build_s / best.build_s, 3) if best.build_s else None}
        verdict["met"] = bool(verdict["recall_ok"] and verdict["qps_ratio"] >= 1.0
                              and (verdict["build_ratio"] or 0) <= 1.0)
    return {"facts": dict(data["facts"], threads=threads), "import": imported,
            "rows": [r.to_dict(k) for r in rows], "target": verdict}


def format_scale(results: dict[str, Any]) -> str:
    """The comparison as text: the data, one table row per contender, the target's verdict."""
    from bench.report import text_table

    f = results["facts"]
    k = f["k"]
    cos = f["neighbour_cosine"]
    lines = [f"{f['n']:,} x {f['dim']}-d vectors densified from {f['real_vectors']:,} real embeddings; "
             f"{f['queries']} held-out queries ({f['tune_queries']} others tune hnswlib/FAISS), "
             f"{results['facts']['threads']} threads",
             f"nearest-neighbour cosine of a query: median {cos['nn1_p50']} (p10 {cos['nn1_p10']}, "
             f"p90 {cos['nn1_p90']}); {k}th neighbour {cos['nnk_p50']}"]
    imported = results.get("import") or {}
    if imported:
        lines.append(f"library made by engine import: {imported['added']:,} rows in {imported['seconds']} s "
                     f"({imported['rows_per_second']:,.0f} rows/s)")
    lines += text_table(["index", "configuration", "build s", "bytes/vector", f"recall@{k}", "1-query p50 ms",
                         "p99 ms", "queries/s"],
                        [[r["name"], r["config"], r["build_s"], r["bytes_per_vector"], r[f"recall@{k}"],
                          r["single_p50_ms"], r["single_p99_ms"], r["queries_per_s"]] for r in results["rows"]])
    engine = results["rows"][0]
    if engine.get("tuned") and engine["tuned"].get("queries"):  # an exact index is not tuned
        t = engine["tuned"]
        lines.append(f"  engine: tuned {t.get('params') or 'default search'}, re-ranking {t.get('rerank') or 'none'}, "
                     f"recall@{t.get('k')} {t.get('recall')} on its own held-out stored vectors; its stored vectors "
                     f"(database) {engine['store_bytes_per_vector']} bytes/vector beside the index")
    v = results.get("target")
    if v:
        lines.append(f"target (engine at recall >= 0.95: >= 1.0x the QPS of hnswlib {v['hnswlib']}, build no slower): "
                     f"QPS ratio {v['qps_ratio']}, build ratio {v['build_ratio']}: "
                     + ("MET" if v["met"] else "NOT MET"))
    return "\n".join(lines)
