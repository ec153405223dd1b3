"""Validation of a run: the fixed held-out material, its figures for one epoch, and the run's plots.

Validation picks the best epoch: MAP@R on unseen classes for class data, ROC AUC for a pair list.
It also calibrates the threshold saved with each checkpoint (the pair-accuracy-maximising distance).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from engine.errors import DataError
from train.data import ClassData, PairData, PKSampler

if TYPE_CHECKING:
    from engine.encoder import Encoder
    from train.cache import FeatureCache
    from train.config import TrainConfig
    from train.losses import MetricLoss

_LOSS_BATCHES = 16  # fixed P x K batches the validation loss of class data averages over


@dataclass
class Validation:
    """Fixed validation material. paths: the images; labels: int64 [N] classes (for a pair list, the
    components of its similar pairs; None when fewer than two have two images); i, j, same: int64 [P]
    verification pairs (sampled from the classes, or the list's own pairs); loss_batches: fixed P x K
    batches (int64 index arrays) for the validation loss of class data (a pair list uses its pairs);
    select: the figure that picks the best epoch."""

    paths: list[str]
    labels: np.ndarray | None
    i: np.ndarray
    j: np.ndarray
    same: np.ndarray
    loss_batches: list[np.ndarray]
    select: str


def validation_set(val: ClassData | PairData, config: TrainConfig, loss_shape: tuple[int, int]) -> Validation:
    """The validation material of ``val``; ``loss_shape`` is the training batch's (P, K)."""
    from engine.metrics import sample_pairs

    if isinstance(val, PairData):
        counts = np.bincount(val.groups)
        labels = val.groups if (counts >= 2).sum() >= 2 else None
        # The listed pairs are the ground truth; components only approximate classes.
        return Validation(list(val.images), labels, val.a, val.b, val.same, [], "roc_auc")
    i, j, same = sample_pairs(val.labels, int(config.val_pairs), seed=config.seed)
    p, k = loss_shape
    sampler = PKSampler(val.labels, max(2, p), k, seed=config.seed + 7919)
    batches = [np.asarray(b, np.int64) for _, b in zip(range(_LOSS_BATCHES), sampler)]
    return Validation(list(val.paths), val.labels, i, j, same, batches, "map@r")


def score(embeddings: np.ndarray, vs: Validation, loss_fn: MetricLoss) -> dict[str, float]:
    """Validation figures of embeddings float32 [N, D]: retrieval (recall@1/5, precision@10, MAP@R,
    when there are classes), verification (pair accuracy at the calibrated threshold, ROC AUC, the
    threshold) and the loss."""
    from engine.metrics import pair_distances, retrieval_metrics, verification_metrics

    out: dict[str, Any] = {}
    if vs.labels is not None:
        r = retrieval_metrics(embeddings, vs.labels, ks=(1, 5, 10))
        for key in ("recall@1", "recall@5", "precision@10", "map@r"):
            out[key] = float(r[key])
    d = pair_distances(embeddings[vs.i], embeddings[vs.j])
    v = verification_metrics(d, vs.same)
    out["pair_accuracy"] = float(v["best_accuracy"])
    out["roc_auc"] = float(v["roc_auc"])
    out["threshold"] = float(v["best_threshold"])
    emb = torch.from_numpy(embeddings)
    with torch.no_grad():
        if vs.loss_batches:
            lab = torch.from_numpy(vs.labels)
            out["val_loss"] = float(np.mean([float(loss_fn(emb[b], lab[b]).loss) for b in vs.loss_batches]))
        else:
            pairs = tuple(torch.from_numpy(a) for a in (vs.i, vs.j, vs.same))
            out["val_loss"] = float(loss_fn(emb, pairs=pairs).loss)
    return out


def embed_paths(encoder: Encoder, paths: list[str], workers: int) -> np.ndarray:
    """Embeddings float32 [N, D] of validation images. Raises DataError when any fails to decode."""
    from engine.embedding import embed_files

    result = embed_files(encoder, paths, batch_size=64, workers=workers)
    if result.failures:
        raise DataError(f"{len(result.failures)} validation images cannot be decoded: "
                        + "; ".join(f"{p}: {r}" for p, r in result.failures[:5]))
    return result.embeddings


def embed_validation(encoder: Encoder, vs: Validation, cache: FeatureCache | None, workers: int,
                     held: torch.Tensor | None = None) -> np.ndarray:
    """Validation embeddings float32 [N, D] in eval mode: through the cached tail, from ``held`` (the
    validation images already decoded by the eval transform, float [N, 3, H, W]), or from the files."""
    if cache is not None:
        return cache.embed_val()
    encoder.eval()  # a learning stage left in train mode would validate with batch statistics
    if held is not None:
        return np.concatenate([encoder.embed(held[s:s + 256].float()) for s in range(0, len(held), 256)])
    return embed_paths(encoder, vs.paths, workers)


def saved_embeddings(path: Path, vs: Validation, device: torch.device, workers: int,
                     cache: FeatureCache | None) -> np.ndarray:
    """Validation embeddings float32 [N, D] of the checkpoint saved at ``path`` (the figures of a
    resumed run whose best epoch came before the interruption)."""
    from engine.encoder import load_checkpoint
    from train.backbone import Tail, backbone_parts
    from train.cache import FeatureCache

    best = load_checkpoint(path, device)
    if cache is not None:
        tail = Tail(best, backbone_parts(best.backbone), cache.tail.cut)
        return FeatureCache(tail, [], cache.val, set(), cache.seed).embed_val()
    return embed_paths(best, vs.paths, workers)


def write_figures(out_dir: Path, history: list[dict], vs: Validation, embeddings: np.ndarray,
                  threshold: float | None) -> None:
    """loss.png, distances.png and pairs.png of the run (``train.plots``) for the best epoch's
    validation embeddings float32 [N, D]."""
    from engine.metrics import pair_distances
    from train.plots import write_run_plots

    d = pair_distances(embeddings[vs.i], embeddings[vs.j])
    write_run_plots(out_dir, history, vs.paths, vs.i, vs.j, vs.same, d, threshold)
