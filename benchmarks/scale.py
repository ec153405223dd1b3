"""A million photos, vectors only: the engine's own index choice (built, tuned and searched as the
engine does it) against hnswlib (M and ef tuned to the same recall@10) and FAISS HNSW32, on real
embeddings of the shared photo sets densified to --n vectors: build seconds, bytes per vector,
recall@10 against exact search of held-out queries, single-query p50/p99 and batch queries/s.

    .venv/bin/python benchmarks/scale.py                           # 1,000,000 x 1280 (hours on 2 cores)
    .venv/bin/python benchmarks/scale.py --n 100000 --hnsw-m 16    # development size
    .venv/bin/python benchmarks/scale.py --n 100000 --dim 256      # any width (a projection of the real vectors)

Everything generated (embeddings of the photos, the shard folder, exact neighbours, the imported
library) is cached under --cache and reused by later runs; 1M x 1280 takes about 5 GB for the
shards and 3 GB for the library.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path

from bench.scale import ScaleConfig, format_scale, run_scale
from _common import run_and_report


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = ScaleConfig()
    p.add_argument("--n", type=int, default=d.n)
    p.add_argument("--dim", type=int, default=d.dim)
    p.add_argument("--queries", type=int, default=d.queries)
    p.add_argument("--tune-queries", type=int, default=d.tune_queries)
    p.add_argument("--single", type=int, default=d.single, help="queries also timed one at a time")
    p.add_argument("--threads", type=int, default=None, help="for every index (default: the usable cores)")
    p.add_argument("--hnsw-m", type=_ints, default=d.hnsw_m, help="hnswlib M values to try, comma-separated")
    p.add_argument("--ef-construction", type=int, default=d.ef_construction, help="hnswlib's")
    p.add_argument("--no-faiss-hnsw", action="store_true")
    p.add_argument("--engine-index", default=None, help="a FAISS factory instead of the engine's own choice")
    p.add_argument("--recall", type=float, default=d.recall, help="the recall@10 the engine tunes its index to")
    p.add_argument("--memory-budget", type=int, default=None, help="bytes the engine's index may use "
                   "(default: the engine's own default)")
    p.add_argument("--cache", type=Path, default=d.cache)
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    config = replace(d, n=args.n, dim=args.dim, queries=args.queries, tune_queries=args.tune_queries,
                     single=args.single, threads=args.threads, hnsw_m=args.hnsw_m,
                     ef_construction=args.ef_construction, faiss_hnsw=not args.no_faiss_hnsw, recall=args.recall,
                     memory_budget=args.memory_budget, cache=args.cache)
    run_and_report(args, lambda: run_scale(config, engine_factory=args.engine_index), format_scale)


if __name__ == "__main__":
    main()
