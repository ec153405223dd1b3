"""Decode + preprocess of a 12-megapixel JPEG with draft mode against without (target >= 4x).

    .venv/bin/python benchmarks/decode_draft.py
    .venv/bin/python benchmarks/decode_draft.py --noise 2,4,8      # how entropy moves the figure
    .venv/bin/python benchmarks/decode_draft.py --image photo.jpg  # a real camera file

The preprocessing is tf_efficientnet_lite0's (the engine's default encoder): 224 px from a 256 px
short side, so draft mode decodes a 4000x3000 JPEG at 1/8 scale (500x375).
"""

from __future__ import annotations

from _common import emit, parser

from bench.decode import bench_decode_draft, data_config_for
from bench.report import text_table


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--image", default=None, help="a JPEG to use instead of the generated one")
    p.add_argument("--size", default="4000x3000", help="generated image WIDTHxHEIGHT")
    p.add_argument("--noise", default="4", help="noise of the generated image (grey levels), comma list")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--model", default="pretrained")
    args = p.parse_args()
    size = tuple(int(v) for v in args.size.lower().split("x"))
    config = data_config_for(args.model)
    noises = [float(v) for v in args.noise.split(",")]
    runs = [bench_decode_draft(config, image=args.image, size=size, repeats=args.repeats, noise=n)
            for n in (noises if not args.image else noises[:1])]
    extra = ""
    if len(runs) > 1:
        extra = "\nby noise level:\n" + "\n".join(text_table(
            ["image", "KiB", "with draft ms", "without ms", "speedup (best)", "speedup (median)"],
            [[r["image"], r["file_bytes"] // 1024, r["with_draft_ms"], r["without_draft_ms"], r["speedup"],
              r["speedup_median"]] for r in runs]))
    emit(args, {"decode": runs[0]} if len(runs) == 1 else {"decode": runs[0], "decode_sweep": runs}, extra)


if __name__ == "__main__":
    main()
