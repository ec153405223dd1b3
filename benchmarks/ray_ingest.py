"""Ray ingest (2 CPU actors on this machine) against plain ingest of the same photos (target ratio >= 0.85).

    .venv/bin/python benchmarks/ray_ingest.py --data /work/shared/datasets/caltech101-dev --files 1000

The first --files image files in sorted order are ingested into fresh temporary libraries by plain
``ingest_paths`` and by ``ingest_with_ray`` on a local Ray cluster started once (its start-up
seconds reported apart), alternating which goes first over --rounds rounds; the best of each are
compared. Each Ray run includes starting its actors and loading the encoder in each.
"""

from __future__ import annotations

from _common import emit, parser

from bench.ray_ingest import bench_ray_ingest
from bench.report import text_table
from bench.samples import image_files, sample_folder


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="photo folder (default: the sample shipped with engine)")
    p.add_argument("--files", type=int, default=1000)
    p.add_argument("--model", default="pretrained")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--actors", type=int, default=None, help="embedding actors (default: one per core)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    paths = image_files(args.data or sample_folder(), args.files)
    result = bench_ray_ingest(paths, model=args.model, batch_size=args.batch_size, rounds=args.rounds,
                              device=args.device, actors=args.actors)
    rows = [[r["kind"], r["images_per_s"], r["seconds"], r.get("ray", {}).get("cluster", ""),
             r.get("ray", {}).get("workers", "")] for r in result["runs"]]
    text = "\n".join([f"ray ingest: {result['files']} files, batch {result['batch_size']}, {result['actors']} actors, "
                      f"Ray start-up {result['ray_start_s']} s (not in the ratio)",
                      *text_table(["run", "images/s", "seconds", "cluster s", "actor processes"], rows),
                      f"  ratio (best Ray / best plain): {result['ratio']}; CPU ms per image: plain "
                      f"{result['plain_cpu_ms_per_image']}, Ray actors {result['ray_cpu_ms_per_image']}, CPU ratio "
                      f"{result['cpu_ratio']}; first Ray result after {result['ray_first_result_s']} s",
                      f"  best Ray run by stage: {result['ray_stages']}"])
    emit(args, {"ray_ingest": result}, text)


if __name__ == "__main__":
    main()
