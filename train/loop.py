"""Siamese fine-tuning, top to bottom: data -> encoder -> loss -> epochs -> validation -> run folder.

``train(data, out_dir, config)`` fine-tunes the same ``Encoder`` that ingest and query use (the twin
branches of a pair are one module, so their weights are shared by construction) and writes a run folder:

    checkpoint.pt   the best epoch by validation MAP@R on unseen classes (epoch 0, the untouched
                    encoder, is a candidate), with its calibrated threshold; loads with
                    ``engine.encoder.load_checkpoint``
    last.pt         the latest epoch with optimizer and schedule, for ``resume=True``
    metrics.jsonl   one line per epoch (epoch 0 = before training)
    loss.png, distances.png, pairs.png

Two ways to run an epoch. Images: decode + timm training augmentation, forward and backward through
the trainable part. Cached: when the first stages of the backbone stay frozen for the whole run, their
output is computed once per image (eval transform, optionally a few augmented views) and only the
trainable tail runs per step; on CPU that turns hours into minutes. Validation MAP@R picks the best
epoch either way.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from engine.config import DEFAULT_BACKBONE, EncoderConfig
from engine.errors import DataError, EngineError, ModelError
from train.data import (ClassBatches, ClassData, ImageBatch, PairBatches, PairBatchSampler, PairData, PKSampler,
                        TrainImages, batch_pairs, collate_slots, load_data, split_classes, split_pairs)
from train.losses import LOSSES, MINERS, build_loss

log = logging.getLogger(__name__)

Progress = Callable[[str, dict], None]

CHECKPOINT = "checkpoint.pt"
LAST = "last.pt"
METRICS = "metrics.jsonl"
PRESETS_AVAILABLE = ("gpu", "cpu-quick")


# ------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs; the CLI maps its options onto these names with ``dataclasses.replace``.

    ``None`` on a tunable field means "not given": ``resolve_preset`` fills it from the preset (or the
    GPU-oriented defaults). After resolving, ``None`` keeps its documented meaning below.

    loss: contrastive | triplet | multi-similarity (None: triplet for class folders, contrastive for a
    pair list). miner: all | batch-hard | semi-hard (None: batch-hard for triplet, all for the pair
    losses; a pair list takes no miner). margin: the loss margin on the L2 distance
    (None: 1.0 contrastive, 0.2 triplet; for multi-similarity the epsilon of its mining rule).
    batch_size: images per batch (= classes_per_batch x images_per_class for class folders; a pair list
    takes batch_size // 2 pairs). lr: head learning rate; backbone_lr: the backbone's (None: lr / 10).
    warmup_epochs: linear warm-up, then cosine decay to zero. dim: embedding size of the projection
    head (None: the backbone's feature width, the head starting as the identity so epoch 0 is exactly the
    pretrained encoder; smaller heads start from a PCA of the training features). image_size: None = the
    backbone's default. freeze_epochs: backbone frozen for the first N epochs. train_stages: only the
    last N backbone stages learn (0 = head only; None = all). val_classes: share of classes held out
    for validation (split by class, seeded); val: a separate validation folder or pair CSV instead.
    max_per_class: cap images per class (seeded).

    Extra fields: grad_clip (max gradient norm; 0 = off), patience (stop after N epochs without a better
    validation score; 0 = never), val_group_sep (hold out class *groups*: classes whose names share
    the part before this separator, e.g. "__" for omniglot alphabets), val_pairs (validation pairs for
    verification and threshold), cache_features (None = auto: when the whole backbone stays frozen),
    cache_views (cached views per training image: 1 = the plain view, more adds augmented views),
    steps_per_epoch (None: one pass over the training images), pretrained (ImageNet weights), weights
    (start from this checkpoint or weights file), amp (None: on for CUDA), plots (write the PNG figures).
    """

    loss: str | None = None
    miner: str | None = None
    margin: float | None = None
    epochs: int | None = None
    batch_size: int | None = None
    classes_per_batch: int | None = None
    images_per_class: int | None = None
    lr: float | None = None
    backbone_lr: float | None = None
    weight_decay: float | None = None
    warmup_epochs: float | None = None
    dim: int | None = None
    backbone: str | None = None
    image_size: int | None = None
    freeze_epochs: int | None = None
    train_stages: int | None = None
    val_classes: float | None = None
    val: str | None = None
    preset: str | None = None
    seed: int = 0
    device: str = "auto"
    workers: int | None = None
    max_per_class: int | None = None
    grad_clip: float | None = None
    patience: int | None = None
    val_group_sep: str | None = None
    val_pairs: int | None = None
    cache_features: bool | None = None
    cache_views: int | None = None
    steps_per_epoch: int | None = None
    pretrained: bool = True
    weights: str | None = None
    amp: bool | None = None
    plots: bool = True


# Defaults for a GPU: fine-tune the whole backbone gently (its learning rate 30x below the head's) after
# one epoch of head only; batch-hard triplets; validation MAP@R on unseen classes picks the epoch.
DEFAULTS: dict[str, Any] = dict(
    loss=None, miner=None, margin=None, epochs=30, images_per_class=4, batch_size=128,
    lr=3e-4, backbone_lr=1e-5, weight_decay=1e-4, warmup_epochs=1.0, backbone=DEFAULT_BACKBONE,
    freeze_epochs=1, train_stages=None, val_classes=0.2, grad_clip=2.0, patience=8, val_pairs=4000,
    cache_views=1,
)

