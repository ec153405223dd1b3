"""``engine train DATA --whiten-only``: fit a whitening layer (``engine.whitening``) on an encoder's
embeddings of labelled images and write it into a checkpoint, in seconds, without training.

The encoder is the one a training run would start from (``--backbone``/``--weights``; the
pretrained lite0 by default). Its embeddings of the training images, taken before any whitening of
its own, fit the whitening: "learned" with the class labels (a pair list's classes are the groups
its similar pairs connect), or "pca" without. The classes held out for validation (as training
holds them out: ``--val-classes``, ``--val-group-sep`` or ``--val``) are never fitted on: they
measure the encoder before and after, and calibrate the checkpoint's threshold. The run folder
gets ``checkpoint.pt`` (the encoder with its whitening layer, ``engine.encoder.with_whitening``)
and ``metrics.json``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.errors import DataError, EngineError
from engine.whitening import DEFAULT_SHRINKAGE, KINDS, fit_learned_whitening, fit_pca_whitening
from train.config import TrainConfig, resolve_preset

if TYPE_CHECKING:
    from engine.encoder import Encoder
    from engine.progress import ProgressFn
    from train.data import ClassData, PairData

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"
# The whitened size when --dim is not given (or the encoder's width, if smaller): 256 scored as well
# as the full 1280 or better on photos, faces and characters, and makes the index 5x smaller.
DEFAULT_DIM = 256


@dataclass(frozen=True)
class WhiteningResult:
    """What ``fit_whitening_run`` wrote. before / after: validation figures (recall@1, precision@10,
    map@r when there are classes; roc_auc, pair_accuracy) of the encoder without and with the
    whitening, on images it was not fitted on."""

    out_dir: Path
    checkpoint: Path
    whitening: dict[str, Any]
    before: dict[str, float]
    after: dict[str, float]
    threshold: float
    wall_s: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"out_dir": str(self.out_dir), "checkpoint": str(self.checkpoint), "whitening": self.whitening,
                "before": self.before, "after": self.after, "threshold": self.threshold,
                "wall_s": round(self.wall_s, 3), "notes": list(self.notes)}


def fit_whitening_run(data: str | Path, out_dir: str | Path, config: TrainConfig = TrainConfig(whiten_only=True),
                      progress: ProgressFn | None = None) -> WhiteningResult:
    """Fit a whitening on ``data`` (a class folder or a pair CSV) and write the run folder ``out_dir``.

    config: ``whiten`` (kind), ``whiten_shrinkage``, ``dim`` (the whitened size; None: DEFAULT_DIM),
    the encoder fields (backbone, image_size, pretrained, weights) and the split fields (val,
    val_classes, val_group_sep, max_per_class, val_pairs, seed, workers). progress(done, total):
    images embedded. Raises DataError for unusable data or options, EngineError when ``out_dir``
    already holds a run, ModelError for an unusable encoder."""
    from engine.atomic import write_atomic
    from engine.checkpoint import save_checkpoint
    from engine.encoder import with_whitening, without_whitening
    from engine.loader import default_workers

    started = time.perf_counter()
    config = resolve_preset(config)
    out_dir = Path(out_dir)
    if (out_dir / CHECKPOINT).exists():
        raise EngineError(f"{out_dir} already holds a run; choose another --out")
    train_set, val_set = _split(data, config)
    kind = config.whiten or ("pca" if _is_pairs(train_set) else "learned")
    if kind not in KINDS:
        raise DataError(f"unknown whitening {kind!r} (use {', '.join(KINDS)})")
    shrinkage = DEFAULT_SHRINKAGE[kind] if config.whiten_shrinkage is None else float(config.whiten_shrinkage)
    base = _base_encoder(config)
    bare = without_whitening(base)
    workers = default_workers() if config.workers is None else config.workers
    train_paths, train_labels = _images(train_set)
    val_paths, val_labels = _images(val_set)
    if progress:
        progress(0, len(train_paths) + len(val_paths))
    features = _embed(bare, train_paths + val_paths, workers, progress)
    fit_x, val_x = features[:len(train_paths)], features[len(train_paths):]
    dim = config.dim or min(DEFAULT_DIM, fit_x.shape[1])
    if kind == "learned":
        whitening = fit_learned_whitening(fit_x, train_labels, dim, shrinkage)
    else:
        whitening = fit_pca_whitening(fit_x, dim, shrinkage)
    encoder = with_whitening(base, whitening.mean, whitening.projection)
    before = _figures(val_x, val_labels, config)
    after = _figures(whitening.apply(val_x), val_labels, config)
    notes = _notes(before, after)
    for note in notes:
        log.warning(note)
    facts = dict(whitening.describe(), fitted_on=str(data))
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = save_checkpoint(encoder, out_dir / CHECKPOINT, threshold=after["threshold"],
                                 metadata={"whitening": facts, "validation": after, "validation_before": before})
    result = WhiteningResult(out_dir, checkpoint, facts, before, after, after["threshold"],
                             time.perf_counter() - started, notes)
    write_atomic(out_dir / METRICS, json.dumps(result.to_dict(), indent=2).encode())
    return result


def _is_pairs(data: ClassData | PairData) -> bool:
    from train.data import PairData

    return isinstance(data, PairData)


def _split(data: str | Path, config: TrainConfig) -> tuple[ClassData | PairData, ClassData | PairData]:
    """(fitting set, validation set) as a training run splits them."""
    from train.data import PairData, load_data, split_classes, split_pairs

    everything = load_data(data, max_per_class=config.max_per_class, seed=config.seed)
    if config.val:
        return everything, load_data(config.val, max_per_class=config.max_per_class, seed=config.seed,
                                     what="validation data")
    if isinstance(everything, PairData):
        return split_pairs(everything, float(config.val_classes), config.seed)
    return split_classes(everything, float(config.val_classes), config.seed, config.val_group_sep)


def _images(data: ClassData | PairData) -> tuple[list[str], np.ndarray]:
    """(paths, labels int64): a class folder's, or a pair list's images labelled by the groups of
    images its similar pairs connect."""
    from train.data import PairData

    if isinstance(data, PairData):
        return list(data.images), np.asarray(data.groups, np.int64)
    return list(data.paths), np.asarray(data.labels, np.int64)


def _base_encoder(config: TrainConfig) -> Encoder:
    from engine.config import EncoderConfig
    from engine.encoder import build_encoder, resolve_device

    encoder_config = EncoderConfig(backbone=config.backbone, image_size=config.image_size,
                                   pretrained=bool(config.pretrained), weights=config.weights)
    return build_encoder(encoder_config, resolve_device(config.device))


def _embed(encoder: Encoder, paths: list[str], workers: int, progress: ProgressFn | None) -> np.ndarray:
    """Embeddings float32 [N, E] of every path. Raises DataError when one cannot be decoded."""
    from engine.embedding import embed_files

    done = embed_files(encoder, paths, batch_size=64, workers=workers, progress=progress)
    if done.failures:
        raise DataError(f"{len(done.failures)} images cannot be decoded: "
                        + "; ".join(f"{p}: {r}" for p, r in done.failures[:5]))
    return done.embeddings


def _figures(embeddings: np.ndarray, labels: np.ndarray, config: TrainConfig) -> dict[str, float]:
    """Validation figures of unit embeddings float32 [N, D] with labels int64 [N]: retrieval when a
    class has two images, and verification on seeded pairs (with the calibrated threshold)."""
    from engine.metrics import pair_distances, retrieval_metrics, sample_pairs, verification_metrics

    out: dict[str, float] = {}
    if np.bincount(labels).max() >= 2:
        r = retrieval_metrics(embeddings, labels, ks=(1, 5, 10))
        out.update({k: float(r[k]) for k in ("recall@1", "precision@10", "map@r")})
    i, j, same = sample_pairs(labels, int(config.val_pairs), seed=config.seed)
    v = verification_metrics(pair_distances(embeddings[i], embeddings[j]), same)
    out.update(roc_auc=float(v["roc_auc"]), pair_accuracy=float(v["best_accuracy"]),
               threshold=float(v["best_threshold"]))
    return out


def _notes(before: dict[str, float], after: dict[str, float]) -> list[str]:
    """Plain warnings when the whitening made the held-out figures worse."""
    worse = [k for k in ("map@r", "recall@1", "roc_auc") if k in before and after[k] < before[k] - 1e-9]
    if not worse:
        return []
    return ["the whitening lowers " + ", ".join(f"{k} {before[k]:.4f} -> {after[k]:.4f}" for k in worse)
            + " on the held-out classes: keep the encoder without it, or try more --whiten-shrinkage"]

