"""The Siamese branch: a timm backbone, an optional projection head and L2 normalisation, and how
one is made: built from an ``EncoderConfig`` or loaded from a checkpoint.

Both twins of a Siamese pair are the same ``Encoder`` object, so their weights are shared by
construction. A checkpoint (``engine.checkpoint``) carries the config, the timm data config and the
calibrated threshold, so ``load_checkpoint`` rebuilds exactly what was trained. Where backbone
weights come from is ``engine.weights``; the CPU inference copy is ``engine.folding``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.data import resolve_model_data_config
from torch import nn

from engine.checkpoint import Checkpoint, decode_checkpoint, is_checkpoint, read_checkpoint, read_torch_file
from engine.config import EncoderConfig
from engine.errors import ModelError
from engine.folding import FoldedCopy
from engine.weights import load_pretrained, load_state_dict_file

PRETRAINED = "pretrained"

# L2 distance (between unit vectors) at or below which two images count as "similar" for the
# ImageNet encoder, which has no calibration run of its own: the accuracy-maximising threshold on
# balanced same-class / different-class pairs of caltech101-dev was 1.154 (accuracy 0.917). A trained
# checkpoint brings its own calibrated threshold.
DEFAULT_THRESHOLD = 1.15


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else the CPU. Raises ModelError for an unusable choice."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError("--device cuda asked for, but no CUDA device is available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ModelError(f"unknown device {name!r} (use auto, cpu or cuda)") from None


class Encoder(nn.Module):
    """image batch float32 [B, 3, H, W] -> embeddings float32 [B, D], each row of unit L2 norm.

    threshold: the calibrated L2 distance threshold a checkpoint brought, or None.
    metadata: plain facts about the weights (``weights_source``, training epoch, ``checkpoint``).
    """

    def __init__(self, config: EncoderConfig, backbone: nn.Module, data_config: dict[str, Any]):
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.data_config = dict(data_config)
        self.feature_dim = int(backbone.num_features)
        self.head: nn.Module
        if config.head_dim:
            self.head = nn.Linear(self.feature_dim, int(config.head_dim))
        else:
            self.head = nn.Identity()
        self.dim = int(config.head_dim or self.feature_dim)
        self.threshold: float | None = None
        self.metadata: dict[str, Any] = {}
        self._folded = FoldedCopy()  # a plain attribute: outside the module tree and state_dict

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def decision_threshold(self) -> float:
        """The L2 distance at or below which a pair is judged similar: the calibrated threshold,
        else ``DEFAULT_THRESHOLD``."""
        return float(self.threshold) if self.threshold is not None else DEFAULT_THRESHOLD

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images float [B, 3, H, W] -> float [B, D] unit-norm (differentiable, for training)."""
        return F.normalize(self.head(self.backbone(images)), dim=1)

    @torch.inference_mode()
    def embed(self, images: torch.Tensor) -> np.ndarray:
        """images float32 [B, 3, H, W] -> np.float32 [B, D] unit-norm, in eval mode.

        Channels-last is used because it is about 2.5x faster for these convnets on CPU and the
        default on CUDA tensor cores. On the CPU a batch runs through the BatchNorm-folded copy of
        the backbone (``engine.folding``); on CUDA under float16 autocast.
        """
        if self.training:
            self.eval()
        device = self.device
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        if device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.float16):
                out = self(images)
        else:
            out = F.normalize(self.head(self._folded.module_for(self.backbone, images)(images)), dim=1)
        return out.float().cpu().numpy()

    def identity(self) -> str:
        """A short hash of config and weights: two encoders with equal identity embed identically."""
        h = hashlib.sha256()
        h.update(json.dumps(self.describe(), sort_keys=True).encode())
        for key, tensor in sorted(self.state_dict().items()):
            h.update(key.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        """Config facts that shape the embedding (for info output and identity)."""
        return {
            "backbone": self.config.backbone,
            "head_dim": self.config.head_dim,
            "dim": self.dim,
            "input_size": list(self.data_config.get("input_size", ())),
        }

    def prepare(self) -> Encoder:
        """Eval mode and channels-last memory layout, ready for ``embed``."""
        self.eval()
        return self.to(memory_format=torch.channels_last)


def init_identity_head(encoder: Encoder) -> None:
    """Make a square head (``head_dim == feature_dim``) the identity, in place, so fine-tuning
    begins from the backbone's features; any other head is left as it is."""
    if encoder.config.head_dim and encoder.config.head_dim == encoder.feature_dim:
        with torch.no_grad():
            encoder.head.weight.copy_(torch.eye(encoder.dim))
            encoder.head.bias.zero_()


def _data_config(backbone: nn.Module, image_size: int | None) -> dict[str, Any]:
    """timm's data config for ``backbone`` (input_size (3, H, W), mean, std as tuples; interpolation,
    crop settings), with a square ``image_size`` when one is given."""
    cfg = dict(resolve_model_data_config(backbone))
    if image_size:
        cfg["input_size"] = (3, int(image_size), int(image_size))
    cfg["input_size"] = tuple(int(v) for v in cfg["input_size"])
    cfg["mean"] = tuple(float(v) for v in cfg["mean"])
    cfg["std"] = tuple(float(v) for v in cfg["std"])
    return cfg


def _create_backbone(config: EncoderConfig) -> nn.Module:
    """A randomly initialised timm backbone returning pooled features. Raises ModelError for an
    unknown name."""
    try:
        return timm.create_model(config.backbone, pretrained=False, num_classes=0)
    except RuntimeError as exc:
        raise ModelError(f"unknown timm backbone {config.backbone!r}: {exc}") from None


def build_encoder(config: EncoderConfig = EncoderConfig(), device: str | torch.device = "cpu") -> Encoder:
    """Create an encoder from ``config``: explicit weights file, else pretrained, else random init.

    An explicit ``config.weights`` may be an engine checkpoint (then it wins wholesale) or a plain
    state dict for the backbone. Raises ModelError when the weights cannot be had or do not fit.
    """
    if config.weights:
        path = Path(config.weights)
        payload = read_torch_file(path)
        if is_checkpoint(payload):
            return _from_checkpoint(decode_checkpoint(payload, path), device)
        backbone = _create_backbone(config)
        load_state_dict_file(backbone, payload, path, config.backbone)
        source = str(path)
    else:
        backbone = _create_backbone(config)
        source = load_pretrained(backbone, config.backbone) if config.pretrained else "random"
    encoder = Encoder(config, backbone, _data_config(backbone, config.image_size))
    init_identity_head(encoder)
    encoder.metadata["weights_source"] = source
    return encoder.to(device).prepare()


def _from_checkpoint(checkpoint: Checkpoint, device: str | torch.device) -> Encoder:
    encoder = Encoder(checkpoint.config, _create_backbone(checkpoint.config), checkpoint.data_config)
    try:
        encoder.load_state_dict(checkpoint.state_dict, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"{checkpoint.path} is not a usable engine checkpoint: {str(exc).splitlines()[0]}") from None
    encoder.threshold = checkpoint.threshold
    encoder.metadata = dict(checkpoint.metadata)
    encoder.metadata["checkpoint"] = str(checkpoint.path)
    return encoder.to(device).prepare()


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Encoder:
    """Rebuild the encoder saved by ``engine.checkpoint.save_checkpoint``. Raises ModelError for
    anything else, and for a file that would need code to unpickle (nothing of it runs)."""
    return _from_checkpoint(read_checkpoint(path), device)


def load_encoder(model: str = PRETRAINED, device: str | torch.device = "cpu", *,
                 backbone: str | None = None, weights: str | None = None) -> Encoder:
    """``pretrained`` (the default ImageNet encoder, or ``backbone`` by name, or started from the
    ``weights`` file) or a checkpoint path."""
    if model == PRETRAINED:
        config = EncoderConfig()
        if backbone:
            config = replace(config, backbone=backbone)
        if weights:
            config = replace(config, weights=weights)
        return build_encoder(config, device)
    return load_checkpoint(model, device)
