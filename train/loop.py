"""Siamese fine-tuning, top to bottom: data -> encoder -> loss -> epochs -> validation -> run folder.

``train(data, out_dir, config)`` fine-tunes the same ``Encoder`` that ingest and query use (the twin
branches of a pair are one module, so their weights are shared by construction) and writes a run
folder (``train.checkpoint``): checkpoint.pt (the best epoch by validation on unseen classes; epoch 0,
the untouched encoder, is a candidate), last.pt (for ``resume=True``), metrics.jsonl, and the figures
loss.png, distances.png, pairs.png.

Two ways to run an epoch. Images: decode + timm training augmentation, forward and backward through
the trainable part. Cached (``train.cache``): when the first stages of the backbone stay frozen for
the whole run, their output is computed once per image and only the trainable tail runs per step.
In memory (``augment="affine"``, ``train.tensor_data``): every image decoded once, warped afresh per
step, optionally with quarter turns as extra classes (a small net trained from scratch).

The parts live beside this file: ``train.config`` (TrainConfig, presets), ``train.data`` (data sets,
samplers, decoding), ``train.backbone`` (stages, freezing, the tail), ``train.head`` (the projection
head's start), ``train.cache``, ``train.optimizer``, ``train.losses``, ``train.validation``,
``train.checkpoint`` and ``train.progress`` (the CLI's view).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from engine.config import EncoderConfig
from engine.errors import DataError, EngineError
from train.backbone import backbone_parts, cache_cut, freeze, trainable_backbone
from train.cache import FeatureCache, Step, build_cache
from train.checkpoint import (CHECKPOINT, LAST, append_metrics, load_resume_state, resume_config,
                              save_run_checkpoint, write_metrics)
from train.config import TrainConfig, resolve_preset
from train.data import (ClassBatches, ClassData, PairBatches, PairBatchSampler, PairData, PKSampler, TrainImages,
                        batch_pairs, collate_slots, load_data, split_classes, split_pairs)
from train.head import head_needs_features, init_head, pooled_features, with_head
from train.losses import MetricLoss, build_loss
from train.optimizer import Optimizer, build_optimizer, reschedule
from train.precision import autocast
from train.seeding import seed_all
from train.tensor_data import TensorImages, held_validation, rotation_labels
from train.validation import Validation, embed_validation, saved_embeddings, score, validation_set, write_figures

if TYPE_CHECKING:
    from engine.encoder import Encoder
    from engine.progress import ProgressFn

log = logging.getLogger(__name__)

BUDGET_RESERVE = 1  # epochs of the time budget kept in hand when planning (see _Run.fit_budget)

EpochFn = Callable[[dict], None]
"""``on_epoch(record)``: called with each epoch's record (epoch 0 included) once it is in metrics.jsonl."""


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


def train(data: str | Path | ClassData | PairData, out_dir: str | Path, config: TrainConfig = TrainConfig(),
          progress: ProgressFn | None = None, resume: bool = False, on_epoch: EpochFn | None = None) -> TrainResult:
    """Fine-tune an encoder on ``data`` (a class folder, a pair CSV, or a loaded ClassData / PairData)
    and write the run folder ``out_dir``.

    progress(done, total): each phase (caching one view's features, one epoch's steps) from done = 0.
    on_epoch(record): each epoch's record as written to metrics.jsonl, epoch 0 included.
    resume=True continues the run in ``out_dir`` from its last completed epoch with the same
    configuration (fields in ``train.checkpoint.RESUMABLE`` may change).

    Raises DataError for bad data, ModelError for an unusable backbone or checkpoint or resume state,
    EngineError when ``out_dir`` already holds a run and resume is off, or resume finds none."""
    from engine.encoder import resolve_device
    from engine.loader import default_workers

    started = time.perf_counter()
    out_dir = Path(out_dir)
    state = load_resume_state(out_dir / LAST) if resume else None
    if state is not None:
        config = resume_config(TrainConfig(**state["train_config"]), config)
    else:
        config = resolve_preset(config)
        if (out_dir / LAST).exists() or (out_dir / CHECKPOINT).exists():
            raise EngineError(f"{out_dir} already holds a training run: pass --resume to continue it or choose "
                              "another --out")
    device = resolve_device(config.device)
    workers = default_workers() if config.workers is None else config.workers
    seed_all(config.seed, 0)

    threads_before = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(int(config.threads))
    try:
        plan, config = _plan(data, config)
        model = _model(plan, config, device, out_dir / LAST if state is not None else None, progress)
        optimizer = build_optimizer(model.encoder, model.trainable, config, plan.steps, model.freeze_for)
        run = _Run(config, out_dir, plan, model, optimizer, device, workers, progress, on_epoch, started)
        if state is not None:
            run.restore(state)
        else:
            run.epoch_zero()
        stopped_early = run.epochs()
        if config.plots:
            run.figures()
        return run.result(stopped_early, time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads_before)


