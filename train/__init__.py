"""Siamese fine-tuning: data and samplers (``train.data``), losses and miners (``train.losses``), the
training loop (``train.loop``) and the figures of a run (``train.plots``).

``from train import train, TrainConfig`` is the entry point; the heavy imports wait until used.
"""

from __future__ import annotations

__all__ = ["TrainConfig", "TrainResult", "train", "resolve_preset", "PRESETS", "TqdmProgress"]


def __getattr__(name: str):
    if name in __all__:
        from train import loop

        return getattr(loop, name)
    raise AttributeError(name)
