"""The metadata store on PostgreSQL against SQLite, measured through ``MetadataStore`` and a real
``engine query``: bulk insert (rows alone, and rows with their 1280-d vectors as an import writes
them), lookup of 10,000 paths (what ingest's plan does for every batch of files it walks), and the
metadata phase of a cold ``engine query`` (``bench.cold_query``: the process opens the database
and fetches the hits' records).

PostgreSQL runs on this machine over its Unix socket: a throw-away server (``tests/postgres.py``:
Debian's binaries, fsync off, which a write-heavy comparison must say), or one given by URL on
which the benchmark creates and drops databases of its own.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from bench.errors import BenchError
from bench.metadata import synthetic_rows, timed_insert


@contextlib.contextmanager
def postgres_databases(server_url: str | None = None) -> Iterator[Callable[[], str]]:
    """A factory of new, empty PostgreSQL databases (their SQLAlchemy URLs), all dropped at the
    end: on the server of ``server_url`` (a database URL whose user may create databases), else
    on a throw-away server started for the purpose and stopped at the end."""
    import psycopg
    from sqlalchemy.engine import make_url

    server = None
    if server_url is None:
        start_server = _server_starter()
        server = start_server()
        if isinstance(server, str):
            raise BenchError(server)
        server_url = server.url()
    base = make_url(server_url)
    made: list[str] = []

    def admin() -> psycopg.Connection:
        return psycopg.connect(base.set(drivername="postgresql").render_as_string(hide_password=False),
                               autocommit=True)

    def create() -> str:
        name = f"engine_bench_{uuid.uuid4().hex[:10]}"
        with admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        made.append(name)
        return base.set(database=name).render_as_string(hide_password=False)

    try:
        yield create
    finally:
        with contextlib.suppress(psycopg.Error), admin() as conn:
            for name in made:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if server is not None:
            server.stop()


def _server_starter() -> Callable[[], Any]:
    """``tests.postgres.start_server`` (the tests' throw-away server), importable from a checkout."""
    import sys

    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.append(root)
    try:
        from tests.postgres import start_server
    except ImportError:
        raise BenchError("no PostgreSQL server to start: pass --server-url, or run from a checkout "
                         "(tests/postgres.py starts one)") from None
    return start_server


def _unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def bench_store(url: str, *, rows: int = 50_000, vector_rows: int = 20_000, dim: int = 1280, batch: int = 1000,
                lookups: int = 10_000, repeats: int = 5) -> dict[str, Any]:
    """Through ``MetadataStore(url)`` on an empty database: ``insert_rows`` of ``rows`` rows in
    one call; ``write_batch`` of ``vector_rows`` rows with float32 [batch, dim] unit vectors,
    ``batch`` per transaction (as ``engine import`` writes); ``lookup_paths`` of ``lookups``
    indexed paths (best and median of ``repeats``, after one untimed call)."""
    from db.store import MetadataStore

    lookups = min(lookups, rows)
    store = MetadataStore(url)
    try:
        ids, bulk_s = timed_insert(store, rows)
        t0 = time.perf_counter()
        for start in range(0, vector_rows, batch):
            count = min(batch, vector_rows - start)
            store.write_batch(synthetic_rows(count, rows + start), _unit_vectors(count, dim, start))
        vectors_s = time.perf_counter() - t0
        wanted = [row["path"] for row in synthetic_rows(lookups, (rows - lookups) // 2)]
        store.lookup_paths(wanted)  # the first call also opens the connection
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            found = store.lookup_paths(wanted)
            samples.append(time.perf_counter() - t0)
            if len(found) != lookups:
                raise BenchError(f"lookup_paths of {lookups} indexed paths found {len(found)}")
    finally:
        store.close()
    return {"insert_rows_per_s": round(rows / bulk_s), "rows": rows,
            "write_batch_rows_per_s": round(vector_rows / vectors_s), "vector_rows": vector_rows, "dim": dim,
            "batch": batch, "lookup_paths": lookups, "lookup_ms_best": round(min(samples) * 1000, 1),
            "lookup_ms_median": round(statistics.median(samples) * 1000, 1)}


@contextlib.contextmanager
def _database_url(url: str | None) -> Iterator[None]:
    """``ENGINE_DATABASE_URL`` set to ``url`` (or unset) for the block: the cold query child reads it."""
    previous = os.environ.pop("ENGINE_DATABASE_URL", None)
    if url is not None:
        os.environ["ENGINE_DATABASE_URL"] = url
    try:
        yield
    finally:
        os.environ.pop("ENGINE_DATABASE_URL", None)
        if previous is not None:
            os.environ["ENGINE_DATABASE_URL"] = previous


def _query_library(home: Path, url: str | None, photos: list[str], extra_rows: int) -> str:
    """A library in ``home`` (database at ``url``, or the home's SQLite file): ``photos`` ingested
    with a tiny random-weight encoder (the model does not matter to the metadata phase), then
    ``extra_rows`` synthetic rows with vectors, so the tables have a realistic size; its index
    saved. Returns a photo to query with."""
    import torch

    from engine.checkpoint import save_checkpoint
    from engine.config import EncoderConfig
    from engine.encoder import build_encoder
    from engine.library import Library
    from ingest.pipeline import IngestConfig, ingest_paths

    torch.manual_seed(0)
    model = home.parent / "tiny-encoder.pt"
    if not model.exists():
        save_checkpoint(build_encoder(EncoderConfig(backbone="test_resnet", pretrained=False, image_size=32)), model)
    library = Library(home, device="cpu", database_url=url)
    try:
        ingest_paths(library, photos, IngestConfig(batch_size=32, workers=0), model=str(model))
        dim = library.model_info().dim
        for start in range(0, extra_rows, 5000):
            count = min(5000, extra_rows - start)
            library.store.write_batch(synthetic_rows(count, start), _unit_vectors(count, dim, start))
        with library.write_lock():
            library.save_index(library.open_index())
    finally:
        library.close()
    return photos[0]


def bench_query_metadata(url: str | None, photos: list[str], *, extra_rows: int = 20_000, runs: int = 3,
                         k: int = 10) -> dict[str, Any]:
    """The phases of a cold ``engine query`` (``bench.query.bench_cold_query``, best of ``runs``)
    of one indexed photo against a library of ``len(photos) + extra_rows`` rows whose database
    is ``url`` (None: the home's SQLite file): ``open_s`` (connecting, reading the schema and
    model), ``metadata_s`` (the hits' records), the search and the whole query."""
    from bench.query import bench_cold_query

    with tempfile.TemporaryDirectory(prefix="engine-bench-") as tmp:
        home = Path(tmp) / "home"
        query = _query_library(home, url, photos, extra_rows)
        with _database_url(url):
            split = bench_cold_query(home, query, k=k, runs=runs, cli=False)
    keep = ("open_s", "metadata_s", "search_s", "index_load_s", "query_s", "wall_s")
    return {"rows": len(photos) + extra_rows, "k": k, **{key: split.get(key) for key in keep}}