# ------------------------------------------------------------------------------------------- data


@dataclass
class _Plan:
    """What the run trains on: batches of ``train_paths`` (``steps`` per epoch), the loss, and the
    fixed validation material."""

    pair_mode: bool
    loss_fn: MetricLoss
    batches: ClassBatches | PairBatches
    train_paths: list[str]
    steps: int
    vs: Validation


def _plan(data: str | Path | ClassData | PairData, config: TrainConfig) -> tuple[_Plan, TrainConfig]:
    """The run's data, batches and loss; ``config`` with loss, miner and margin as the run uses them
    (for the record). Raises DataError for data and loss that do not go together."""
    train_set, val_set = _split(data, config)
    pair_mode = isinstance(train_set, PairData)
    if config.loss is None:  # the default follows the data: a pair list brings pairs, classes allow triplets
        config = replace(config, loss="contrastive" if pair_mode else "triplet")
    if pair_mode and config.loss in ("triplet", "prototypical"):
        raise DataError(f"{config.loss} loss needs class labels: train a pair list with --loss contrastive or "
                        "multi-similarity, or give a folder-per-class tree")
    rotations = int(config.class_rotations or 1)
    if pair_mode and rotations > 1:
        raise DataError("class rotations need class labels: give a folder-per-class tree")
    if pair_mode and config.miner not in (None, "all"):
        raise DataError(f"--miner {config.miner} needs class labels; a pair list trains on its own pairs")
    loss_fn = build_loss(config.loss, "all" if pair_mode else config.miner, config.margin)
    config = replace(config, miner=loss_fn.miner_name, margin=loss_fn.margin)
    p, k = _batch_shape(config, train_set)
    batches: ClassBatches | PairBatches
    if isinstance(train_set, PairData):
        batches = PairBatches(train_set, PairBatchSampler(len(train_set), p, config.seed, config.steps_per_epoch))
        paths = train_set.images
    else:
        # With quarter-turn classes the items are (image, turn) pairs: see train.tensor_data.
        labels = rotation_labels(train_set.labels, train_set.num_classes, rotations)
        batches = ClassBatches(labels, PKSampler(labels, min(p, train_set.num_classes * rotations), k, config.seed,
                                                 config.steps_per_epoch))
        paths = train_set.paths
    return _Plan(pair_mode, loss_fn, batches, paths, len(batches), validation_set(val_set, config, (p, k))), config


def _split(data: str | Path | ClassData | PairData, config: TrainConfig) -> tuple[ClassData | PairData,
                                                                                  ClassData | PairData]:
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
        return split_classes(train_all, float(config.val_classes), config.seed, config.val_group_sep)
    return split_pairs(train_all, float(config.val_classes), config.seed)


