"""Near-duplicate grouping (``engine duplicates``) against a known truth: altered copies of real photos.

    .venv/bin/python benchmarks/near_duplicates.py --data /work/shared/datasets/caltech101-dev --work /tmp/nd
    .venv/bin/python benchmarks/near_duplicates.py --data DIR --work /tmp/nd --thresholds 0.3,0.5,0.7 --phash

--originals photos (a seeded choice spread over the class folders) each get four altered copies,
made as a user would: a crop (85% of each side, seeded offset), a resize to half size, a
recompression at JPEG quality 30, and a small rotation (3-6 degrees, either way, then cropped to
lose the corners). --distractors further photos get no copy. Everything is ingested with the
default encoder (--model) into a library in --work (kept, so a rerun only groups again), and
``find_duplicates`` groups it at each threshold. The truth: an original and its copies are one
group; every distractor is alone.

Figures (pairwise, as is usual for clustering): precision = share of the pairs put in one group
that are truly the same shot; recall = share of the true same-shot pairs put in one group; per
alteration, the share of copies grouped with their original. --phash also scores imagededup's
perceptual hash (when imagededup is installed) on the same files, with its default Hamming
distance limit and a few others.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

KINDS = ("crop", "resize", "recompress", "rotate")


def _choose(data: Path, n: int, seed: int) -> list[Path]:
    from engine.files import list_class_folder

    paths, labels, _ = list_class_folder(data)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(paths))
    # round-robin over classes so that every class gives photos before any gives many
    by_class: dict[int, list[int]] = defaultdict(list)
    for i in order:
        by_class[int(labels[i])].append(int(i))
    chosen: list[int] = []
    while len(chosen) < min(n, len(paths)):
        for label in sorted(by_class):
            if by_class[label] and len(chosen) < n:
                chosen.append(by_class[label].pop())
    return [Path(paths[i]) for i in chosen]


def _alter(img: Image.Image, kind: str, rng: np.random.Generator) -> tuple[Image.Image, int]:
    """The altered copy and the JPEG quality to save it at."""
    w, h = img.size
    if kind == "crop":
        cw, ch = round(w * 0.85), round(h * 0.85)
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        return img.crop((x, y, x + cw, y + ch)), 90
    if kind == "resize":
        return img.resize((max(1, w // 2), max(1, h // 2)), Image.Resampling.LANCZOS), 90
    if kind == "recompress":
        return img, 30
    angle = float(rng.uniform(3, 6)) * (1 if rng.random() < 0.5 else -1)
    turned = img.rotate(angle, resample=Image.Resampling.BICUBIC, expand=False)
    mx, my = round(w * 0.06), round(h * 0.06)
    return turned.crop((mx, my, w - mx, h - my)), 90


def make_set(data: Path, out: Path, originals: int, distractors: int, seed: int) -> dict[str, str]:
    """Write the photos and copies into ``out``; returns file name -> truth group key."""
    truth_file = out.parent / "truth.json"
    if truth_file.exists():
        return json.loads(truth_file.read_text())
    photos = _choose(data, originals + distractors, seed)
    rng = np.random.default_rng(seed)
    truth: dict[str, str] = {}
    out.mkdir(parents=True, exist_ok=True)
    for n, src in enumerate(photos):
        key = f"{src.parent.name}__{src.stem}"
        img = Image.open(src).convert("RGB")
        img.save(out / f"{key}.jpg", quality=95)
        truth[f"{key}.jpg"] = key
        if n < originals:
            for kind in KINDS:
                copy, quality = _alter(img, kind, rng)
                copy.save(out / f"{key}__{kind}.jpg", quality=quality)
                truth[f"{key}__{kind}.jpg"] = key
    truth_file.write_text(json.dumps(truth))
    return truth


def score(groups: list[list[str]], truth: dict[str, str]) -> dict[str, float]:
    """Pairwise precision/recall of predicted groups (file names; absent files are alone) against
    ``truth`` (file name -> group key), and per alteration kind the share of copies grouped with
    their original."""
    group_of: dict[str, int] = {}
    for g, names in enumerate(groups):
        for name in names:
            group_of[name] = g
    pred_pairs = sum(len(g) * (len(g) - 1) // 2 for g in groups)
    true_sizes = Counter(truth.values())
    true_pairs = sum(s * (s - 1) // 2 for s in true_sizes.values())
    hit_pairs = 0
    for names in groups:
        keys = Counter(truth[n] for n in names if n in truth)
        hit_pairs += sum(c * (c - 1) // 2 for c in keys.values())
    out = {"precision": hit_pairs / pred_pairs if pred_pairs else 1.0,
           "recall": hit_pairs / true_pairs if true_pairs else 1.0,
           "groups": len(groups), "pred_pairs": pred_pairs, "true_pairs": true_pairs}
    for kind in KINDS:
        copies = [n for n in truth if n.endswith(f"__{kind}.jpg")]
        joined = sum(1 for n in copies if n in group_of and group_of[n] == group_of.get(f"{truth[n]}.jpg"))
        out[f"recall_{kind}"] = joined / len(copies) if copies else 0.0
    p, r = out["precision"], out["recall"]
    out["f1"] = 2 * p * r / (p + r) if p + r else 0.0
    return out


def run_engine(folder: Path, home: Path, model: str, thresholds: list[float]) -> tuple[list[dict], float]:
    from engine.duplicates import DuplicateConfig, find_duplicates
    from engine.library import Library
    from ingest.pipeline import IngestConfig, ingest_paths

    library = Library(home, device="cpu")
    started = time.perf_counter()
    report = ingest_paths(library, [folder], IngestConfig(workers=1), model=model)
    ingest_s = time.perf_counter() - started
    print(f"ingest: {report.added} added, {report.unchanged} unchanged in {ingest_s:.1f} s", file=sys.stderr)
    rows = []
    for t in thresholds:
        found = find_duplicates(library, DuplicateConfig(threshold=t))
        groups = [[Path(p).name for p in g.paths] for g in found.groups]
        rows.append({"method": "engine", "threshold": t, "seconds": found.seconds, **score(groups, truth_of(folder))})
    return rows, ingest_s


def truth_of(folder: Path) -> dict[str, str]:
    return json.loads((folder.parent / "truth.json").read_text())


def run_phash(folder: Path, limits: list[int]) -> list[dict]:
    from imagededup.methods import PHash

    from engine.duplicates import connected_groups

    started = time.perf_counter()
    logging.getLogger("imagededup").setLevel(logging.WARNING)
    hasher = PHash(verbose=False)
    encodings = hasher.encode_images(image_dir=str(folder))
    encode_s = time.perf_counter() - started
    names = sorted(encodings)
    index = {n: i for i, n in enumerate(names)}
    rows = []
    for limit in limits:
        found = hasher.find_duplicates(encoding_map=encodings, max_distance_threshold=limit)
        a = [index[n] for n, dups in found.items() for _ in dups]
        b = [index[d] for dups in found.values() for d in dups]
        comps = connected_groups(np.asarray(a, np.int64), np.asarray(b, np.int64))
        groups = [[names[i] for i in comp] for comp in comps]
        rows.append({"method": "imagededup PHash", "threshold": limit, "seconds": round(encode_s, 2),
                     **score(groups, truth_of(folder))})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a folder-per-class photo tree")
    p.add_argument("--work", required=True, help="folder for the photo set and its library (kept between runs)")
    p.add_argument("--originals", type=int, default=250, help="photos that get four altered copies each")
    p.add_argument("--distractors", type=int, default=750, help="photos without a copy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="pretrained")
    p.add_argument("--thresholds", default="0.3,0.4,0.5,0.55,0.6,0.7,0.8")
    p.add_argument("--phash", action="store_true", help="also score imagededup's PHash (needs imagededup)")
    p.add_argument("--phash-limits", default="6,10,14,18")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    work = Path(args.work)
    folder = work / "photos"
    truth = make_set(Path(args.data), folder, args.originals, args.distractors, args.seed)
    thresholds = [float(t) for t in args.thresholds.split(",")]
    rows, ingest_s = run_engine(folder, work / "library", args.model, thresholds)
    if args.phash:
        try:
            rows += run_phash(folder, [int(v) for v in args.phash_limits.split(",")])
        except ImportError as exc:
            print(f"imagededup unavailable: {exc}", file=sys.stderr)
    if args.json:
        print(json.dumps({"files": len(truth), "originals": args.originals, "distractors": args.distractors,
                          "ingest_s": round(ingest_s, 1), "rows": rows}, indent=2))
        return
    print(f"{len(truth)} files: {args.originals} originals x (1 + {len(KINDS)} copies) + {args.distractors} "
          f"distractors; ingest {ingest_s:.1f} s")
    head = ["method", "threshold", "precision", "recall", "f1"] + [f"recall_{k}" for k in KINDS] + ["groups", "seconds"]
    print(" | ".join(head))
    for row in rows:
        print(" | ".join(f"{row[h]:.3f}" if isinstance(row[h], float) and h != "threshold" else str(row[h])
                         for h in head))


if __name__ == "__main__":
    main()
