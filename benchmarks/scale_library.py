"""A million photos, the whole library: `engine import` of --n densified real embeddings (rows/s),
then `engine ingest` of 1,000 real photos into it against the same into an empty library (the
ratio), a cold `engine query` by phase, `engine info`, `engine doctor` and `engine reindex` (wall
seconds and peak RSS of each, the real CLI in a fresh process), and disk per photo.

    .venv/bin/python benchmarks/scale_library.py                       # 1,000,000 rows
    .venv/bin/python benchmarks/scale_library.py --n 100000 --photos 200

The shards (the same as benchmarks/scale.py's) and the empty files the rows name are cached
under --cache; the library itself is made afresh each run and deleted unless --keep.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from bench.scale_library import LibraryBenchConfig, format_scale_library, run_scale_library
from _common import run_and_report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = LibraryBenchConfig()
    p.add_argument("--n", type=int, default=d.n)
    p.add_argument("--photos", type=int, default=d.photos, help="real photos ingested into both libraries")
    p.add_argument("--repeats", type=int, default=d.repeats, help="rounds of the two ingests, interleaved")
    p.add_argument("--ingest-workers", type=int, default=d.ingest_workers)
    p.add_argument("--cold-runs", type=int, default=d.cold_runs)
    p.add_argument("--index-type", default=None, help="a FAISS factory the library is given before the import, "
                   "instead of the engine's own choice")
    p.add_argument("--keep", action="store_true", help="keep the library in the cache afterwards")
    p.add_argument("--cache", type=Path, default=d.cache)
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args()
    config = replace(d, n=args.n, photos=args.photos, repeats=args.repeats, ingest_workers=args.ingest_workers,
                     cold_runs=args.cold_runs, index_type=args.index_type, keep=args.keep, cache=args.cache)
    run_and_report(args, lambda: run_scale_library(config), format_scale_library)


if __name__ == "__main__":
    main()