def _batch_shape(config: TrainConfig, train: ClassData | PairData) -> tuple[int, int]:
    """(P, K) for class data; (pairs per batch, 2) for pair lists."""
    if isinstance(train, PairData):
        return max(1, config.batch_size // 2), 2
    k = int(config.images_per_class)
    p = int(config.classes_per_batch or max(2, config.batch_size // k))
    return min(p, train.num_classes), k


def _image_steps(batches: ClassBatches | PairBatches, paths: list[str], encoder: Encoder, config: TrainConfig,
                 workers: int, epoch: int) -> Iterator[Step]:
    """Steps decoded from the files with training augmentation (see ``train.cache.Step``)."""
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
        elif pair_mode:
            yield batch.images, None, batch_pairs(batch), batch.failures
        else:
            yield batch.images, batch.tags, None, batch.failures


# ------------------------------------------------------------------------------------------- model


@dataclass
class _Model:
    """The encoder being trained, its learning backbone modules, the feature cache or the images held
    in memory (both None: steps decode images) and how many epochs the backbone waits frozen."""

    encoder: Encoder
    trainable: list[nn.Module]
    cache: FeatureCache | None
    freeze_for: int
    tensors: TensorImages | None = None
    held_val: torch.Tensor | None = None  # validation images decoded once, float16 [N, 3, H, W] (in memory)


def _model(plan: _Plan, config: TrainConfig, device: torch.device, saved: Path | None,
           progress: ProgressFn | None) -> _Model:
    """The encoder (from ``saved``, a resume state, or built fresh with its head started), what of it
    learns, and the feature cache when a frozen prefix allows one."""
    from engine.encoder import build_encoder, load_checkpoint

    if saved is not None:
        encoder = load_checkpoint(saved, device)
    else:
        base = build_encoder(EncoderConfig(backbone=config.backbone, image_size=config.image_size,
                                           pretrained=bool(config.pretrained), weights=config.weights), device)
        encoder = with_head(base, int(config.dim or base.feature_dim), device)
    parts = backbone_parts(encoder.backbone)
    trainable = trainable_backbone(encoder, parts, config.train_stages)
    frozen_throughout = not trainable or config.freeze_epochs >= config.epochs
    use_cache = config.cache_features if config.cache_features is not None else frozen_throughout
    in_memory = config.augment == "affine"
    if use_cache and in_memory:
        raise DataError("augment='affine' warps images in memory; it cannot train on cached features (turn "
                        "cache_features off)")
    cache: FeatureCache | None = None
    if use_cache:
        if frozen_throughout:
            trainable = []
        elif config.freeze_epochs:
            log.info("cached features: the trainable stages learn from the first epoch (freeze_epochs applies "
                     "to image training only)")
        cut = cache_cut(parts, 0 if frozen_throughout else config.train_stages)
        cache = build_cache(encoder, parts, cut, plan.train_paths, plan.vs.paths, config, progress)
    if saved is None and encoder.dim != encoder.feature_dim:
        features = None
        if head_needs_features(encoder):
            features = (cache.pooled_train() if cache is not None
                        else pooled_features(encoder, plan.train_paths, config.seed, config.workers))
        init_head(encoder, features, config.seed)
    tensors, held_val = None, None
    if in_memory:
        workers = max(1, int(config.workers or 2))
        tensors = TensorImages.load(plan.train_paths, encoder.data_config, rotations=int(config.class_rotations or 1),
                                    seed=config.seed, workers=workers, progress=progress)
        held_val = held_validation(plan.vs.paths, encoder.data_config, workers)
    return _Model(encoder, trainable, cache, 0 if cache is not None else int(config.freeze_epochs), tensors,
                  held_val)


# ------------------------------------------------------------------------------------------- epochs


class _Run:
    """One run's parts and the state that changes epoch by epoch: history, the best epoch so far and
    how many epochs went by without beating it."""

    def __init__(self, config: TrainConfig, out_dir: Path, plan: _Plan, model: _Model, optimizer: Optimizer,
                 device: torch.device, workers: int, progress: ProgressFn | None, on_epoch: EpochFn | None,
                 started: float | None = None):
        self.config, self.out_dir, self.plan, self.model, self.opt = config, out_dir, plan, model, optimizer
        self.started = time.perf_counter() if started is None else started
        self.max_epochs = int(config.epochs)  # a time budget plans at most this many
        self.epoch_times: list[float] = []
        self.device, self.workers, self.progress, self.on_epoch = device, workers, progress, on_epoch
        self.history: list[dict] = []
        self.best: dict = {}
        self.bad_epochs = 0
        self.start_epoch = 1
        self.best_emb: np.ndarray | None = None  # validation embeddings of the best epoch, for the figures

    def validate(self) -> tuple[dict, np.ndarray]:
        emb = embed_validation(self.model.encoder, self.plan.vs, self.model.cache, self.workers, self.model.held_val)
        return score(emb, self.plan.vs, self.plan.loss_fn), emb

    def epoch_zero(self) -> None:
        """Validate the untouched encoder: it is a candidate, so a run never ends worse on validation."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        metrics, self.best_emb = self.validate()
        record = {"epoch": 0, "train_loss": None, "active": None, "lr": 0.0, "images_per_s": None,
                  "time_s": round(time.perf_counter() - t0, 3), **metrics, "best": True}
        self.best = {"epoch": 0, "score": metrics[self.plan.vs.select], "metrics": metrics,
                     "threshold": metrics["threshold"]}
        self.history = [record]
        self._save_best(0, metrics)
        self._save_last(0)
        write_metrics(self.out_dir, self.history)
        if self.on_epoch is not None:
            self.on_epoch(record)

    def restore(self, state: dict) -> None:
        """Continue from a resume state (see ``train.checkpoint``)."""
        self.opt.restore(state)
        self.history, self.best = list(state["history"]), dict(state["best"])
        self.bad_epochs, self.start_epoch = int(state["bad_epochs"]), int(state["epoch"]) + 1
        write_metrics(self.out_dir, self.history)

    def epochs(self) -> bool:
        """Train the remaining epochs; True when patience or the time budget ran out first."""
        epoch = self.start_epoch
        while epoch <= self.config.epochs:
            if self.config.patience and self.bad_epochs >= self.config.patience:
                return True
            t0 = time.perf_counter()
            stats = self.train_epoch(epoch)
            self.end_epoch(epoch, stats, t0)
            if self.config.time_budget_min and not self.fit_budget(epoch, time.perf_counter() - t0):
                return True
            epoch += 1
        return False

    def fit_budget(self, epoch: int, epoch_s: float) -> bool:
        """Keep the run inside ``time_budget_min``, given the last epoch took ``epoch_s`` seconds.
        After every epoch the epoch count is planned anew (at most the configured count) from the
        median epoch time so far, keeping BUDGET_RESERVE epochs of the budget in hand, and the
        learning-rate schedule is stretched over it, so it still decays to zero however fast the
        machine turns out to be; a median shrugs off one epoch slowed by another job. False when the
        next epoch would overrun: the run stops, keeping the best epoch so far."""
        budget = float(self.config.time_budget_min) * 60.0
        elapsed = time.perf_counter() - self.started
        self.epoch_times.append(epoch_s)
        typical = max(float(np.median(self.epoch_times)), 1e-9)
        planned = min(self.max_epochs, max(epoch, epoch + int((budget - elapsed) // typical) - BUDGET_RESERVE))
        if planned != self.config.epochs:
            log.info("time budget %.0f min: planning %d epochs (an epoch takes %.0f s), not %d", budget / 60,
                     planned, typical, self.config.epochs)
            self.config = replace(self.config, epochs=planned)
            reschedule(self.opt, self.config, self.plan.steps, self.model.freeze_for)
        if epoch < self.config.epochs and elapsed + typical > budget:
            log.warning("time budget %.0f min: stopping after epoch %d of %d", budget / 60, epoch,
                        self.config.epochs)
            return False
        return True

    def train_epoch(self, epoch: int) -> dict:
        """One pass of steps; returns the training part of the epoch's record."""
        model, plan, config = self.model, self.plan, self.config
        frozen = epoch <= model.freeze_for or not model.trainable
        freeze(model.encoder, model.trainable, frozen)
        seed_all(config.seed, epoch)
        plan.batches.set_epoch(epoch)
        if self.progress is not None:
            self.progress(0, plan.steps)
        t0 = time.perf_counter()
        losses, actives, images, failures = [], [], 0, []
        if model.cache is not None:
            steps = model.cache.batches(plan.batches, epoch, plan.pair_mode)
        elif model.tensors is not None:
            steps = model.tensors.batches(plan.batches, epoch, plan.pair_mode)
        else:
            steps = _image_steps(plan.batches, plan.train_paths, model.encoder, config, self.workers, epoch)
        for step, (x, labels, pairs, failed) in enumerate(steps, start=1):
            failures.extend(failed)
            if x is not None and len(x) >= 2 and (pairs is None or len(pairs[0]) > 0):
                out = self.step(x, labels, pairs)
                losses.append(float(out.loss.detach()))
                actives.append(out.active)
                images += len(x)
            if self.progress is not None:
                self.progress(step, plan.steps)
        train_s = time.perf_counter() - t0
        if failures:
            log.warning("epoch %d: %d images failed to decode and were skipped: %s", epoch, len(failures),
                        "; ".join(failures[:3]))
        return {"train_loss": float(np.mean(losses)) if losses else None,
                "active": float(np.mean(actives)) if actives else None,
                "lr": float(self.opt.optimizer.param_groups[0]["lr"]), "images_per_s": images / max(train_s, 1e-9),
                "frozen_backbone": bool(frozen)}

    def step(self, x: torch.Tensor, labels: np.ndarray | None, pairs: tuple[np.ndarray, ...] | None):
        """Forward, loss and update on one batch: x float32 [B, ...] images or cached features; labels
        int64 [B] or pairs (i, j, same) int64 [P]. Returns the LossOutput."""
        x = x.to(self.device, non_blocking=True)
        if x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.config.amp):
            emb = self.model.cache.tail(x) if self.model.cache is not None else self.model.encoder(x)
        if pairs is not None:
            out = self.plan.loss_fn(emb, pairs=tuple(torch.from_numpy(p).to(self.device) for p in pairs))
        else:
            out = self.plan.loss_fn(emb, torch.from_numpy(labels).to(self.device))
        self.opt.step(out.loss, self.config.grad_clip)
        return out

    def end_epoch(self, epoch: int, stats: dict, t0: float) -> None:
        """Validate, keep the best, write checkpoints and the epoch's record."""
        metrics, emb = self.validate()
        select = self.plan.vs.select
        improved = metrics[select] > self.best["score"]
        record = {"epoch": epoch, **{k: v for k, v in stats.items() if k != "frozen_backbone"},
                  "time_s": round(time.perf_counter() - t0, 3), "frozen_backbone": stats["frozen_backbone"],
                  **metrics, "best": bool(improved)}
        self.history.append(record)
        if _collapsing(self.config, record):
            log.warning("epoch %d: the embeddings are collapsing (every triplet active, loss %.3f at the margin "
                        "%.3f): try --loss multi-similarity or a lower --lr", epoch, record["train_loss"],
                        self.config.margin)
        if improved:
            self.best = {"epoch": epoch, "score": metrics[select], "metrics": metrics,
                         "threshold": metrics["threshold"]}
            self.bad_epochs, self.best_emb = 0, emb
            self._save_best(epoch, metrics)
        else:
            self.bad_epochs += 1
        self._save_last(epoch)
        append_metrics(self.out_dir, record)
        if self.on_epoch is not None:
            self.on_epoch(record)

    def _save_best(self, epoch: int, metrics: dict) -> None:
        """checkpoint.pt: what ingest and query load (config, weights, calibrated threshold)."""
        save_run_checkpoint(self.model.encoder, self.out_dir / CHECKPOINT, epoch, metrics["threshold"], self.config,
                            val=metrics)

    def _save_last(self, epoch: int) -> None:
        """last.pt: the latest epoch with everything ``resume`` needs."""
        save_run_checkpoint(self.model.encoder, self.out_dir / LAST, epoch, self.best["threshold"], self.config,
                            **self.opt.state(), history=self.history, best=self.best, bad_epochs=self.bad_epochs)

    def figures(self) -> None:
        """The run's figures for the best epoch."""
        if self.best_emb is None:  # a resumed run whose best epoch came before the interruption
            self.best_emb = saved_embeddings(self.out_dir / CHECKPOINT, self.plan.vs, self.device, self.workers,
                                             self.model.cache)
        write_figures(self.out_dir, self.history, self.plan.vs, self.best_emb, self.best["threshold"])

    def result(self, stopped_early: bool, wall_s: float) -> TrainResult:
        return TrainResult(self.out_dir, self.out_dir / CHECKPOINT, int(self.best["epoch"]), self.best["metrics"],
                           self.best["threshold"], self.history, self.config, self.plan.vs.select, stopped_early,
                           round(wall_s, 2))


def _collapsing(config: TrainConfig, record: dict) -> bool:
    """Triplet loss stuck at its margin with every triplet active: d_ap ~ d_an for all, the embeddings
    squeezed together (rankings may still improve, but distances and the threshold become fragile)."""
    loss, active = record.get("train_loss"), record.get("active")
    return (config.loss == "triplet" and loss is not None and active is not None and active > 0.98
            and abs(loss - config.margin) < 0.1 * config.margin)
