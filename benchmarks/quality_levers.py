"""Retrieval-quality levers on classes they never saw: query expansion, GeM pooling, whitening
(bench/levers.py: the pretrained lite0's feature maps are cached once per data set, every lever is
then numpy on them, scored with engine.metrics as engine eval scores).

    .venv/bin/python benchmarks/quality_levers.py expansion --sets caltech,orl,omniglot --n 1,2,3,5,10 --alpha 1,3
    .venv/bin/python benchmarks/quality_levers.py gem --sets caltech,orl,omniglot --p 1,2,3,4 --expand 0,1
    .venv/bin/python benchmarks/quality_levers.py whitening --sets caltech,orl,omniglot --shrinkage 0,0.1,0.3,0.5,0.7,1
    .venv/bin/python benchmarks/quality_levers.py backbone --sets caltech,orl,omniglot --backbones lite0,lite1,lite2
    .venv/bin/python benchmarks/quality_levers.py head --sets orl --checkpoint RUN/checkpoint.pt --expand 0,1
    .venv/bin/python benchmarks/quality_levers.py speed --models pretrained,pretrained-gem,pretrained-lite1 --images 64
    .venv/bin/python benchmarks/quality_levers.py latency --home LIBRARY --n 0,1,3

--cache (default /tmp/engine-levers) keeps the feature maps (about 0.6 GB for omniglot-background);
the first run of a set embeds it (minutes on two cores). Figures: leave-one-out R@1, P@10, MAP@R
(and omniglot's 20-way one-shot accuracy) on the held-out classes, and for caltech on all 50
classes at 40 images each, for orl on all 40 people. ``backbone`` embeds the held-out images (orl:
all) from their files with each pretrained lite backbone; ``head`` scores a checkpoint trained on the
frozen lite0 (``--preset cpu-quick``) from the cached maps; ``speed`` times encoders on the first
``--images`` caltech images (decode + forward); ``latency`` times searches in a library.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.levers import (SETS, backbone_rows, cache_feature_maps, encoder_speed, expansion_latency, expansion_rows,
                          gem_rows, head_rows, whitening_rows)
from engine.expansion import Expansion


def _list(kind):
    return lambda text: [kind(v) for v in text.split(",") if v.strip()]


def _print(rows, as_json: bool) -> None:
    for row in rows:
        if as_json:
            print(json.dumps(row))
        else:
            print("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("lever", choices=("expansion", "gem", "whitening", "backbone", "head", "speed", "latency"))
    p.add_argument("--sets", type=_list(str), default=list(SETS))
    p.add_argument("--cache", type=Path, default=Path("/tmp/engine-levers"))
    p.add_argument("--n", type=_list(int), default=[1, 2, 3, 5, 10], help="expansion: neighbours")
    p.add_argument("--alpha", type=_list(float), default=[1.0, 3.0], help="expansion: weight powers")
    p.add_argument("--modes", type=_list(str), default=["none", "shortlist"],
                   help="expansion: database-side augmentation none, shortlist (the engine's) or full")
    p.add_argument("--subsets", type=_list(str), default=[], help="expansion: only these subsets (held, all40, all)")
    p.add_argument("--p", type=_list(float), default=[1.0, 2.0, 3.0, 4.0], help="gem: exponents (1 = average)")
    p.add_argument("--expand", type=_list(int), default=[0, 1],
                   help="gem, whitening, backbone, head: expansion n (alpha 3)")
    p.add_argument("--kinds", type=_list(str), default=["pca", "learned"], help="whitening: kinds")
    p.add_argument("--dims", type=_list(int), default=[0, 256], help="whitening: output sizes (0 = all)")
    p.add_argument("--shrinkage", type=_list(float), default=[0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0])
    p.add_argument("--backbones", type=_list(str), default=["lite0", "lite1", "lite2"], help="backbone: which")
    p.add_argument("--checkpoint", type=Path, help="head: a checkpoint trained on the frozen lite0")
    p.add_argument("--models", type=_list(str), default=["pretrained", "pretrained-gem", "pretrained-lite1",
                                                          "pretrained-lite2"], help="speed: --model names")
    p.add_argument("--images", type=int, default=64, help="speed: images timed; latency: queries")
    p.add_argument("--repeats", type=int, default=3, help="speed: timed passes (the best counts)")
    p.add_argument("--bare", action="store_true", help="speed: the forward alone on random input, no decoding")
    p.add_argument("--home", type=Path, help="latency: the library to search")
    p.add_argument("--json", action="store_true", help="one JSON object per row")
    args = p.parse_args()
    log = (lambda line: print(line, file=sys.stderr, flush=True))
    if args.lever == "speed":
        paths = cache_feature_maps("caltech", args.cache, log=log).paths[:args.images]
        _print(encoder_speed(args.models, paths, repeats=args.repeats, bare=args.bare), args.json)
        return
    if args.lever == "latency":
        if args.home is None:
            p.error("latency needs --home LIBRARY")
        _print(expansion_latency(args.home, args.n, args.images), args.json)
        return
    if args.lever == "head" and args.checkpoint is None:
        p.error("head needs --checkpoint")
    for name in args.sets:
        cached = cache_feature_maps(name, args.cache, log=log)
        if args.lever == "expansion":
            rows = expansion_rows(cached, args.n, args.alpha, args.modes, args.subsets)
        elif args.lever == "gem":
            rows = gem_rows(cached, args.p, [Expansion(n, 3.0) for n in args.expand])
        elif args.lever == "backbone":
            rows = backbone_rows(cached, args.backbones, [Expansion(n, 3.0) for n in args.expand], log)
        elif args.lever == "head":
            rows = head_rows(cached, args.checkpoint, [Expansion(n, 3.0) for n in args.expand])
        else:
            generic = cache_feature_maps("caltech", args.cache, log=log)
            rows = []
            for n in args.expand:
                rows += [dict(r, expand=n) for r in whitening_rows(
                    cached, generic, args.kinds, [d or None for d in args.dims], args.shrinkage, Expansion(n, 3.0))]
        _print(rows, args.json)


if __name__ == "__main__":
    main()
