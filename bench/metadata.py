"""The SQLite store through ``MetadataStore``: bulk insert rate, ingest's per-batch commit rate
and fetch latency by id."""

from __future__ import annotations

import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from bench.errors import BenchError
from bench.timing import percentiles


def synthetic_rows(n: int, start: int = 0) -> list[dict[str, Any]]:
    """``n`` image rows shaped like a camera's photos, distinct paths and hashes from ``start`` on."""
    taken = datetime(2024, 5, 1, 12, 0, 0)
    return [{"path": f"/photos/{i // 1000:04d}/IMG_{i:07d}.jpg", "content_hash": f"{i:064x}", "bytes": 2_000_000 + i,
             "mtime": 1.7e9 + i, "width": 4000, "height": 3000, "format": "JPEG", "taken_at": taken,
             "camera": "Bench Camera"} for i in range(start, start + n)]


def timed_insert(store: Any, rows: int) -> tuple[list[int], float]:
    """Insert ``rows`` synthetic rows into ``store`` (a MetadataStore) in one bulk call: (their ids,
    seconds taken). Raises BenchError when the store returns another number of ids."""
    t0 = time.perf_counter()
    ids = store.insert_rows(synthetic_rows(rows))
    seconds = time.perf_counter() - t0
    if len(ids) != rows:
        raise BenchError(f"insert_rows of {rows} rows returned {len(ids)} ids")
    return ids, seconds


def bench_metadata(n_rows: int = 50_000, *, batch_size: int = 32, dim: int = 1280, batches: int = 50,
                   k: int = 10, repeats: int = 200, seed: int = 0) -> dict[str, Any]:
    """SQLite via ``MetadataStore``: bulk ``insert_rows`` of ``n_rows`` rows in one call (rows/s);
    ingest-like ``write_batch`` of ``batch_size`` rows + float32 [batch_size, dim] vectors per
    transaction, ``batches`` times (rows/s); and fetch of ``k`` random records by id (p50/p99 ms).
    Raises BenchError when the store gives back another number of ids or records than asked."""
    from db.store import MetadataStore

    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(prefix="engine-bench-") as tmp:
        store = MetadataStore.for_file(Path(tmp) / "bulk.db")
        try:
            ids, bulk_s = timed_insert(store, n_rows)
            samples = []
            for _ in range(repeats):
                wanted = rng.choice(ids, size=min(k, len(ids)), replace=False).tolist()
                t0 = time.perf_counter()
                got = store.get_images(wanted)
                samples.append(time.perf_counter() - t0)
                if len(got) != len(wanted):
                    raise BenchError(f"get_images of {len(wanted)} ids returned {len(got)} records")
        finally:
            store.close()
        store = MetadataStore.for_file(Path(tmp) / "batches.db")
        try:
            vectors = rng.standard_normal((batch_size, dim), dtype=np.float32)
            t0 = time.perf_counter()
            for b in range(batches):
                store.write_batch(synthetic_rows(batch_size, b * batch_size), vectors)
            batch_s = time.perf_counter() - t0
        finally:
            store.close()
    return {"rows": n_rows, "bulk_seconds": round(bulk_s, 3), "bulk_rows_per_s": round(n_rows / bulk_s),
            "batch_size": batch_size, "batches": batches, "batch_ms": round(batch_s / batches * 1000, 2),
            "batch_rows_per_s": round(batches * batch_size / batch_s), "fetch": dict(percentiles(samples), k=k)}
