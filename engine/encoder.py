"""The Siamese branch: a timm backbone (average or GeM pooling), an optional projection head, an
optional whitening layer and L2 normalisation, and how one is made: built from an
``EncoderConfig`` or loaded from a checkpoint.

Both twins of a Siamese pair are the same ``Encoder`` object, so their weights are shared by
construction. A checkpoint (``engine.checkpoint``) carries the config, the timm data config and the
calibrated threshold, so ``load_checkpoint`` rebuilds exactly what was trained. Where backbone
weights come from is ``engine.weights``; the CPU inference copy is ``engine.folding``.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.data import resolve_model_data_config
from timm.layers import SelectAdaptivePool2d
from torch import nn

from engine.checkpoint import Checkpoint, decode_checkpoint, is_checkpoint, read_checkpoint, read_torch_file
from engine.config import PRETRAINED_MODELS, EncoderConfig, is_pretrained
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


POOLINGS = ("avg", "gem")


class GeM(nn.Module):
    """Generalised-mean pooling (Radenović et al.): feature maps float [B, C, H, W] -> float [B, C],
    (mean over H, W of max(x, eps) ** p) ** (1 / p). p = 1 is average pooling; a large p tends to
    max pooling. ``p`` is a parameter: it learns when the backbone it belongs to trains.
    (timm 1.0 has no GeM layer of its own; this replaces its ``global_pool``.)"""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor([float(p)]))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p)

    def extra_repr(self) -> str:
        return f"p={float(self.p.detach()[0]):.3f}"


def apply_pooling(backbone: nn.Module, config: EncoderConfig) -> nn.Module:
    """Give ``backbone`` (a timm model built with ``num_classes=0``) the pooling ``config`` asks
    for, in place: "avg" keeps its own; "gem" replaces its ``global_pool``. Raises ModelError for an
    unknown pooling, or a backbone without a 2-D global pooling layer (a transformer)."""
    if config.pooling not in POOLINGS:
        raise ModelError(f"unknown pooling {config.pooling!r} (use {', '.join(POOLINGS)})")
    if config.pooling == "avg":
        return backbone
    if not math.isfinite(config.gem_p) or config.gem_p <= 0:
        raise ModelError(f"the GeM exponent p must be a positive number, not {config.gem_p!r}")
    if not isinstance(getattr(backbone, "global_pool", None), SelectAdaptivePool2d):
        raise ModelError(f"GeM pooling needs a convolutional backbone with a global pooling layer; "
                         f"{config.backbone} has none")
    backbone.global_pool = GeM(config.gem_p)
    return backbone


class Encoder(nn.Module):
    """image batch float32 [B, 3, H, W] -> embeddings float32 [B, D], each row of unit L2 norm:
    backbone (pooled features [B, F]) -> head ([B, head_dim or F]) -> whitening, when the config
    has one (L2 norm, then ``whiten`` [B, whiten_dim]) -> L2 norm.

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
        head_out = int(config.head_dim or self.feature_dim)
        # Identity when there is none: old checkpoints' state dicts have no key for it.
        self.whiten: nn.Module = nn.Linear(head_out, int(config.whiten_dim)) if config.whiten_dim else nn.Identity()
        self.dim = int(config.whiten_dim or head_out)
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
        return self.project(self.backbone(images))

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features float [B, F] -> embeddings float [B, D], unit rows."""
        out = self.head(features)
        if self.config.whiten_dim:
            out = self.whiten(F.normalize(out, dim=1))
        return F.normalize(out, dim=1)

    def set_whitening(self, mean: np.ndarray, projection: np.ndarray) -> None:
        """Load a fitted whitening (engine.whitening: mean float32 [E], projection float32 [D, E],
        E the head's output size) into this encoder's whitening layer, in place; the config must
        already ask for one of D. weight = projection, bias = -projection @ mean."""
        weight = torch.as_tensor(np.asarray(projection, np.float32))
        if not isinstance(self.whiten, nn.Linear) or tuple(self.whiten.weight.shape) != tuple(weight.shape):
            raise ModelError(f"a whitening of shape {tuple(weight.shape)} does not fit this encoder")
        with torch.no_grad():
            self.whiten.weight.copy_(weight)
            self.whiten.bias.copy_(-(weight.double() @ torch.as_tensor(np.asarray(mean, np.float64))).float())

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
            out = self.project(self._folded.module_for(self.backbone, images)(images))
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
        """Config facts that shape the embedding (for info output and identity). Pooling and
        whitening are named only when used, so an encoder without them keeps the identity it had
        before they existed (libraries built with it stay valid)."""
        facts: dict[str, Any] = {
            "backbone": self.config.backbone,
            "head_dim": self.config.head_dim,
            "dim": self.dim,
            "input_size": list(self.data_config.get("input_size", ())),
        }
        if self.config.pooling != "avg":
            facts["pooling"] = self.config.pooling
        if self.config.whiten_dim:
            facts["whiten_dim"] = self.config.whiten_dim
        return facts

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


def without_whitening(base: Encoder) -> Encoder:
    """``base`` up to its head, with no whitening layer: what a whitening is fitted on. Backbone and
    head are shared with ``base``, not copied."""
    if not base.config.whiten_dim:
        return base
    encoder = Encoder(replace(base.config, whiten_dim=None), base.backbone, base.data_config)
    encoder.head = base.head
    encoder.metadata = dict(base.metadata)
    return encoder.to(base.device).prepare()


def with_whitening(base: Encoder, mean: np.ndarray, projection: np.ndarray) -> Encoder:
    """``base`` (any whitening of its own dropped) followed by a fitted whitening (engine.whitening:
    mean float32 [E], projection float32 [D, E], E = the head's output size). Backbone and head are
    shared with ``base``; the threshold is left unset (distances change: calibrate again)."""
    bare = without_whitening(base)
    encoder = Encoder(replace(bare.config, whiten_dim=int(np.shape(projection)[0])), bare.backbone, bare.data_config)
    encoder.head = bare.head
    encoder.metadata = dict(bare.metadata)
    encoder.set_whitening(mean, projection)
    return encoder.to(bare.device).prepare()


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
    unknown name. The engine's own small nets (``engine.small_cnn``) register with timm on import."""
    import engine.small_cnn  # noqa: F401  (registration is the import's effect)

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
    if config.whiten_dim:
        raise ModelError("a whitening layer is fitted (`engine train DATA --whiten-only`), not built empty")
    # After the weights: ImageNet weights know no GeM exponent.
    apply_pooling(backbone, config)
    encoder = Encoder(config, backbone, _data_config(backbone, config.image_size))
    init_identity_head(encoder)
    encoder.metadata["weights_source"] = source
    return encoder.to(device).prepare()


def _from_checkpoint(checkpoint: Checkpoint, device: str | torch.device) -> Encoder:
    backbone = apply_pooling(_create_backbone(checkpoint.config), checkpoint.config)
    encoder = Encoder(checkpoint.config, backbone, checkpoint.data_config)
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
    ``weights`` file), another name of ``engine.config.PRETRAINED_MODELS`` (``pretrained-lite1``), or
    a checkpoint path."""
    if is_pretrained(model):
        config = EncoderConfig(**PRETRAINED_MODELS[model])  # type: ignore[arg-type]
        if backbone:
            config = replace(config, backbone=backbone)
        if weights:
            config = replace(config, weights=weights)
        return build_encoder(config, device)
    return load_checkpoint(model, device)
