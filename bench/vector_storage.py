"""What storing vectors as float16 costs (``db.vectors``): retrieval quality on real embeddings,
and bytes on disk per photo in a SQLite library.

Quality: the same embeddings searched as the encoder made them (float32) and as the store gives
them back (``as_stored``), leave-one-out: recall@10 of the stored search against the exact float32
one (the share of each query's 10 nearest neighbours it finds), and the class-label metrics of
``engine eval`` (MAP@R, recall@1, ...) on both. Size: a SQLite library of ``n`` synthetic rows
with ``dim``-d vectors, written as this engine writes it and as the previous one did (float32
blobs, SQLite's default 4 KB pages), then that old file after ``db.migrations`` upgraded it.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.metadata import synthetic_rows


def float16_cost(embeddings: np.ndarray, labels: np.ndarray, k: int = 10) -> dict[str, Any]:
    """embeddings: float32 [N, D], unit rows (the encoder's output); labels: int64 [N].

    Returns recall@k of search over the stored copies (queries and gallery both as stored, the
    worst case: a query by an indexed file against an index rebuilt from the store) against exact
    float32 search, the same with float32 queries (a new photo against that index), and the
    retrieval metrics of both versions with their differences (float32 minus stored)."""
    from db.vectors import as_stored
    from engine.metrics import knn, retrieval_metrics

    exact = np.ascontiguousarray(embeddings, np.float32)
    stored = as_stored(exact)
    _, truth = knn(exact, exact, k, exclude_self=True)

    def overlap(found: np.ndarray) -> float:
        return float(np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(found, truth)]))

    _, both_stored = knn(stored, stored, k, exclude_self=True)
    _, new_photo = knn(exact, stored, k, exclude_self=True)
    ks = (1, 5, 10)
    before = retrieval_metrics(exact, labels, ks)
    after = retrieval_metrics(stored, labels, ks)
    keys = ["recall@1", "recall@10", "map@r", "map"]
    return {"n": int(len(exact)), "dim": int(exact.shape[1]), "classes": int(len(np.unique(labels))),
            f"recall@{k}_stored_vs_exact": round(overlap(both_stored), 5),
            f"recall@{k}_new_photo_vs_exact": round(overlap(new_photo), 5),
            "float32": {key: round(before[key], 5) for key in keys},
            "float16": {key: round(after[key], 5) for key in keys},
            "cost": {key: round(before[key] - after[key], 5) for key in keys},
            "max_abs_component_error": float(np.abs(stored - exact).max())}


def _file_bytes(path: Path) -> int:
    """The database's size with its journal folded in (a checkpoint first, as a clean close does)."""
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return sum(os.path.getsize(p) for p in (path, Path(f"{path}-wal")) if p.exists())


def _write_library(path: Path, n: int, dim: int, batch: int, seed: int, *, previous: bool) -> float:
    """``n`` rows with unit vectors in batches of ``batch``; previous=True writes them as the
    previous engine did (4 KB pages, float32 blobs, schema 2). Returns the seconds taken."""
    import db.store as store_module
    from db.store import MetadataStore

    rng = np.random.default_rng(seed)
    page = store_module.SQLITE_PAGE_SIZE
    if previous:
        store_module.SQLITE_PAGE_SIZE = 4096
    try:
        store = MetadataStore.for_file(path)
    finally:
        store_module.SQLITE_PAGE_SIZE = page
    started = time.perf_counter()
    for start in range(0, n, batch):
        count = min(batch, n - start)
        vectors = rng.standard_normal((count, dim), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        if previous:
            ids = store.insert_rows(synthetic_rows(count, start))
            with contextlib.closing(sqlite3.connect(path)) as conn, conn:
                conn.executemany("INSERT INTO embeddings (image_id, vector) VALUES (?, ?)",
                                 [(i, v.astype("<f4").tobytes()) for i, v in zip(ids, vectors)])
        else:
            store.write_batch(synthetic_rows(count, start), vectors)
    seconds = time.perf_counter() - started
    store.close()
    if previous:
        with contextlib.closing(sqlite3.connect(path)) as conn, conn:
            conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    return seconds


def sqlite_bytes_per_photo(n: int = 50_000, dim: int = 1280, batch: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Bytes per photo of a SQLite library file (rows, indexes and vectors) of ``n`` rows of
    ``dim``-d vectors: as written now (float16), as the previous engine wrote it (float32), and
    that previous file once upgraded (vectors converted, then compacted into 8 KB pages)."""
    from db.store import MetadataStore

    out: dict[str, Any] = {"rows": n, "dim": dim}
    with tempfile.TemporaryDirectory(prefix="engine-bench-") as tmp:
        now, before = Path(tmp) / "float16.db", Path(tmp) / "float32.db"
        seconds = _write_library(now, n, dim, batch, seed, previous=False)
        out["float16"] = {"bytes_per_photo": round(_file_bytes(now) / n), "write_rows_per_s": round(n / seconds),
                          "page_size": _page_size(now)}
        seconds = _write_library(before, n, dim, batch, seed, previous=True)
        out["float32_previous"] = {"bytes_per_photo": round(_file_bytes(before) / n),
                                   "write_rows_per_s": round(n / seconds), "page_size": _page_size(before)}
        started = time.perf_counter()
        MetadataStore.for_file(before).close()  # the upgrade
        upgrade_s = time.perf_counter() - started
        out["float32_upgraded"] = {"bytes_per_photo": round(_file_bytes(before) / n), "upgrade_seconds": round(upgrade_s, 2),
                                   "page_size": _page_size(before)}
    out["vector_bytes"] = {"float16": dim * 2, "float32": dim * 4}
    return out


def _page_size(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        return int(conn.execute("PRAGMA page_size").fetchone()[0])