PRESETS: dict[str, dict[str, Any]] = {
    "gpu": dict(DEFAULTS),
    # Two CPU cores, 20 minutes: the backbone stays frozen and its pooled features are computed once
    # per image (the plain view and one augmented view); the identity-initialised head then trains for
    # up to 30 epochs of a second or two each, and validation MAP@R picks the best. Multi-similarity
    # loss: on omniglot batch-hard triplets scored the same but squeezed all embeddings into a tiny
    # ball (loss stuck at the margin, every triplet active, calibrated threshold ~0.1); MS kept them
    # spread. --train-stages 1 also trains the last stage on its cached input (slower; on omniglot
    # about 2 points better one-shot, on caltech no better).
    "cpu-quick": dict(
        DEFAULTS, loss="multi-similarity", epochs=30, batch_size=128, images_per_class=4, lr=1e-3,
        backbone_lr=1e-4, weight_decay=1e-4, warmup_epochs=1.0, freeze_epochs=0, train_stages=0,
        cache_features=True, cache_views=2, patience=8,
    ),
}


def resolve_preset(config: TrainConfig) -> TrainConfig:
    """Fill every field left ``None`` from ``config.preset`` (None: the GPU-oriented defaults); fields
    the caller set are kept. Raises DataError for an unknown preset or option value."""
    if config.preset is not None and config.preset not in PRESETS:
        raise DataError(f"unknown preset {config.preset!r} (use {', '.join(PRESETS)})")
    preset = PRESETS[config.preset] if config.preset else DEFAULTS
    values = {k: v for k, v in preset.items() if getattr(config, k) is None}
    out = replace(config, **values)
    if out.loss is not None and out.loss not in LOSSES:
        raise DataError(f"unknown loss {out.loss!r} (use {', '.join(LOSSES)})")
    if out.miner is not None and out.miner not in MINERS:
        raise DataError(f"unknown miner {out.miner!r} (use {', '.join(MINERS)})")
    for name, least in (("epochs", 0), ("batch_size", 2), ("images_per_class", 1), ("classes_per_batch", 2),
                        ("max_per_class", 2), ("cache_views", 1), ("val_pairs", 2)):
        value = getattr(out, name)
        if value is not None and int(value) < least:
            raise DataError(f"--{name.replace('_', '-')} must be at least {least}, not {value}")
    if out.val is None and not (0.0 < float(out.val_classes) < 1.0):
        raise DataError(f"--val-classes must be between 0 and 1 (or pass --val DATA), not {out.val_classes}")
    return out


# ------------------------------------------------------------------------------------------- result


@dataclass
class TrainResult:
    """What a run produced. best_metrics: the validation figures of the chosen epoch (epoch 0 = the
    untouched encoder); history: one dict per epoch as in metrics.jsonl."""

    out_dir: Path
    checkpoint: Path
    best_epoch: int
    best_metrics: dict
    threshold: float | None
    history: list[dict]
    config: TrainConfig
    select_metric: str
    stopped_early: bool = False
    wall_s: float = 0.0

    def to_dict(self) -> dict:
        return {
            "out_dir": str(self.out_dir),
            "checkpoint": str(self.checkpoint),
            "best_epoch": self.best_epoch,
            "best_metrics": self.best_metrics,
            "threshold": self.threshold,
            "select_metric": self.select_metric,
            "stopped_early": self.stopped_early,
            "wall_s": self.wall_s,
            "config": asdict(self.config),
            "history": self.history,
        }


# ------------------------------------------------------------------------------------------- backbone parts


@dataclass
class BackboneParts:
    """A timm backbone cut into stem, stages and post (the layers between the last stage and pooling),
    so a frozen prefix can be computed once and only the tail run per step."""

    stem: list[nn.Module]
    stages: list[nn.Module]
    post: list[nn.Module]

    def prefix(self, k: int) -> list[nn.Module]:
        """The modules before stage ``k`` (k = len(stages) means everything before pooling)."""
        return self.stem + self.stages[:k] + (self.post if k >= len(self.stages) else [])

    def suffix(self, k: int) -> list[nn.Module]:
        return self.stages[k:] + (self.post if k < len(self.stages) else [])


def backbone_parts(backbone: nn.Module) -> BackboneParts | None:
    """Stages of the timm families this knows (EfficientNet / MobileNet-style ``blocks``, ResNet
    ``layer1..4``); None for others, which then train whole or not at all."""
    from timm.models.efficientnet import EfficientNet
    from timm.models.resnet import ResNet

    if isinstance(backbone, EfficientNet):
        return BackboneParts([backbone.conv_stem, backbone.bn1], list(backbone.blocks),
                             [backbone.conv_head, backbone.bn2])
    if isinstance(backbone, ResNet):
        return BackboneParts([backbone.conv1, backbone.bn1, backbone.act1, backbone.maxpool],
                             [backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4], [])
    return None


