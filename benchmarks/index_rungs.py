"""One rung of the engine's index policy through a real library (SQLite store, saved index, tuned
to recall@10 0.95, exact re-ranking from the stored vectors), on real embeddings densified to --n
vectors of --dim: build seconds, bytes per vector, tuned settings, recall@10 of fresh queries
against brute force, single-query p50/p99 and batch queries/s. The library lives in a temporary
home, removed afterwards unless --keep. The real embeddings come from --cache (embedded once).

    .venv/bin/python benchmarks/index_rungs.py --n 20000 --dim 1280                 # exact: Flat
    .venv/bin/python benchmarks/index_rungs.py --n 200000 --dim 256                 # IVF-Flat
    .venv/bin/python benchmarks/index_rungs.py --n 100000 --dim 768                 # IVF-SQ8
    .venv/bin/python benchmarks/index_rungs.py --n 100000 --dim 1280 --memory-budget 40000000   # IVF-PQ
    .venv/bin/python benchmarks/index_rungs.py --n 100000 --dim 1280 --index-type "IVF1024,SQ4" # by hand
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from _common import emit, parser

from bench.index_rungs import RungConfig, bench_index_rung, format_rung


def main() -> None:
    d = RungConfig()
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=d.n)
    p.add_argument("--dim", type=int, default=d.dim, help="any width: a projection of the real vectors")
    p.add_argument("--memory-budget", type=int, default=None, help="bytes the index may use "
                   "(default: the engine's own default)")
    p.add_argument("--index-type", default=None, help="a FAISS factory instead of the engine's own choice")
    p.add_argument("--queries", type=int, default=d.queries)
    p.add_argument("--threads", type=int, default=d.threads, help="FAISS threads (the policy's figures: 1)")
    p.add_argument("--cache", type=Path, default=d.cache, help="where the real embeddings are cached")
    p.add_argument("--work-dir", type=Path, default=None, help="where the temporary library home is made")
    p.add_argument("--keep", action="store_true", help="keep the library home (its path is printed)")
    args = p.parse_args()
    config = replace(d, n=args.n, dim=args.dim, memory_budget=args.memory_budget, factory=args.index_type,
                     queries=args.queries, threads=args.threads, cache=args.cache)
    row = bench_index_rung(config, work_dir=args.work_dir, keep=args.keep)
    emit(args, {"rung": row}, format_rung(row))


if __name__ == "__main__":
    main()
