"""What a training run is told: ``TrainConfig``, the presets, and the names of losses and miners.

Torch-free on purpose: the CLI imports this module when it starts (its ``--loss``, ``--miner`` and
``--preset`` choices come from here, and every ``engine train`` option is checked against
``TrainConfig``'s fields), and ``engine --help`` must stay instant.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from engine.config import DEFAULT_BACKBONE
from engine.errors import DataError

LOSSES = ("contrastive", "triplet", "multi-similarity", "prototypical")
MINERS = ("all", "batch-hard", "semi-hard")
# timm: decode every step with timm's photo augmentation; affine: decode once into memory (the eval
# transform), then random affine warps of the tensors each step (train.tensor_data).
AUGMENTS = ("timm", "affine")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs; the CLI maps its options onto these names (see ``engine.cli``).

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
    pretrained encoder; a narrower head starts from a PCA of the training features, see
    ``train.head``). image_size: None = the backbone's default. freeze_epochs: backbone frozen for the
    first N epochs. train_stages: only the last N backbone stages learn (0 = head only; None = all).
    val_classes: share of classes held out for validation (split by class, seeded); val: a separate
    validation folder or pair CSV instead. max_per_class: cap images per class (seeded).

    Extra fields: grad_clip (max gradient norm; 0 = off), patience (stop after N epochs without a better
    validation score; 0 = never), val_group_sep (hold out class *groups*: classes whose names share
    the part before this separator, e.g. "__" for omniglot alphabets), val_pairs (validation pairs for
    verification and threshold), cache_features (None = auto: when the whole backbone stays frozen),
    cache_views (cached views per training image: 1 = the plain view, more adds augmented views),
    steps_per_epoch (None: one pass over the training images), pretrained (ImageNet weights; None: the
    preset's), weights (start from this checkpoint or weights file), amp (None: on for CUDA), plots
    (write the PNG figures).

    From-scratch training (``cpu-long``): augment ("timm" or "affine", see AUGMENTS), class_rotations
    (1 = off; 4 = each training class also seen turned by 90, 180 and 270 degrees, as three new classes;
    "affine" only), time_budget_min (wall-clock minutes for the whole run: after each epoch the epoch
    count, at most ``epochs``, is planned anew to what fits, the schedule with it, and no epoch starts
    that would overrun),
    threads (torch intra-op threads during the run; None: torch's default).

    Whitening instead of training (``train.whitening``): whiten_only (fit a whitening layer on the
    encoder's embeddings of the training images, in seconds, and write it into the checkpoint; the
    backbone and head stay as they are; ``dim`` is then the whitened size, None: 256), whiten ("pca" or
    "learned", see engine.whitening.KINDS; None: learned for class folders, pca for pair lists),
    whiten_shrinkage (0..1; None: engine.whitening.DEFAULT_SHRINKAGE of the kind).
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
    pretrained: bool | None = None
    weights: str | None = None
    amp: bool | None = None
    plots: bool = True
    augment: str | None = None
    class_rotations: int | None = None
    time_budget_min: float | None = None
    threads: int | None = None
    whiten_only: bool = False
    whiten: str | None = None
    whiten_shrinkage: float | None = None


FIELDS = frozenset(f.name for f in fields(TrainConfig))

# Defaults for a GPU: fine-tune the whole backbone gently (its learning rate 30x below the head's) after
# one epoch of head only; batch-hard triplets; validation MAP@R on unseen classes picks the epoch.
DEFAULTS: dict[str, Any] = dict(
    loss=None, miner=None, margin=None, epochs=30, images_per_class=4, batch_size=128,
    lr=3e-4, backbone_lr=1e-5, weight_decay=1e-4, warmup_epochs=1.0, backbone=DEFAULT_BACKBONE,
    freeze_epochs=1, train_stages=None, val_classes=0.2, grad_clip=2.0, patience=8, val_pairs=4000,
    cache_views=1, pretrained=True, augment="timm", class_rotations=1,
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
    # Two CPU cores, 60 minutes, far from ImageNet (characters, grey faces): a small conv net
    # (engine.small_cnn, 28 px) learns from random weights, on images decoded once into memory and
    # warped afresh each step (affine: rotation, scale, shear, shift), every class also turned by 90,
    # 180 and 270 degrees as new classes, with a prototypical loss (P x K batches: half of each
    # class's images make its prototype, the other half are classified against all prototypes).
    # There is no pretrained epoch 0 to fall back on: the best epoch by validation MAP@R is kept.
    # Measured (README): omniglot 20-way one-shot 0.900 on unseen alphabets (cpu-quick 0.735) in 53 min;
    # orl-faces MAP@R 0.867 (cpu-quick 0.857). One torch thread: the net's layers are too small to split, and on a busy 2-core machine a second
    # thread waiting at every barrier made a step 5-10x slower (measured: 0.4-1.1 s vs 2.5-7 s per batch).
    "cpu-long": dict(
        DEFAULTS, backbone="small_cnn", pretrained=False, image_size=None, loss="prototypical", miner="all",
        epochs=100, batch_size=128, images_per_class=4, lr=2e-3, backbone_lr=2e-3, weight_decay=5e-4,
        warmup_epochs=1.0, freeze_epochs=0, train_stages=None, cache_features=False, patience=0,
        augment="affine", class_rotations=4, time_budget_min=55.0, grad_clip=5.0, threads=1,
    ),
}
PRESET_NAMES = tuple(PRESETS)

# Least values of the integer options (below them a run cannot form a batch or a pair).
_AT_LEAST = (("epochs", 0), ("batch_size", 2), ("images_per_class", 1), ("classes_per_batch", 2),
             ("max_per_class", 2), ("cache_views", 1), ("val_pairs", 2), ("threads", 1))


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
    if out.augment is not None and out.augment not in AUGMENTS:
        raise DataError(f"unknown augment {out.augment!r} (use {', '.join(AUGMENTS)})")
    if out.class_rotations not in (None, 1, 4):
        raise DataError(f"class_rotations must be 1 or 4, not {out.class_rotations}")
    if (out.class_rotations or 1) > 1 and out.augment != "affine":
        raise DataError("class_rotations needs augment='affine' (images held in memory)")
    if out.miner is not None and out.miner not in MINERS:
        raise DataError(f"unknown miner {out.miner!r} (use {', '.join(MINERS)})")
    for name, least in _AT_LEAST:
        value = getattr(out, name)
        if value is not None and int(value) < least:
            raise DataError(f"--{name.replace('_', '-')} must be at least {least}, not {value}")
    if out.val is None and not (0.0 < float(out.val_classes) < 1.0):
        raise DataError(f"--val-classes must be between 0 and 1 (or pass --val DATA), not {out.val_classes}")
    return out