def _run(modules: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    for m in modules:
        x = m(x)
    return x


class Tail(nn.Module):
    """The trainable end of an encoder from stage ``k`` on: cached prefix output -> unit embedding.
    With ``k`` = None the cache holds pooled features and only the head runs."""

    def __init__(self, encoder, parts: BackboneParts | None, k: int | None):
        super().__init__()
        self.encoder = encoder
        self.modules_ = parts.suffix(k) if (parts is not None and k is not None) else []
        self.cut = k
        self.pooled = k is None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.pooled:
            x = self.encoder.backbone.forward_head(_run(self.modules_, x))
        return nn.functional.normalize(self.encoder.head(x), dim=1)


def _trainable_backbone(encoder, parts: BackboneParts | None, train_stages: int | None) -> list[nn.Module]:
    """The backbone modules that learn (in order). Raises ModelError when stages cannot be chosen."""
    if train_stages is None:
        return [encoder.backbone]
    if train_stages <= 0:
        return []
    if parts is None:
        raise ModelError(f"--train-stages is not supported for {encoder.config.backbone}; leave it out (train "
                         "all) or use 0 (head only)")
    if train_stages >= len(parts.stages):
        return [encoder.backbone]
    return parts.suffix(len(parts.stages) - train_stages)


def _cache_cut(parts: BackboneParts | None, train_stages: int | None) -> int | None:
    """Stage index where the cached (frozen) prefix ends; None = cache pooled features (head only).
    Raises ModelError when the trainable part has no frozen prefix to cache."""
    if train_stages is not None and train_stages <= 0:
        return None
    if train_stages is None or parts is None or train_stages >= len(parts.stages):
        raise ModelError("cached features need a frozen backbone prefix: pass --train-stages smaller than the "
                         "backbone's number of stages, or turn feature caching off")
    return len(parts.stages) - train_stages


# ------------------------------------------------------------------------------------------- helpers


def _seed_all(seed: int, epoch: int) -> None:
    s = (int(seed) * 1_000_003 + int(epoch)) % (2**31 - 1)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def _set_modes(encoder, trainable: list[nn.Module], frozen_backbone: bool) -> None:
    """Train mode for what learns, eval (BatchNorm statistics fixed) for everything frozen."""
    encoder.eval()
    encoder.head.train()
    if not frozen_backbone:
        for m in trainable:
            m.train()


def _set_requires_grad(encoder, trainable: list[nn.Module], frozen_backbone: bool) -> None:
    for p in encoder.backbone.parameters():
        p.requires_grad_(False)
    if not frozen_backbone:
        for m in trainable:
            for p in m.parameters():
                p.requires_grad_(True)
    for p in encoder.head.parameters():
        p.requires_grad_(True)


def _param_groups(encoder, trainable: list[nn.Module], config: TrainConfig) -> list[dict]:
    def split(params):
        decay = [p for p in params if p.ndim > 1]
        rest = [p for p in params if p.ndim <= 1]
        return decay, rest

    seen: set[int] = set()
    backbone_params = []
    for m in trainable:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                backbone_params.append(p)
    head_params = list(encoder.head.parameters())
    groups = []
    backbone_lr = config.backbone_lr if config.backbone_lr is not None else config.lr / 10
    for params, lr, name in ((head_params, config.lr, "head"), (backbone_params, backbone_lr, "backbone")):
        decay, rest = split(params)
        if decay:
            groups.append({"params": decay, "lr": lr, "weight_decay": config.weight_decay, "name": name})
        if rest:
            groups.append({"params": rest, "lr": lr, "weight_decay": 0.0, "name": name})
    return groups


def _schedule(config: TrainConfig, steps_per_epoch: int, group: str) -> Callable[[int], float]:
    """Warm-up then cosine, per step. The backbone's schedule starts when it unfreezes."""
    total = config.epochs * steps_per_epoch
    start = config.freeze_epochs * steps_per_epoch if group == "backbone" else 0
    warm = max(1, int(round(config.warmup_epochs * steps_per_epoch)))

    def factor(step: int) -> float:
        if step < start:
            return 0.0
        s = step - start
        if s < warm:
            return (s + 1) / warm
        span = max(1, total - start - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (s - warm) / span)))

    return factor


def _pca_head(encoder, features: np.ndarray) -> None:
    """Start a head narrower than the features as the PCA projection of (centred) training features."""
    x = torch.from_numpy(np.asarray(features, np.float64))
    mean = x.mean(0)
    _, _, v = torch.linalg.svd(x - mean, full_matrices=False)
    w = v[: encoder.dim].float()
    with torch.no_grad():
        encoder.head.weight.copy_(w.to(encoder.head.weight.device))
        encoder.head.bias.copy_((-(w @ mean.float())).to(encoder.head.bias.device))


def _emit(progress: Progress | None, event: str, **info) -> None:
    if progress is not None:
        progress(event, info)


# ------------------------------------------------------------------------------------------- data


def _prepare_data(data, config: TrainConfig) -> tuple[ClassData | PairData, ClassData | PairData]:
    """(training set, validation set): a separate --val set, or classes held out of ``data``."""
    if isinstance(data, (ClassData, PairData)):
        train_all = data
    else:
        train_all = load_data(data, max_per_class=config.max_per_class, seed=config.seed)
    if config.val:
        val = load_data(config.val, max_per_class=config.max_per_class, seed=config.seed, what="validation data")
        if isinstance(val, ClassData) and isinstance(train_all, ClassData):
            shared = sorted(set(val.classes) & set(train_all.classes))
            if shared:
                log.warning("validation shares %d class names with training (%s...): figures on them are not "
                            "on unseen classes", len(shared), ", ".join(shared[:3]))
        return train_all, val
    if isinstance(train_all, ClassData):
        train, val = split_classes(train_all, float(config.val_classes), config.seed, config.val_group_sep)
    else:
        train, val = split_pairs(train_all, float(config.val_classes), config.seed)
    return train, val


