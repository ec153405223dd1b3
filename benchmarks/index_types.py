"""Index types: build time, recall@10 against exact search, queries/s and bytes per vector for
Flat, HNSW32, IVF1024,Flat and IVF1024,PQ32 through ``VectorIndex`` (engine default search
parameters, then the --params settings on the same indexes); the index type shown is read back
from the saved index.

    .venv/bin/python benchmarks/index_types.py --n 100000 --dim 1280
    .venv/bin/python benchmarks/index_types.py --n 100000 --factories "IVF1024,PQ32;IVF1024,PQ32np"
"""

from __future__ import annotations

from _common import emit, parser

from bench.index_types import DEFAULT_FACTORIES, bench_index_types


def _factories(text: str) -> tuple[str, ...]:
    """FAISS factory strings contain commas, so the list is ';'-separated."""
    return tuple(f.strip() for f in text.split(";") if f.strip())


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=1280)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--factories", type=_factories, default=DEFAULT_FACTORIES,
                   help="FAISS factory strings, ';'-separated (commas inside one are kept)")
    p.add_argument("--no-polysemous", action="store_true", help="build PQ codes without polysemous training")
    p.add_argument("--params", type=_factories, default=("nprobe=16", "nprobe=64", "efSearch=64", "efSearch=128"),
                   help="search settings to try beside the defaults, ';'-separated")
    args = p.parse_args()
    emit(args, {"index": bench_index_types(args.n, args.dim, args.factories, n_queries=args.queries,
                                           polysemous=not args.no_polysemous, search_params=args.params)})


if __name__ == "__main__":
    main()
