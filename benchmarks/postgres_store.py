"""PostgreSQL against SQLite as the library's metadata store: bulk insert rows/s (rows alone, and
with their 1280-d vectors), lookup of 10,000 paths, and the metadata phase of a cold `engine query`.

    .venv/bin/python benchmarks/postgres_store.py                      # a throw-away local server
    .venv/bin/python benchmarks/postgres_store.py --server-url postgresql+psycopg://user@host/postgres

Both stores run on this machine; the throw-away server runs with fsync off (so does nothing the
SQLite side must), and the two are measured in one run, one after the other.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from _common import emit, parser

from bench.postgres import bench_query_metadata, bench_store, postgres_databases


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--server-url", help="a PostgreSQL server whose user may create databases (default: start one)")
    p.add_argument("--rows", type=int, default=50_000, help="rows for the bulk insert")
    p.add_argument("--vector-rows", type=int, default=20_000, help="rows written with 1280-d vectors")
    p.add_argument("--query-rows", type=int, default=20_000, help="rows of the library the cold query searches")
    p.add_argument("--runs", type=int, default=3, help="cold queries per store (the best is kept)")
    args = p.parse_args()
    photos = sorted(str(path) for path in (Path(__file__).resolve().parent.parent / "engine" / "sample" / "library")
                    .glob("*/*.jpg"))
    results = {}
    with postgres_databases(args.server_url) as new_database, tempfile.TemporaryDirectory(prefix="engine-bench-") as tmp:
        for name, url in (("sqlite", f"sqlite:///{tmp}/bench.db"), ("postgresql", new_database())):
            results[f"store {name}"] = bench_store(url, rows=args.rows, vector_rows=args.vector_rows)
        for name, url in (("sqlite", None), ("postgresql", new_database())):
            results[f"query {name}"] = bench_query_metadata(url, photos, extra_rows=args.query_rows, runs=args.runs)
    emit(args, results)


if __name__ == "__main__":
    main()
