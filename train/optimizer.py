"""The optimizer of a run: AdamW over head and learning backbone modules, a per-step warm-up + cosine
schedule for each, and the gradient scaler float16 steps need.

Head and backbone are separate parameter groups (each split into decayed weights and undecayed
biases / norms) because they learn at different rates, and the backbone's schedule starts only when
it unfreezes.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from train.precision import needs_grad_scaler

if TYPE_CHECKING:
    from engine.encoder import Encoder
    from train.config import TrainConfig


@dataclass
class Optimizer:
    """What steps a run: ``optimizer`` (AdamW), ``scheduler`` (LambdaLR, stepped once per step),
    ``scaler`` (a GradScaler, enabled only for float16), and ``params`` (every learning tensor, for
    gradient clipping)."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    params: list[torch.Tensor]

    @property
    def scaled(self) -> bool:
        return self.scaler.is_enabled()

    def step(self, loss: torch.Tensor, grad_clip: float | None) -> None:
        """One update from ``loss`` (a scalar; skipped when nothing in the batch had a loss to learn
        from), then one schedule step either way."""
        self.optimizer.zero_grad(set_to_none=True)
        if loss.requires_grad:  # a batch without a single pair or triplet has nothing to learn from
            self.scaler.scale(loss).backward()
            if grad_clip:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.params, grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            return
        with warnings.catch_warnings():  # the schedule counts batches, learned from or not: no mistake here
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            self.scheduler.step()

    def state(self) -> dict:
        """Plain-data state for last.pt."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaled else None}

    def restore(self, state: dict) -> None:
        """Load what ``state()`` saved."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def param_groups(encoder: Encoder, trainable: list[nn.Module], config: TrainConfig) -> list[dict]:
    """AdamW groups named "head" and "backbone", each split into weights (decayed) and biases /
    norm parameters (ndim <= 1, not decayed). The backbone's learning rate is ``backbone_lr``
    (None: lr / 10)."""
    seen: set[int] = set()
    backbone_params = []
    for m in trainable:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                backbone_params.append(p)
    head_params = list(encoder.head.parameters())
    backbone_lr = config.backbone_lr if config.backbone_lr is not None else config.lr / 10
    groups = []
    for params, lr, name in ((head_params, config.lr, "head"), (backbone_params, backbone_lr, "backbone")):
        decay = [p for p in params if p.ndim > 1]
        rest = [p for p in params if p.ndim <= 1]
        if decay:
            groups.append({"params": decay, "lr": lr, "weight_decay": config.weight_decay, "name": name})
        if rest:
            groups.append({"params": rest, "lr": lr, "weight_decay": 0.0, "name": name})
    return groups


def schedule(epochs: int, warmup_epochs: float, start_epoch: int, steps_per_epoch: int) -> Callable[[int], float]:
    """Learning-rate factor per step: 0 before ``start_epoch`` (a frozen backbone), then a linear
    warm-up over ``warmup_epochs`` and a cosine decay to zero at the end of ``epochs``."""
    total = epochs * steps_per_epoch
    start = start_epoch * steps_per_epoch
    warm = max(1, int(round(warmup_epochs * steps_per_epoch)))

    def factor(step: int) -> float:
        if step < start:
            return 0.0
        s = step - start
        if s < warm:
            return (s + 1) / warm
        span = max(1, total - start - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (s - warm) / span)))

    return factor


def build_optimizer(encoder: Encoder, trainable: list[nn.Module], config: TrainConfig, steps_per_epoch: int,
                    freeze_epochs: int) -> Optimizer:
    """AdamW over the head and the ``trainable`` backbone modules, whose schedule starts after
    ``freeze_epochs``. Call it after the parameters' ``requires_grad`` is set."""
    groups = param_groups(encoder, trainable, config)
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    factors = [schedule(config.epochs, config.warmup_epochs, freeze_epochs if g["name"] == "backbone" else 0,
                        steps_per_epoch) for g in groups]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
    scaler = torch.amp.GradScaler("cuda", enabled=needs_grad_scaler(encoder.device, config.amp))
    return Optimizer(optimizer, scheduler, scaler, [p for g in groups for p in g["params"]])


def reschedule(opt: Optimizer, config: TrainConfig, steps_per_epoch: int, freeze_epochs: int) -> None:
    """Point ``opt``'s schedule at ``config.epochs`` (changed mid-run by a time budget), in place: the
    same warm-up and cosine shape over the new length, continuing from the current step. The groups
    are in ``param_groups`` order, so their names say which schedule each follows."""
    opt.scheduler.lr_lambdas = [schedule(config.epochs, config.warmup_epochs,
                                         freeze_epochs if g["name"] == "backbone" else 0, steps_per_epoch)
                                for g in opt.optimizer.param_groups]
