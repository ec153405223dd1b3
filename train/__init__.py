"""Siamese fine-tuning. ``from train import train, TrainConfig`` is the entry point.

Modules: ``train.config`` (TrainConfig, presets, loss and miner names; torch-free), ``train.data``
(data sets, splits, samplers, decoding), ``train.backbone`` (stages, freezing, the cached tail),
``train.head`` (the projection head's start), ``train.cache`` (the feature cache), ``train.optimizer``,
``train.precision``, ``train.losses`` (losses and miners), ``train.validation``, ``train.checkpoint``
(the run folder's files, safe resume), ``train.loop`` (``train()``), ``train.progress`` (the CLI's
view) and ``train.plots`` (the figures of a run).

Names are looked up lazily, so ``import train`` (and ``train.config``) stays free of torch.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "TrainConfig": "train.config",
    "PRESETS": "train.config",
    "resolve_preset": "train.config",
    "TrainResult": "train.loop",
    "train": "train.loop",
    "TrainProgress": "train.progress",
}

__all__ = list(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(name)
