"""Ingest throughput against the bare encoder on the same images pre-decoded (target ratio >= 0.75).

    .venv/bin/python benchmarks/ingest_throughput.py --data /work/shared/datasets/caltech101-dev
    .venv/bin/python benchmarks/ingest_throughput.py --data DIR --workers 0,1,2 --threads 1,2   # sweep
    .venv/bin/python benchmarks/ingest_throughput.py --data DIR --configs   # bare-model configurations

The first --files image files in sorted order are ingested with ``ingest_paths`` into a fresh
temporary library (encoder set beforehand; its setup is reported apart), interleaved with the bare
``Encoder.embed`` over the same files decoded in advance; the best of --rounds of each are compared.
"""

from __future__ import annotations

from _common import emit, parser

from bench.ingest import bench_ingest
from bench.models import bench_model_configs
from bench.report import text_table
from bench.samples import image_files, sample_folder


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="photo folder (default: the sample shipped with engine)")
    p.add_argument("--files", type=int, default=640)
    p.add_argument("--model", default="pretrained")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=_ints, default=None, help="decode workers, comma list (default: engine default)")
    p.add_argument("--threads", type=_ints, default=None, help="torch threads, comma list (default: as is)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--configs", action="store_true", help="also time the bare model's CPU configurations")
    args = p.parse_args()
    paths = image_files(args.data or sample_folder(), args.files)
    runs = []
    for threads in args.threads or [None]:
        for workers in args.workers or [None]:
            runs.append(bench_ingest(paths, model=args.model, batch_size=args.batch_size, workers=workers,
                                     device=args.device, rounds=args.rounds, threads=threads))
    if args.configs:
        runs[0]["model_configs"] = bench_model_configs(args.model, batch_size=args.batch_size, device=args.device,
                                                       threads=(1, 2))
    extra = ""
    if len(runs) > 1:
        extra = "\nsweep (each ratio against its own interleaved bare-model runs):\n" + "\n".join(text_table(
            ["workers", "threads", "model img/s", "ingest img/s", "ratio", "CPU ratio"],
            [[r["workers"], r["torch_threads"], r["model_images_per_s"], r["ingest_images_per_s"], r["ratio"],
              r["cpu_ratio"]] for r in runs]))
    sections = {"ingest": runs[0]} if len(runs) == 1 else {"ingest": runs[0], "ingest_sweep": runs}
    emit(args, sections, extra)


if __name__ == "__main__":
    main()
