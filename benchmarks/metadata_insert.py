"""Metadata: bulk insert rate into SQLite through ``MetadataStore.insert_rows`` (target >= 20,000
rows/s), the per-batch commit of ingest (32 rows + their vectors) and fetch latency by id.

    .venv/bin/python benchmarks/metadata_insert.py --rows 50000
"""

from __future__ import annotations

from _common import emit, parser

from bench.metadata import bench_metadata


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=50_000)
    p.add_argument("--repeat", type=int, default=3, help="runs; the best bulk rate is kept, all are listed")
    args = p.parse_args()
    runs = [bench_metadata(args.rows) for _ in range(args.repeat)]
    best = max(runs, key=lambda r: r["bulk_rows_per_s"])
    emit(args, {"metadata": dict(best, all_bulk_rows_per_s=[r["bulk_rows_per_s"] for r in runs])},
         f"bulk rows/s over {args.repeat} runs: {[r['bulk_rows_per_s'] for r in runs]}")


if __name__ == "__main__":
    main()
