"""The index policy's rungs as the engine builds and searches them: each through a real library
(SQLite store, saved and re-read index file, tuning to the recall target, exact re-ranking from
the stored float16 vectors), on densified real embeddings (``bench.scale_data``).

Per run: the rung ``auto`` chose for n x dim within the memory budget (or a type given by hand),
seconds to commit the rows and to build the index (choose, train on a random sample, add, tune,
save), bytes per vector of the index file and of the database, the tuned settings, recall@k of the
whole search on fresh queries (not in the library) against brute force over the stored vectors,
single-query p50/p99 and batch queries/s, searched by a second ``Library`` that reads the saved
file, as ``engine query`` does.

Recall counts a hit as found when its exact score reaches the k-th exact score (ties are found).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from bench.errors import BenchError
from bench.index_families import DATA_SEED, QUERY_SEED, faiss_threads
from bench.scale import database_bytes
from bench.scale_data import DEFAULT_CACHE, Densifier, exact_knn, fit_dimension, real_embeddings
from bench.timing import percentiles

if TYPE_CHECKING:
    from engine.library import Library

SCORE_SLACK = 1e-5  # the search's scores and brute force's come from the same float16 vectors, summed apart
WARM_QUERIES = 5  # first-touch page faults and lazy set-up are no part of a query


@dataclass(frozen=True)
class RungConfig:
    """One run: n densified vectors of ``dim`` (from the real embeddings cached in ``cache``),
    committed ``chunk`` rows a transaction; ``memory_budget``: bytes the index may use (None: the
    engine's default); ``factory``: a FAISS type given by hand instead of ``auto``; ``queries``
    fresh queries, each also timed alone; ``threads``: FAISS's, for building and searching."""

    n: int = 100_000
    dim: int = 1280
    k: int = 10
    queries: int = 300
    memory_budget: int | None = None
    factory: str | None = None
    threads: int = 1
    chunk: int = 10_000
    cache: Path = DEFAULT_CACHE


def rung_data(config: RungConfig, real: np.ndarray | None = None) -> tuple[Iterator[np.ndarray], np.ndarray]:
    """(the n rows as float32 [chunk, dim] slices, queries float32 [queries, dim]): the real
    embeddings cached in ``config.cache`` (or ``real`` float32 [N, D]) brought to ``dim`` and
    densified, with the seeds the policy's figures were measured with."""
    real = fit_dimension(real_embeddings(config.cache) if real is None else real, config.dim)
    densifier = Densifier(real)
    return densifier.chunks(config.n, seed=DATA_SEED, chunk=config.chunk), densifier.sample(config.queries, QUERY_SEED)


def _new_library(home: Path, dim: int, config: RungConfig) -> Library:
    """An empty library in ``home`` for ``dim``-wide vectors committed directly (its encoder is
    never loaded), of index type ``auto`` within the budget, or the type given by hand."""
    from engine.config import AUTO_INDEX
    from engine.library import Library
    from engine.model_switch import ModelInfo

    library = Library(home, device="cpu")
    if library.exists():
        raise BenchError(f"{home} already holds a library: a run needs an empty home")
    library.store.set_meta("model", ModelInfo(spec="pretrained", identity="densified", backbone="none", dim=dim,
                                              input_size=(3, 8, 8)).to_dict())
    library.set_index_options(factory=config.factory or AUTO_INDEX, memory_budget=config.memory_budget)
    return library


def _commit(library: Library, parts: Iterator[np.ndarray], first: int = 0) -> np.ndarray:
    """Commit each float32 [rows, dim] slice of ``parts`` as new photos (one transaction a slice),
    as ingest commits them; returns the new row ids, int64 [n]."""
    ids: list[int] = []
    position = first
    for part in parts:
        rows = [{"path": f"/photos/{position + i:07d}.jpg", "content_hash": f"{position + i:064x}", "bytes": 1,
                 "mtime": 1.0} for i in range(len(part))]
        ids += library.store.write_batch(rows, np.ascontiguousarray(part, np.float32))[0]
        position += len(part)
    return np.asarray(ids, np.int64)


def measure_rung(home: str | os.PathLike, config: RungConfig = RungConfig(), *, database: np.ndarray | None = None,
                 queries: np.ndarray | None = None) -> dict[str, Any]:
    """One run in the empty library home ``home`` (see the module's docstring), returning its row.
    ``database`` float32 [N, D] and ``queries`` float32 [Q, D] (unit rows) replace the densified
    real embeddings when both are given (then ``config.n``, ``dim`` and ``queries`` are theirs).
    Raises BenchError (or the engine's EngineError) when the library cannot be made or searched."""
    from engine.library import Library
    from engine.rerank import search_exact

    if (database is None) != (queries is None):
        raise BenchError("give both the database and the queries, or neither")
    if database is None or queries is None:
        parts, queries = rung_data(config)
        n, dim, data = config.n, config.dim, "real embeddings densified (bench.scale_data)"
    else:
        database = np.ascontiguousarray(database, np.float32)
        parts = (database[s:s + config.chunk] for s in range(0, len(database), config.chunk))
        n, dim, data = len(database), int(database.shape[1]), "given vectors"
    queries = np.ascontiguousarray(queries, np.float32)
    if n <= config.k or not len(queries):
        raise BenchError(f"need more than {config.k} vectors and at least one query, got {n} and {len(queries)}")
    k = config.k
    with faiss_threads(config.threads) as threads:
        writer = _new_library(Path(home), dim, config)
        try:
            t0 = time.perf_counter()
            ids = _commit(writer, parts)
            commit_s = time.perf_counter() - t0
            plan = writer.plan_index(len(ids), dim)
            with writer.write_lock():
                t0 = time.perf_counter()
                # auto: the first update builds the planned rung, tunes and saves it, as ingest's does
                writer.rebuild_index(config.factory) if config.factory else writer.update_index()
                build_s = time.perf_counter() - t0
            _, stored = writer.store.get_embeddings(ids, dim)  # what a search re-ranks with: float16-rounded
            exact_scores, _ = exact_knn([stored], queries, k)
            del stored
            kth = exact_scores[:, -1]
            index_bytes = writer.paths.index.stat().st_size
            stored_bytes = database_bytes(writer)
        finally:
            writer.close()
        reader = Library(home, device="cpu")  # the saved file and its settings, read back
        try:
            index = reader.open_index()
            store = reader.store
            search_exact(store, index, queries[:WARM_QUERIES], k)
            single = []
            for i in range(len(queries)):
                t0 = time.perf_counter()
                search_exact(store, index, queries[i:i + 1], k)
                single.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            scores, _ = search_exact(store, index, queries, k)
            batch_s = time.perf_counter() - t0
            factory, settings = index.factory, index.settings.to_dict()
        finally:
            reader.close()
    times = percentiles(single)
    return {"n": n, "dim": dim, "data": data, "memory_budget": config.memory_budget, "rung": plan.rung,
            "factory": factory, "settings": settings, "threads": threads, "queries": len(queries),
            "commit_s": round(commit_s, 2), "build_s": round(build_s, 2),
            "index_bytes_per_vector": round(index_bytes / n, 1), "db_bytes_per_photo": round(stored_bytes / n, 1),
            f"recall@{k}": round(float(np.mean(scores >= kth[:, None] - SCORE_SLACK)), 4),
            "single_p50_ms": times["p50_ms"], "single_p99_ms": times["p99_ms"],
            "queries_per_s": round(len(queries) / batch_s, 1), "loadavg": list(os.getloadavg())}


def bench_index_rung(config: RungConfig = RungConfig(), *, work_dir: str | os.PathLike | None = None,
                     keep: bool = False, database: np.ndarray | None = None,
                     queries: np.ndarray | None = None) -> dict[str, Any]:
    """``measure_rung`` in a new temporary library home (under ``work_dir``, default the system's
    temporary folder), removed afterwards unless ``keep``; the row gets ``home`` when kept."""
    home = Path(tempfile.mkdtemp(prefix="engine-rung-", dir=work_dir))
    try:
        row = measure_rung(home, config, database=database, queries=queries)
    finally:
        if not keep:
            shutil.rmtree(home, ignore_errors=True)
    return dict(row, home=os.fspath(home)) if keep else row


def format_rung(row: dict[str, Any]) -> str:
    """A run as text: one table row and the tuned settings."""
    from bench.report import text_table

    k = next(key for key in row if key.startswith("recall@")).split("@")[1]
    s = row["settings"]
    tuned = "exact" if not s.get("params") and not s.get("rerank") else \
        f"{s.get('params') or 'default search'}, {s.get('rerank') or 0} re-ranked (tuning recall {s.get('recall')})"
    lines = [f"{row['n']:,} x {row['dim']}-d ({row['data']}), {row['queries']} fresh queries, "
             f"{row['threads']} FAISS thread(s), budget {row['memory_budget'] or 'default'}; load {row['loadavg']}"]
    lines += text_table(["rung", "type", "commit s", "build s", f"recall@{k}", "1-query p50 ms", "p99 ms",
                         "queries/s", "index B/vector", "database B/photo"],
                        [[row["rung"], row["factory"], row["commit_s"], row["build_s"], row[f"recall@{k}"],
                          row["single_p50_ms"], row["single_p99_ms"], row["queries_per_s"],
                          row["index_bytes_per_vector"], row["db_bytes_per_photo"]]])
    lines.append(f"  tuned: {tuned}")
    if row.get("home"):
        lines.append(f"  library kept in {row['home']}")
    return "\n".join(lines)
