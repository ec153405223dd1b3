"""Small convolutional backbones for training from scratch on a CPU, registered with timm.

Far from ImageNet (handwritten characters, grey faces) a pretrained photo network helps little and
costs a 224 px forward pass; a few plain conv blocks at the data's own low resolution train from
random weights in minutes on two cores. Importing this module registers the models with timm's
``register_model``, so ``timm.create_model(name, pretrained=False, num_classes=0)`` builds them
everywhere a backbone is built (``engine.encoder`` imports it before creating one).

Each model: image float32 [B, 3, H, W] -> pooled features float32 [B, F]. The default data config
(``pretrained_cfg``) carries the input size, interpolation and a mid-grey mean/std; the checkpoint stores
the data config actually used, so ingest and query preprocess as training did.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import SelectAdaptivePool2d
from timm.models import register_model
from torch import nn

__all__ = ["SmallCNN", "SMALL_CNNS"]


def _block(c_in: int, c_out: int, convs: int) -> nn.Sequential:
    """``convs`` x (3x3 conv, BatchNorm, ReLU), then 2x2 max pooling: halves H and W."""
    layers: list[nn.Module] = []
    for i in range(convs):
        layers += [nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                   nn.ReLU(inplace=True)]
    layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    """Plain conv blocks (``widths`` channels, each block halving the resolution), global average
    pooling. float32 [B, in_chans, H, W] -> [B, widths[-1]] (``num_features``); with num_classes > 0
    a linear classifier follows (timm's convention; the engine always asks for 0)."""

    def __init__(self, widths: tuple[int, ...] = (64, 128, 256, 512), convs: int = 1, in_chans: int = 3,
                 num_classes: int = 0, **_: Any):
        super().__init__()
        self.stages = nn.Sequential(*[_block(c_in, c_out, convs)
                                      for c_in, c_out in zip((in_chans, *widths[:-1]), widths)])
        self.num_features = int(widths[-1])
        # timm's pooling layer under timm's name, so the encoder's GeM option can replace it.
        self.global_pool: nn.Module = SelectAdaptivePool2d(pool_type="avg", flatten=True)
        self.fc: nn.Module = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """float32 [B, C, H, W] -> the last feature map [B, F, H / 2^n, W / 2^n]."""
        return self.stages(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """feature map [B, F, h, w] -> pooled [B, F] (or logits when a classifier was asked for)."""
        x = self.global_pool(x).flatten(1)
        return x if pre_logits else self.fc(x)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(size: int) -> dict[str, Any]:
    # Grey strokes and grey faces: mid-grey mean and std map [0, 1] to [-1, 1] on every channel; crop_pct 1
    # keeps the whole image (a character or a face fills its frame).
    return {"input_size": (3, size, size), "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
            "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "num_classes": 0, "first_conv": "stages.0.0",
            "classifier": "fc"}


def _build(size: int, widths: tuple[int, ...], convs: int, **kwargs: Any) -> SmallCNN:
    from timm.models._pretrained import PretrainedCfg

    kwargs.pop("pretrained", None)
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "features_only", "drop_rate", "drop_path_rate"):
        kwargs.pop(key, None)
    model = SmallCNN(widths, convs, **kwargs)
    model.pretrained_cfg = PretrainedCfg(**_cfg(size)).to_dict()  # type: ignore[assignment]
    model.default_cfg = model.pretrained_cfg  # type: ignore[assignment]
    return model


# name -> (input size, widths, convs per block)
SMALL_CNNS: dict[str, tuple[int, tuple[int, ...], int]] = {
    "small_cnn": (28, (64, 64, 64, 64), 1),
}


@register_model
def small_cnn(pretrained: bool = False, **kwargs: Any) -> SmallCNN:
    """Four blocks of 64 channels at 28 px (the few-shot "Conv-4"): the ``cpu-long`` backbone, random
    init only. About 113k weights; on two CPU cores forward + backward runs at hundreds of images/s."""
    size, widths, convs = SMALL_CNNS["small_cnn"]
    return _build(size, widths, convs, **kwargs)
