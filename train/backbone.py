"""Backbone surgery for training: cut a timm backbone into stages, choose which of them learn, and run
the trainable tail alone on a cached frozen prefix.

A frozen prefix (stem and first stages) gives the same output every epoch for the plain view of an
image, so ``train.cache`` computes it once and only the ``Tail`` runs per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from engine.errors import ModelError

if TYPE_CHECKING:
    from engine.encoder import Encoder


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
        """The modules from stage ``k`` up to pooling."""
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


def run_modules(modules: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Apply ``modules`` in order: float [B, C, H, W] -> whatever the last one returns."""
    for m in modules:
        x = m(x)
    return x


class ForwardFeatures(nn.Module):
    """The whole feature extractor as one prefix module, for backbones without known stages."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)


class Tail(nn.Module):
    """The trainable end of an encoder from stage ``k`` on: cached prefix output -> unit embedding
    float [B, D]. With ``k`` = None the cache holds pooled features float [B, F] and only the head
    runs."""

    def __init__(self, encoder: Encoder, parts: BackboneParts | None, k: int | None):
        super().__init__()
        self.encoder = encoder
        self.modules_ = parts.suffix(k) if (parts is not None and k is not None) else []
        self.cut = k
        self.pooled = k is None

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Cached prefix output -> pooled backbone features float [B, F] (the head's input)."""
        if self.pooled:
            return x
        return self.encoder.backbone.forward_head(run_modules(self.modules_, x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.encoder.head(self.pool(x)), dim=1)


def trainable_backbone(encoder: Encoder, parts: BackboneParts | None, train_stages: int | None) -> list[nn.Module]:
    """The backbone modules that learn (in order): all of it for None, none for 0, else the last
    ``train_stages`` stages. Raises ModelError when stages cannot be chosen for this backbone."""
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


def cache_cut(parts: BackboneParts | None, train_stages: int | None) -> int | None:
    """Stage index where the cached (frozen) prefix ends; None = cache pooled features (head only).
    Raises ModelError when the trainable part has no frozen prefix to cache."""
    if train_stages is not None and train_stages <= 0:
        return None
    if train_stages is None or parts is None or train_stages >= len(parts.stages):
        raise ModelError("cached features need a frozen backbone prefix: pass --train-stages smaller than the "
                         "backbone's number of stages, or turn feature caching off")
    return len(parts.stages) - train_stages


def freeze(encoder: Encoder, trainable: list[nn.Module], frozen_backbone: bool) -> None:
    """Gradients and modes for one epoch: the head always learns (train mode); the ``trainable``
    backbone modules learn unless ``frozen_backbone``; everything frozen stays in eval mode, so its
    BatchNorm statistics do not drift."""
    for p in encoder.backbone.parameters():
        p.requires_grad_(False)
    encoder.eval()
    if not frozen_backbone:
        for m in trainable:
            m.train()
            for p in m.parameters():
                p.requires_grad_(True)
    encoder.head.train()
    for p in encoder.head.parameters():
        p.requires_grad_(True)
