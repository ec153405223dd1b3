"""Mixed precision for training: which autocast a step runs under and whether gradients need scaling.

On CUDA training runs in bfloat16 where the GPU has it, else float16 (whose small range needs a
``GradScaler``); ``amp=False`` turns both off. On the CPU everything stays float32: CPU autocast is
slower than float32 for these convnets.
"""

from __future__ import annotations

import torch


def autocast(device: torch.device, amp: bool | None = None) -> torch.autocast:
    """The autocast context for a forward pass on ``device`` (``amp``: None = on for CUDA)."""
    if device.type == "cuda" and amp is not False:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", enabled=False)


def needs_grad_scaler(device: torch.device, amp: bool | None = None) -> bool:
    """True when steps run in float16 (CUDA without bfloat16), whose gradients must be scaled."""
    return device.type == "cuda" and amp is not False and not torch.cuda.is_bf16_supported()
