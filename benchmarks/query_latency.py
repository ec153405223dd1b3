"""Query latency: warm search at 10 thousand and 1 million vectors, warm embed of a query image,
warm end-to-end ``search_library`` and a cold ``engine query`` split into its phases.

    .venv/bin/python benchmarks/query_latency.py --sizes 10000,1000000
    .venv/bin/python benchmarks/query_latency.py --sizes 10000 --data DIR --files 640

The index holds synthetic clustered unit vectors (dim 1280 = tf_efficientnet_lite0's embedding);
1M x 1280 float32 is 5.1 GB and is built in slices. The real library for the end-to-end and cold
figures is ingested from --data (default: the sample shipped with engine).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from _common import emit, parser

from bench.metadata import bench_metadata
from bench.query import bench_cold_query, bench_query, bench_query_embed, bench_search_library, ingest_library
from bench.samples import image_files, query_image, sample_folder


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10000,1000000")
    p.add_argument("--dim", type=int, default=1280)
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--data", default=None)
    p.add_argument("--files", type=int, default=256)
    p.add_argument("--model", default="pretrained")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-cold", action="store_true", help="skip the fresh-process query")
    args = p.parse_args()
    from engine.encoder import load_encoder

    out = {"search": bench_query([int(v) for v in args.sizes.split(",")], dim=args.dim, repeats=args.repeats)}
    image = query_image()
    out["query_image"] = str(image)
    out["embed"] = bench_query_embed(load_encoder(args.model, args.device), image, repeats=20)
    with tempfile.TemporaryDirectory(prefix="engine-bench-") as tmp:
        home = Path(tmp) / "library"
        ingest_library(home, image_files(args.data or sample_folder(), args.files), model=args.model,
                       device=args.device)
        out["library"] = bench_search_library(home, image, repeats=20, device=args.device)
        if not args.no_cold:
            out["cold"] = bench_cold_query(home, image, device=args.device, runs=3)
    metadata = bench_metadata(10_000, batches=1, repeats=200)  # for the fetch latency line
    emit(args, {"query": out, "metadata": metadata})


if __name__ == "__main__":
    main()