def _batch_shape(config: TrainConfig, train: ClassData | PairData) -> tuple[int, int]:
    """(P, K) for class data; (pairs per batch, 2) for pair lists."""
    if isinstance(train, PairData):
        return max(1, config.batch_size // 2), 2
    k = int(config.images_per_class)
    p = int(config.classes_per_batch or max(2, config.batch_size // k))
    return min(p, train.num_classes), k


# ------------------------------------------------------------------------------------------- validation


@dataclass
class _Validation:
    """Fixed validation material. paths: the images; labels: int64 [N] classes (for a pair list, the
    components of its similar pairs; None when fewer than two have two images); i, j, same: the
    verification pairs (sampled from the classes, or the list's own pairs); loss_batches: fixed P x K
    batches for the validation loss of class data (a pair list uses its pairs)."""

    paths: list[str]
    labels: np.ndarray | None
    i: np.ndarray
    j: np.ndarray
    same: np.ndarray
    loss_batches: list[np.ndarray]
    select: str  # the figure that picks the best epoch


def _validation_set(val: ClassData | PairData, config: TrainConfig, loss_shape: tuple[int, int]) -> _Validation:
    from engine.metrics import sample_pairs

    if isinstance(val, PairData):
        counts = np.bincount(val.groups)
        labels = val.groups if (counts >= 2).sum() >= 2 else None
        # The listed pairs are the ground truth; components only approximate classes.
        return _Validation(list(val.images), labels, val.a, val.b, val.same, [], "roc_auc")
    i, j, same = sample_pairs(val.labels, int(config.val_pairs), seed=config.seed)
    p, k = loss_shape
    sampler = PKSampler(val.labels, max(2, p), k, seed=config.seed + 7919)
    batches = [np.asarray(b, np.int64) for _, b in zip(range(16), sampler)]
    return _Validation(list(val.paths), val.labels, i, j, same, batches, "map@r")


def _score(embeddings: np.ndarray, vs: _Validation, loss_fn) -> dict:
    """Validation figures of embeddings float32 [N, D]: retrieval (recall@1/5, precision@10, MAP@R),
    verification (pair accuracy at the calibrated threshold, ROC AUC, the threshold) and the loss."""
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


# ------------------------------------------------------------------------------------------- feature cache


@torch.inference_mode()
def _compute_cache(encoder, modules: list[nn.Module], pooled: bool, paths: list[str], transform,
                   config: TrainConfig, progress: Progress | None,
                   what: str) -> tuple[torch.Tensor, list[tuple[int, str]]]:
    """The frozen prefix's output for every image: float32 [N, ...] on the encoder's device, and the
    failures as (position, 'path: reason'). Images that fail to decode get zeros."""
    from engine.loader import ImageFileDataset, decode_batches
    from engine.preprocess import draft_size_for

    encoder.eval()
    device = encoder.device
    dataset = ImageFileDataset(paths, transform, draft_size_for(encoder.data_config))
    out: torch.Tensor | None = None
    failures: list[tuple[int, str]] = []
    done = 0
    batch_size = 64
    for batch in decode_batches(dataset, batch_size, config.workers):
        if batch.images is not None:
            x = batch.images.to(device).contiguous(memory_format=torch.channels_last)
            with _autocast(device, config):
                y = _run(modules, x)
                if pooled:
                    y = encoder.backbone.forward_head(y)
            y = y.float()
            if out is None:
                out = torch.zeros((len(paths), *y.shape[1:]), dtype=torch.float32, device=device)
                if y.ndim == 4:
                    out = out.contiguous(memory_format=torch.channels_last)
            out[[it.position for it in batch.items]] = y
        failures.extend((it.position, f"{it.path}: {it.error}") for it in batch.failures)
        done += len(batch.items) + len(batch.failures)
        _emit(progress, "cache", what=what, done=done, total=len(paths))
    if out is None:
        raise DataError(f"no {what} image could be decoded")
    return out, failures


def _autocast(device: torch.device, config: TrainConfig):
    if device.type == "cuda" and config.amp is not False:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", enabled=False)


# ------------------------------------------------------------------------------------------- the run


def train(data, out_dir, config: TrainConfig = TrainConfig(), progress: Progress | None = None,
          resume: bool = False) -> TrainResult:
    """Fine-tune an encoder on ``data`` (a class folder, a pair CSV, or a loaded ClassData / PairData)
    and write the run folder ``out_dir``. ``progress(event, info)`` receives "cache", "epoch", "step",
    "validate" and "epoch_end" events (see ``TqdmProgress``). ``resume=True`` continues the run in
    ``out_dir`` from its last completed epoch with the same configuration.

    Raises DataError for bad data, ModelError for an unusable backbone or checkpoint, EngineError
    when ``out_dir`` already holds a run and resume is off, or resume finds none."""
    from engine.loader import default_workers
    from engine.encoder import build_encoder, load_checkpoint, resolve_device

    started = time.perf_counter()
    out_dir = Path(out_dir)
    state: dict | None = None
    if resume:
        state = _load_state(out_dir / LAST)
        config = _resume_config(TrainConfig(**state["train_config"]), config)
    else:
        config = resolve_preset(config)
    if not resume and ((out_dir / LAST).exists() or (out_dir / CHECKPOINT).exists()):
        raise EngineError(f"{out_dir} already holds a training run: pass --resume to continue it or choose "
                          "another --out")
    device = resolve_device(config.device)
    workers = default_workers() if config.workers is None else config.workers
    _seed_all(config.seed, 0)

    # ---- data: training set, class-disjoint validation set, batches
    train_set, val_set = _prepare_data(data, config)
    pair_mode = isinstance(train_set, PairData)
    if config.loss is None:  # the default follows the data: a pair list brings pairs, classes allow triplets
        config = replace(config, loss="contrastive" if pair_mode else "triplet")
    if pair_mode and config.loss == "triplet":
        raise DataError("triplet loss needs class labels: train a pair list with --loss contrastive or "
                        "multi-similarity, or give a folder-per-class tree")
    if pair_mode and config.miner not in (None, "all"):
        raise DataError(f"--miner {config.miner} needs class labels; a pair list trains on its own pairs")
    loss_fn = build_loss(config.loss, "all" if pair_mode else config.miner, config.margin)
    config = replace(config, miner=loss_fn.miner_name, margin=loss_fn.margin)  # what the run used, for the record
    P, K = _batch_shape(config, train_set)
    if pair_mode:
        batches = PairBatches(train_set, PairBatchSampler(len(train_set), P, config.seed, config.steps_per_epoch))
        train_paths = train_set.images
    else:
        batches = ClassBatches(train_set.labels, PKSampler(train_set.labels, P, K, config.seed,
                                                           config.steps_per_epoch))
        train_paths = train_set.paths
    steps = len(batches)
    vs = _validation_set(val_set, config, (P, K))

    # ---- model: the encoder, what of it learns, and whether a frozen prefix is cached
    if state is not None:
        encoder = load_checkpoint(out_dir / LAST, device)
    else:
        base = build_encoder(EncoderConfig(backbone=config.backbone, image_size=config.image_size,
                                           pretrained=config.pretrained, weights=config.weights), device)
        encoder = _with_head(base, int(config.dim or base.feature_dim), device)
    parts = backbone_parts(encoder.backbone)
    trainable = _trainable_backbone(encoder, parts, config.train_stages)
    frozen_throughout = not trainable or config.freeze_epochs >= config.epochs
    use_cache = config.cache_features if config.cache_features is not None else frozen_throughout
    cache: _Cache | None = None
    if use_cache:
        if frozen_throughout:
            trainable = []
        elif config.freeze_epochs:
            log.info("cached features: the trainable stages learn from the first epoch (freeze_epochs applies "
                     "to image training only)")
        cut = _cache_cut(parts, 0 if frozen_throughout else config.train_stages)
        cache = _build_cache(encoder, parts, cut, train_paths, vs.paths, config, progress)
    if state is None and encoder.dim != encoder.feature_dim:
        features = cache.pooled_train() if cache is not None else _pooled_sample(encoder, train_paths, config)
        _pca_head(encoder, features)
    freeze_for = 0 if cache is not None else config.freeze_epochs

    # ---- optimizer: AdamW, warm-up + cosine per step (the backbone's starting when it unfreezes)
    _set_requires_grad(encoder, trainable, False)
    groups = _param_groups(encoder, trainable, config)
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    sched_cfg = replace(config, freeze_epochs=freeze_for)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [_schedule(sched_cfg, steps, g["name"]) for g in groups])
    fp16 = device.type == "cuda" and config.amp is not False and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=fp16)
    params = [p for g in groups for p in g["params"]]

    def validate(epoch: int) -> tuple[dict, np.ndarray]:
        _emit(progress, "validate", epoch=epoch)
        emb = cache.embed_val() if cache is not None else _embed_paths(encoder, vs.paths, workers)
        return _score(emb, vs, loss_fn), emb

    def save_best(epoch: int, metrics: dict) -> None:
        """checkpoint.pt: what ingest and query load (config, weights, calibrated threshold)."""
        _save(encoder, out_dir / CHECKPOINT, epoch, metrics["threshold"], config, val=metrics)

    def save_last(epoch: int) -> None:
        """last.pt: the latest epoch with everything ``resume`` needs."""
        _save(encoder, out_dir / LAST, epoch, best["threshold"], config, optimizer=optimizer.state_dict(),
              scheduler=scheduler.state_dict(), scaler=scaler.state_dict() if fp16 else None, history=history,
              best=best, bad_epochs=bad_epochs)

    # ---- epoch 0 (the untouched encoder is a candidate, so the run never ends worse on validation) or resume
    select = vs.select
    best_emb: np.ndarray | None = None
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        history, best, bad_epochs = list(state["history"]), dict(state["best"]), int(state["bad_epochs"])
        start_epoch = int(state["epoch"]) + 1
        _write_history(out_dir, history)
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        metrics, best_emb = validate(0)
        record = {"epoch": 0, "train_loss": None, "active": None, "lr": 0.0, "images_per_s": None,
                  "time_s": round(time.perf_counter() - t0, 3), **metrics, "best": True}
        best = {"epoch": 0, "score": metrics[select], "metrics": metrics, "threshold": metrics["threshold"]}
        history, bad_epochs, start_epoch = [record], 0, 1
        save_best(0, metrics)
        save_last(0)
        _write_history(out_dir, history)
        _emit(progress, "epoch_end", record=record)

    # ---- epochs
    stopped_early = False
    for epoch in range(start_epoch, config.epochs + 1):
        if config.patience and bad_epochs >= config.patience:
            stopped_early = True
            break
        frozen = epoch <= freeze_for or not trainable
        _set_requires_grad(encoder, trainable, frozen)
        _set_modes(encoder, trainable, frozen)
        _seed_all(config.seed, epoch)
        batches.set_epoch(epoch)
        _emit(progress, "epoch", epoch=epoch, epochs=config.epochs, steps=steps)
        t0 = time.perf_counter()
        losses, actives, images, failures = [], [], 0, []
        source = cache.batches(batches, epoch, pair_mode) if cache is not None else \
            _image_batches(batches, train_paths, encoder, config, workers, epoch)
        for step, (x, labels, pairs, failed) in enumerate(source, start=1):
            failures.extend(failed)
            if x is None or len(x) < 2 or (pairs is not None and len(pairs[0]) == 0):
                continue
            x = x.to(device, non_blocking=True)
            if x.ndim == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with _autocast(device, config):
                emb = cache.tail(x) if cache is not None else encoder(x)
            if pairs is not None:
                out = loss_fn(emb, pairs=tuple(torch.from_numpy(p).to(device) for p in pairs))
            else:
                out = loss_fn(emb, torch.from_numpy(labels).to(device))
            optimizer.zero_grad(set_to_none=True)
            if out.loss.requires_grad:  # a batch without a single pair or triplet has nothing to learn from
                scaler.scale(out.loss).backward()
                if config.grad_clip:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                scaler.step(optimizer)
                scaler.update()
            scheduler.step()
            losses.append(float(out.loss.detach()))
            actives.append(out.active)
            images += len(x)
            _emit(progress, "step", epoch=epoch, step=step, steps=steps, loss=losses[-1], active=out.active,
                  images_per_s=images / max(time.perf_counter() - t0, 1e-9))
        train_s = time.perf_counter() - t0
        if failures:
            log.warning("epoch %d: %d images failed to decode and were skipped: %s", epoch, len(failures),
                        "; ".join(failures[:3]))
        metrics, emb = validate(epoch)
        improved = metrics[select] > best["score"]
        record = {"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else None,
                  "active": float(np.mean(actives)) if actives else None,
                  "lr": float(optimizer.param_groups[0]["lr"]), "images_per_s": images / max(train_s, 1e-9),
                  "time_s": round(time.perf_counter() - t0, 3), "frozen_backbone": bool(frozen), **metrics,
                  "best": bool(improved)}
        history.append(record)
        if _collapsing(config, record):
            log.warning("epoch %d: the embeddings are collapsing (every triplet active, loss %.3f at the margin "
                        "%.3f): try --loss multi-similarity or a lower --lr", epoch, record["train_loss"],
                        config.margin)
        if improved:
            best = {"epoch": epoch, "score": metrics[select], "metrics": metrics, "threshold": metrics["threshold"]}
            bad_epochs, best_emb = 0, emb
            save_best(epoch, metrics)
        else:
            bad_epochs += 1
        save_last(epoch)
        _append(out_dir, record)
        _emit(progress, "epoch_end", record=record)

    # ---- figures of the best epoch
    if config.plots:
        if best_emb is None:  # a resumed run whose best epoch came before the interruption
            best_emb = _best_embeddings(out_dir / CHECKPOINT, vs, device, workers, config, cache)
        _run_plots(out_dir, history, vs, best_emb, best["threshold"])
    return TrainResult(out_dir, out_dir / CHECKPOINT, int(best["epoch"]), best["metrics"], best["threshold"],
                       history, config, select, stopped_early, round(time.perf_counter() - started, 2))


class _Cache:
    """The frozen prefix's output for every training image (one tensor per view) and validation image,
    and the trainable ``tail`` that turns it into embeddings."""

    def __init__(self, tail: "Tail", train_views: list[torch.Tensor], val: torch.Tensor, bad: set[int],
                 seed: int):
        self.tail = tail
        self.train_views = train_views
        self.val = val
        self.bad = bad
        self.seed = seed

    @torch.inference_mode()
    def _apply(self, features: torch.Tensor, pooled_only: bool = False) -> torch.Tensor:
        self.tail.encoder.eval()
        out = []
        for s in range(0, len(features), 256):
            chunk = features[s:s + 256]
            if pooled_only:
                out.append(self.tail.encoder.backbone.forward_head(_run(self.tail.modules_, chunk))
                           if not self.tail.pooled else chunk)
            else:
                out.append(self.tail(chunk))
        return torch.cat(out).float()

    def embed_val(self) -> np.ndarray:
        """Validation embeddings float32 [N, D], eval mode."""
        return self._apply(self.val).cpu().numpy()

    def pooled_train(self) -> np.ndarray:
        """Pooled backbone features of the plain training view, float32 [N, F] (for a PCA head)."""
        return self._apply(self.train_views[0], pooled_only=True).cpu().numpy()

    def batches(self, batches, epoch: int, pair_mode: bool):
        """Like ``_image_batches`` but from the cache; each image shows one of its views at random."""
        rng = np.random.default_rng([self.seed, epoch, 17])
        first = self.train_views[0]
        for items in batches:
            kept = [(s, i, t) for s, i, t in items if i not in self.bad]
            slots, index, tags = (np.asarray(c, np.int64) for c in zip(*kept)) if kept else (np.zeros(0, np.int64),) * 3
            idx = torch.from_numpy(index).to(first.device)
            x = first[idx]
            which = torch.from_numpy(rng.integers(0, len(self.train_views), len(index))).to(first.device)
            for v in range(1, len(self.train_views)):
                sel = torch.nonzero(which == v).flatten()
                if len(sel):
                    x[sel] = self.train_views[v][idx[sel]]
            if pair_mode:
                yield x, None, batch_pairs(ImageBatch(None, slots, tags, len(items), [])), []
            else:
                yield x, tags, None, []


def _build_cache(encoder, parts: BackboneParts | None, cut: int | None, train_paths: list[str],
                 val_paths: list[str], config: TrainConfig, progress: Progress | None) -> _Cache:
    """Run the frozen prefix once over every image: the plain (eval) view, ``cache_views - 1`` augmented
    views of the training images, and the plain view of the validation images."""
    from engine.preprocess import build_transform

    if parts is None:
        prefix: list[nn.Module] = [_ForwardFeatures(encoder.backbone)]
    else:
        prefix = parts.prefix(cut if cut is not None else len(parts.stages))
    pooled = cut is None
    plain = build_transform(encoder.data_config)
    augmented = build_transform(encoder.data_config, train=True)
    n_views = max(1, int(config.cache_views))
    views, bad = [], set()
    for v in range(n_views):
        _seed_all(config.seed, 10_000 + v)
        feats, failed = _compute_cache(encoder, prefix, pooled, train_paths, plain if v == 0 else augmented,
                                       config, progress, f"training (view {v + 1}/{n_views})")
        views.append(feats)
        bad |= {position for position, _ in failed}
        if failed and v == 0:
            log.warning("%d training images failed to decode and are left out: %s", len(failed),
                        "; ".join(msg for _, msg in failed[:3]))
    val, failed = _compute_cache(encoder, prefix, pooled, val_paths, plain, config, progress, "validation")
    if failed:
        raise DataError(f"{len(failed)} validation images cannot be decoded: "
                        + "; ".join(msg for _, msg in failed[:5]))
    return _Cache(Tail(encoder, parts, cut), views, val, bad, config.seed)


def _save(encoder, path: Path, epoch: int, threshold: float | None, config: TrainConfig, val: dict | None = None,
          **extra) -> None:
    """An engine checkpoint (``load_checkpoint`` reads it) plus the run's own keys, written atomically."""
    from engine.encoder import checkpoint_payload, save_payload

    encoder.threshold = threshold
    metadata = {"epoch": epoch, "train_config": asdict(config)}
    if val is not None:
        metadata["val"] = val
    payload = checkpoint_payload(encoder, threshold=threshold, metadata=metadata)
    payload.update({"epoch": epoch, "train_config": asdict(config), **extra})
    save_payload(payload, path)


def _collapsing(config: TrainConfig, record: dict) -> bool:
    """Triplet loss stuck at its margin with every triplet active: d_ap ~ d_an for all, the embeddings
    squeezed together (rankings may still improve, but distances and the threshold become fragile)."""
    loss, active = record.get("train_loss"), record.get("active")
    return (config.loss == "triplet" and loss is not None and active is not None and active > 0.98
            and abs(loss - config.margin) < 0.1 * config.margin)


def _with_head(base, head_dim: int, device):
    """The pretrained encoder with a projection head of ``head_dim`` (identity when it equals the
    feature width; otherwise initialised later from a PCA of the training features)."""
    from engine.encoder import Encoder

    cfg = replace(base.config, head_dim=head_dim)
    encoder = Encoder(cfg, base.backbone, base.data_config)
    if head_dim == encoder.feature_dim:
        with torch.no_grad():
            encoder.head.weight.copy_(torch.eye(head_dim))
            encoder.head.bias.zero_()
    encoder.metadata = dict(base.metadata)
    return encoder.to(device).to(memory_format=torch.channels_last)


class _ForwardFeatures(nn.Module):
    """Fallback prefix for backbones without known stages: the whole feature extractor."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, x):
        return self.backbone.forward_features(x)


def _append(out_dir: Path, record: dict) -> None:
    with open(out_dir / METRICS, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def _write_history(out_dir: Path, history: list[dict]) -> None:
    tmp = out_dir / (METRICS + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in history), encoding="utf-8")
    tmp.replace(out_dir / METRICS)


def _load_state(path: Path) -> dict:
    if not path.exists():
        raise EngineError(f"nothing to resume: {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ModelError(f"cannot read {path}: {str(exc).splitlines()[0] if str(exc) else exc}") from None
    if not isinstance(state, dict) or "train_config" not in state or "optimizer" not in state:
        raise ModelError(f"{path} is not a resumable training checkpoint")
    return state


# Fields a resumed run may change without changing what is being trained.
_RESUMABLE = {"epochs", "workers", "device", "patience", "plots"}


def _resume_config(saved: TrainConfig, asked: TrainConfig) -> TrainConfig:
    """The saved run's configuration, with the fields a resumed run may change taken from ``asked``
    where given. ``asked`` is as the caller built it (unresolved): a field left at its default was not
    given. Raises EngineError naming any other field given with a different value."""
    defaults = TrainConfig()
    given = {f.name for f in dataclasses.fields(TrainConfig) if getattr(asked, f.name) != getattr(defaults, f.name)}
    differ = [n for n in sorted(given - _RESUMABLE - {"preset"}) if getattr(asked, n) != getattr(saved, n)]
    if differ:
        raise EngineError("--resume with different settings (" + ", ".join(
            f"{n}: {getattr(saved, n)!r} -> {getattr(asked, n)!r}" for n in differ) + "); start a new --out instead")
    return replace(saved, **{n: getattr(asked, n) for n in _RESUMABLE & given})


def _image_batches(batches, paths, encoder, config: TrainConfig, workers: int, epoch: int):
    """Yield (images float32 [B,3,H,W], labels int64 [B] | None, pairs | None, failures) per step."""
    from torch.utils.data import DataLoader

    from engine.preprocess import build_transform, draft_size_for

    dataset = TrainImages(paths, build_transform(encoder.data_config, train=True),
                          draft_size_for(encoder.data_config))
    generator = torch.Generator().manual_seed(int(config.seed) * 1_000_003 + epoch)
    kwargs: dict[str, Any] = {"prefetch_factor": 4} if workers > 0 else {}
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate_slots,
                        generator=generator, pin_memory=encoder.device.type == "cuda", **kwargs)
    pair_mode = isinstance(batches, PairBatches)
    for batch in loader:
        if batch.images is None:
            yield None, None, None, batch.failures
            continue
        if pair_mode:
            yield batch.images, None, batch_pairs(batch), batch.failures
        else:
            yield batch.images, batch.tags, None, batch.failures


def _embed_paths(encoder, paths: list[str], workers: int) -> np.ndarray:
    from engine.embedding import embed_files

    result = embed_files(encoder, paths, batch_size=64, workers=workers)
    if result.failures:
        raise DataError(f"{len(result.failures)} validation images cannot be decoded: "
                        + "; ".join(f"{p}: {r}" for p, r in result.failures[:5]))
    return result.embeddings


def _pooled_sample(encoder, paths: list[str], config: TrainConfig, limit: int = 2048) -> np.ndarray:
    """Pooled backbone features of up to ``limit`` training images (seeded choice), for a PCA head."""
    from engine.embedding import embed_files
    from engine.encoder import Encoder

    rng = np.random.default_rng(config.seed)
    chosen = [paths[i] for i in sorted(rng.choice(len(paths), min(limit, len(paths)), replace=False))]
    bare = Encoder(replace(encoder.config, head_dim=None), encoder.backbone, encoder.data_config)
    workers = 0 if config.workers is None else config.workers
    return embed_files(bare, chosen, batch_size=64, workers=workers).embeddings


def _best_embeddings(path: Path, vs: _Validation, device, workers: int, config: TrainConfig,
                     cache: _Cache | None) -> np.ndarray:
    """Validation embeddings of the saved best checkpoint (for the figures of a resumed run)."""
    from engine.encoder import load_checkpoint

    best = load_checkpoint(path, device)
    if cache is not None:
        tail = Tail(best, backbone_parts(best.backbone), cache.tail.cut)
        return _Cache(tail, [], cache.val, set(), config.seed).embed_val()
    return _embed_paths(best, vs.paths, workers)


def _run_plots(out_dir: Path, history: list[dict], vs: _Validation, embeddings: np.ndarray,
               threshold: float | None) -> None:
    from engine.metrics import pair_distances
    from train.plots import write_run_plots

    d = pair_distances(embeddings[vs.i], embeddings[vs.j])
    write_run_plots(out_dir, history, vs.paths, vs.i, vs.j, vs.same, d, threshold)


# ------------------------------------------------------------------------------------------- progress


class TqdmProgress:
    """A ``progress`` callback that shows one tqdm bar per epoch (loss, active share, images/s) and a
    bar while features are cached. For the CLI; library code passes nothing."""

    def __init__(self, file=None, leave: bool = True):
        self.file = file
        self.leave = leave
        self.bar = None

    def __call__(self, event: str, info: dict) -> None:
        from tqdm import tqdm

        if event == "cache":
            if self.bar is None or getattr(self.bar, "_what", None) != info["what"]:
                self._close()
                self.bar = tqdm(total=info["total"], desc=f"caching {info['what']}", unit="img", file=self.file,
                                leave=False)
                self.bar._what = info["what"]
            self.bar.n = info["done"]
            self.bar.refresh()
        elif event == "epoch":
            self._close()
            self.bar = tqdm(total=info["steps"], desc=f"epoch {info['epoch']}/{info['epochs']}", unit="step",
                            file=self.file, leave=self.leave)
        elif event == "step" and self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{info['loss']:.4f}", active=f"{info['active']:.2f}",
                                 img_s=f"{info['images_per_s']:.1f}")
        elif event == "validate" and self.bar is not None:
            self.bar.set_description(self.bar.desc + " (validating)")
        elif event == "epoch_end":
            r = info["record"]
            if self.bar is not None:
                self.bar.set_postfix_str(_summary(r))
            self._close()

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _summary(r: dict) -> str:
    parts = []
    for key, fmt in (("train_loss", "loss {:.4f}"), ("val_loss", "val {:.4f}"), ("active", "active {:.2f}"),
                     ("recall@1", "R@1 {:.3f}"), ("map@r", "MAP@R {:.3f}"), ("roc_auc", "AUC {:.3f}")):
        if r.get(key) is not None:
            parts.append(fmt.format(r[key]))
    if r.get("best"):
        parts.append("best")
    return ", ".join(parts)
