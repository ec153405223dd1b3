"""The queries/s ceiling of exact-score search inside the 4 KB a photo: a fast-scan IVF-PQ first
stage, an in-memory SQ4/SQ6/SQ8/fp16 second stage, exact re-ranking of the rest from the library's
stored vectors; against the engine's own index and hnswlib, in one run (``bench.second_stage``).

    .venv/bin/python benchmarks/second_stage.py                 # 1,000,000 x 1280 (about 15 minutes
                                                                #  once benchmarks/scale.py has built its cache)
    .venv/bin/python benchmarks/second_stage.py --n 100000      # development size
"""

from __future__ import annotations

from pathlib import Path

from bench.second_stage import StageConfig, format_second_stage, run_second_stage, with_scale
from _common import parser, run_and_report


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    d = StageConfig()
    p.add_argument("--n", type=int, default=d.scale.n)
    p.add_argument("--refines", default=",".join(d.refines), help="second stages, comma-separated")
    p.add_argument("--nprobes", type=_ints, default=d.nprobes)
    p.add_argument("--k-factors", type=_ints, default=d.k_factors)
    p.add_argument("--depths", type=_ints, default=d.depths, help="candidates re-ranked exactly")
    p.add_argument("--hnsw-m", type=_ints, default=d.scale.hnsw_m)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cache", type=Path, default=d.scale.cache)
    args = p.parse_args()
    config = with_scale(StageConfig(refines=tuple(r for r in args.refines.split(",") if r), nprobes=args.nprobes,
                                    k_factors=args.k_factors, depths=args.depths),
                        n=args.n, hnsw_m=args.hnsw_m, threads=args.threads, cache=args.cache)
    run_and_report(args, lambda: run_second_stage(config), format_second_stage)


if __name__ == "__main__":
    main()
