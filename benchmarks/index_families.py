r"""Compressed IVF families (4-bit fast-scan PQ, 8-bit PQ, SQ8, SQ4, OPQ and PCA rotations) with exact
re-ranking, on real embeddings densified to --n vectors: per factory, train/add seconds, bytes per
vector, and per nprobe the single-query search ms and recall@10 after re-ranking each depth of
candidates, with the cheapest setting that reaches recall 0.95 (the sweep behind
``engine/index_policy.py``'s choice of PQ). The real embeddings come from --cache (embedded once).

    .venv/bin/python benchmarks/index_families.py --n 100000   # the policy's sweep (about an hour: OPQ trains 28 min)
    .venv/bin/python benchmarks/index_families.py --n 100000 \
        --factories "IVF1024,PQ128np;IVF1024,PQ160np;PCAR512,IVF1024,SQ8"
    .venv/bin/python benchmarks/index_families.py --n 20000 --dim 256 --factories "IVF512,SQ8;IVF512,PQ32np"
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from _common import emit, parser

from bench.index_families import FamiliesConfig, bench_index_families, format_families


def _factories(text: str) -> tuple[str, ...]:
    """FAISS factory strings contain commas, so the list is ';'-separated."""
    return tuple(f.strip() for f in text.split(";") if f.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def main() -> None:
    d = FamiliesConfig()
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=d.n)
    p.add_argument("--dim", type=int, default=d.dim, help="any width: a projection of the real vectors")
    p.add_argument("--queries", type=int, default=d.queries)
    p.add_argument("--factories", type=_factories, default=d.factories,
                   help="FAISS factory strings, ';'-separated (default: every family, lists ~ 4 sqrt(n))")
    p.add_argument("--rerank", type=_ints, default=d.rerank, help="re-ranking depths, comma-separated")
    p.add_argument("--nprobe", type=_ints, default=d.nprobes, help="the nprobe ladder, comma-separated")
    p.add_argument("--threads", type=int, default=d.threads, help="FAISS threads (the policy's figures: 1)")
    p.add_argument("--cache", type=Path, default=d.cache, help="where the real embeddings are cached")
    args = p.parse_args()
    config = replace(d, n=args.n, dim=args.dim, queries=args.queries, factories=args.factories,
                     rerank=tuple(sorted(args.rerank)), nprobes=args.nprobe, threads=args.threads, cache=args.cache)
    results = bench_index_families(config)
    emit(args, {"families": results}, format_families(results))


if __name__ == "__main__":
    main()
