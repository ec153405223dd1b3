"""Benchmarks of Siamese fine-tuning: throughput of the loop and quality on classes never trained on.

    python benchmarks/train_bench.py throughput [--device cpu] [--batch-size 32] [--steps 6] [--image-size 224]
    python benchmarks/train_bench.py caltech  --out RUN [--preset cpu-quick] [--verify]
    python benchmarks/train_bench.py omniglot --out RUN [--preset cpu-quick|cpu-long]
    python benchmarks/train_bench.py orl      --out RUN [--preset cpu-quick]

Every quality run compares the untouched pretrained encoder ("frozen": the plain pooled backbone
features, same image size; for a preset that trains from scratch, ``cpu-long``, the default pretrained
encoder) with the fine-tuned checkpoint on held-out classes, re-embedding the
held-out images from their files with each encoder (nothing is taken from the training run's own
log). Extra ``--set field=value`` options go onto TrainConfig. Figures are printed; nothing else.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATASETS = Path("/work/shared/datasets")


def _config(args, **extra):
    from train.config import TrainConfig

    values = dict(extra)
    for item in args.set or []:
        key, _, raw = item.partition("=")
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            values[key] = raw
    values.setdefault("preset", args.preset)  # throughput passes "gpu": the whole backbone learns
    values.setdefault("device", args.device)
    return TrainConfig(**values)


def _progress(verbose: bool):
    if not verbose:
        return None
    from train.progress import TrainProgress

    return TrainProgress()


def _embed(encoder, paths, workers):
    from engine.embedding import embed_files

    out = embed_files(encoder, paths, batch_size=64, workers=workers)
    if out.failures:
        raise SystemExit(f"{len(out.failures)} images failed: {out.failures[:3]}")
    return out.embeddings


def _frozen_and_tuned(result, val_paths, config, workers):
    """Embeddings of ``val_paths`` with the untouched pretrained encoder and with the saved checkpoint."""
    from engine.config import EncoderConfig
    from engine.encoder import build_encoder, load_checkpoint, resolve_device

    device = resolve_device(config.device)
    # A net trained from scratch has no pretrained self to compare with: the baseline is then the
    # engine's default pretrained encoder at its own image size.
    frozen = build_encoder(EncoderConfig(backbone=config.backbone, image_size=config.image_size) if config.pretrained
                           else EncoderConfig(), device)
    t = time.perf_counter()
    frozen_emb = _embed(frozen, val_paths, workers)
    embed_s = time.perf_counter() - t
    tuned = load_checkpoint(result.checkpoint, device)
    tuned_emb = _embed(tuned, val_paths, workers)
    return frozen_emb, tuned_emb, tuned, embed_s


def _retrieval_table(name, frozen_emb, tuned_emb, labels):
    from engine.metrics import retrieval_metrics

    rows = {}
    for label, emb in (("frozen", frozen_emb), ("fine-tuned", tuned_emb)):
        r = retrieval_metrics(emb, labels, ks=(1, 5, 10))
        rows[label] = {k: r[k] for k in ("recall@1", "recall@5", "precision@10", "map@r")}
    print(f"\n{name}: held-out classes, {len(labels)} images, {len(np.unique(labels))} classes")
    print(f"{'':12s} {'R@1':>8s} {'R@5':>8s} {'P@10':>8s} {'MAP@R':>8s}")
    for label, r in rows.items():
        print(f"{label:12s} {r['recall@1']:8.4f} {r['recall@5']:8.4f} {r['precision@10']:8.4f} {r['map@r']:8.4f}")
    return rows


def _run(data, out, config, verbose):
    from train.loop import train

    t = time.perf_counter()
    view = _progress(verbose)
    result = train(data, out, config, progress=view, on_epoch=view.epoch_end if view is not None else None)
    wall = time.perf_counter() - t
    print(f"training wall time {wall:.1f} s; best epoch {result.best_epoch} of {len(result.history) - 1}; "
          f"threshold {result.threshold:.4f}; stopped early: {result.stopped_early}")
    for r in result.history:
        print("  " + json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}))
    return result, wall


# ---------------------------------------------------------------------------------------------- quality


def caltech(args):
    from train.config import resolve_preset
    from train.data import load_class_folder, split_classes

    config = resolve_preset(_config(args))
    data = load_class_folder(DATASETS / "caltech101-dev", max_per_class=config.max_per_class, seed=config.seed)
    result, wall = _run(data, args.out, config, args.verbose)
    _, val = split_classes(data, config.val_classes, config.seed, config.val_group_sep)
    frozen, tuned, _, _ = _frozen_and_tuned(result, val.paths, config, args.workers)
    rows = _retrieval_table("caltech101-dev", frozen, tuned, val.labels)
    print(f"held-out classes: {', '.join(val.classes)}")
    print(json.dumps({"set": "caltech101-dev", "wall_s": round(wall, 1), **{k: v for k, v in rows.items()}}))


def oneshot(embeddings, labels, classes, n_way=20, episodes=500, seed=0, group_sep="__"):
    """Mean N-way one-shot accuracy over seeded episodes (``bench.levers.draw_episodes``: N
    characters of one held-out alphabet, one support and one query drawing each), and the alphabets."""
    from bench.levers import draw_episodes
    from engine.metrics import oneshot_accuracy

    drawn, names = draw_episodes(labels, classes, n_way, episodes, seed, group_sep)
    accs = [oneshot_accuracy(embeddings[query], labels[query], embeddings[support], labels[support])
            for support, query in drawn]
    return float(np.mean(accs)), names


def omniglot(args):
    from train.config import resolve_preset
    from train.data import load_class_folder, split_classes

    config = resolve_preset(_config(args, val_group_sep="__", val_classes=0.25))
    data = load_class_folder(DATASETS / "omniglot-background")
    result, wall = _run(data, args.out, config, args.verbose)
    _, val = split_classes(data, config.val_classes, config.seed, config.val_group_sep)
    frozen, tuned, _, _ = _frozen_and_tuned(result, val.paths, config, args.workers)
    rows = _retrieval_table("omniglot-background", frozen, tuned, val.labels)
    shots = {}
    for label, emb in (("frozen", frozen), ("fine-tuned", tuned)):
        shots[label], alphabets = oneshot(emb, val.labels, val.classes)
    print(f"20-way one-shot on held-out alphabets ({', '.join(alphabets)}), 500 episodes: "
          + ", ".join(f"{k} {v:.4f}" for k, v in shots.items()))
    print(json.dumps({"set": "omniglot-background", "wall_s": round(wall, 1), "oneshot20": shots, **rows}))


def orl(args):
    from engine.metrics import pair_distances, sample_pairs, verification_metrics
    from train.config import resolve_preset
    from train.data import load_class_folder, split_classes

    config = resolve_preset(_config(args, val_classes=0.25, val_pairs=2000))
    data = load_class_folder(DATASETS / "orl-faces")
    result, wall = _run(data, args.out, config, args.verbose)
    _, test = split_classes(data, config.val_classes, config.seed)
    frozen, tuned, tuned_enc, _ = _frozen_and_tuned(result, test.paths, config, args.workers)
    rows = _retrieval_table("orl-faces (10 people never trained on)", frozen, tuned, test.labels)
    # Verification on fresh pairs (another seed than the calibration pairs): frozen uses a threshold
    # calibrated on the calibration pairs too, so both are judged the same way.
    ci, cj, cs = sample_pairs(test.labels, 2000, seed=config.seed)
    ti, tj, ts = sample_pairs(test.labels, 2000, seed=config.seed + 1)
    out = {}
    for label, emb in (("frozen", frozen), ("fine-tuned", tuned)):
        cal = verification_metrics(pair_distances(emb[ci], emb[cj]), cs)["best_threshold"]
        v = verification_metrics(pair_distances(emb[ti], emb[tj]), ts, threshold=cal)
        out[label] = {"accuracy": v["accuracy"], "roc_auc": v["roc_auc"], "threshold": cal}
    print("verification on fresh pairs, threshold from calibration pairs: "
          + "; ".join(f"{k}: acc {v['accuracy']:.4f} AUC {v['roc_auc']:.4f} thr {v['threshold']:.3f}"
                      for k, v in out.items()))
    print(f"checkpoint threshold {tuned_enc.threshold}")
    print(json.dumps({"set": "orl-faces", "wall_s": round(wall, 1), "verification": out, **rows}))


# ---------------------------------------------------------------------------------------------- throughput


def throughput(args):
    """images/s of the training loop (decode + augmentation + loss + optimizer) against a bare
    forward+backward of the same encoder on a resident batch of the same shape and layout."""
    import tempfile

    import torch
    from PIL import Image

    from engine.config import EncoderConfig
    from engine.encoder import build_encoder, resolve_device
    from train.config import resolve_preset
    from train.head import with_head
    from train.loop import train
    from train.precision import autocast

    config = resolve_preset(_config(args, epochs=1, steps_per_epoch=args.steps, batch_size=args.batch_size,
                                    images_per_class=4, image_size=args.image_size, freeze_epochs=0,
                                    preset="gpu", cache_features=False, workers=args.workers,
                                    val_classes=0.2, val_pairs=200, plots=False, patience=0,
                                    max_per_class=8))
    device = resolve_device(config.device)
    base = build_encoder(EncoderConfig(backbone=config.backbone, image_size=config.image_size), device)
    encoder = with_head(base, base.feature_dim, device)
    encoder.train()
    size = encoder.data_config["input_size"][-1]
    x = torch.randn(config.batch_size, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)

    def bare_rate() -> float:
        times = []
        for i in range(args.steps + 1):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            with autocast(device, config.amp):
                out = encoder(x)
            out.float().sum().backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i:  # the first step warms up kernels and allocator
                times.append(time.perf_counter() - t)
        return config.batch_size / float(np.median(times))

    # Measured before and after the loop; the faster of the two is the reference (a busy machine only
    # ever makes a measurement slower).
    bare_before = bare_rate()

    with tempfile.TemporaryDirectory() as tmp:
        # Real photos (8 per class, so that validation stays small), else generated photo-sized JPEGs.
        src = Path(args.data) if args.data else DATASETS / "caltech101-dev"
        if not src.exists():
            src = Path(tmp) / "data"
            rng = np.random.default_rng(0)
            for c in range(16):
                (src / f"c{c}").mkdir(parents=True)
                for k in range(16):
                    Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(src / f"c{c}" / f"{k}.jpg")
        step_rates: list[float] = []
        last = {"t": None, "n": 0}

        def progress(done, total):
            if done:  # a step finished (done == 0 opens the epoch)
                now = time.perf_counter()
                if last["t"] is not None:
                    step_rates.append(config.batch_size / (now - last["t"]))
                last["t"] = now

        train(src, Path(tmp) / "run", config, progress=progress)
    loop = float(np.median(step_rates)) if step_rates else float("nan")
    bare_after = bare_rate()
    bare = max(bare_before, bare_after)
    print(f"device {device}, backbone {config.backbone}, image size {size}, batch {config.batch_size}, "
          f"workers {config.workers}, threads {torch.get_num_threads()}")
    print(f"bare forward+backward: {bare:.1f} images/s (before {bare_before:.1f}, after {bare_after:.1f}); training loop: {loop:.1f} images/s (median over "
          f"{len(step_rates)} steps after the first); ratio {loop / bare:.3f}")
    print(json.dumps({"bare_images_per_s": bare, "loop_images_per_s": loop, "ratio": loop / bare}))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["throughput", "caltech", "omniglot", "orl"])
    parser.add_argument("--out", default=None, help="run folder (quality runs)")
    parser.add_argument("--preset", default="cpu-quick")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--set", action="append", help="extra TrainConfig field=value (JSON values)")
    parser.add_argument("--verbose", action="store_true", help="progress bars on stderr")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--data", default=None, help="throughput: a class folder to read (default caltech101-dev)")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.what != "throughput" and not args.out:
        parser.error("--out RUN_DIR is needed")
    {"throughput": throughput, "caltech": caltech, "omniglot": omniglot, "orl": orl}[args.what](args)


if __name__ == "__main__":
    main()
