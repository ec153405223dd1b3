"""Training images held in memory as tensors and warped afresh each step (``augment="affine"``).

For a small network at low resolution, decoding a PNG costs more than the forward and backward pass,
so every training image is decoded once, through the same eval transform ingest and query use
(``engine.preprocess``), and kept; each step then takes its batch from memory and applies a random
affine warp (rotation, scale, shear, shift) on the tensors. Optionally each class also appears turned
by 90, 180 and 270 degrees as three new classes (``class_rotations=4``: a common trick for characters,
which quadruples the classes a metric has to separate).

Item indices of the batches: ``i`` in ``[0, N * R)`` is image ``i % N`` turned by ``(i // N) * 90``
degrees; ``rotation_labels`` gives the matching labels.
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from engine.errors import DataError, ImageError
from train.data import ImageBatch, batch_pairs

if TYPE_CHECKING:
    from engine.progress import ProgressFn
    from train.cache import Step

log = logging.getLogger(__name__)

# Largest random warp at strength 1: rotation (degrees), relative scale change, shear (tan of the
# angle), shift (share of the image side). Kept moderate: a character drawn by another hand differs
# by about this much, and a 28 px glyph stops being legible beyond it.
MAX_ROTATION_DEG = 10.0
MAX_SCALE = 0.15
MAX_SHEAR = 0.2
MAX_SHIFT = 0.1

MAX_BYTES = 4 << 30  # held images (float16) beyond this: decode per step instead (augment="timm")


def rotation_labels(labels: np.ndarray, num_classes: int, rotations: int) -> np.ndarray:
    """int64 [N] labels -> int64 [N * rotations]: item ``r * N + i`` has label ``r * num_classes +
    labels[i]`` (each quarter turn of a class is a class of its own)."""
    labels = np.asarray(labels, np.int64)
    return np.concatenate([labels + r * int(num_classes) for r in range(int(rotations))])


def affine_matrices(n: int, generator: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """float32 [n, 2, 3] random affine matrices in ``F.affine_grid``'s normalised coordinates
    (output -> input): rotation, shear, scale and shift drawn uniformly within the MAX_* limits times
    ``strength`` (0: the identity)."""
    def uniform(*shape: int) -> torch.Tensor:
        return (torch.rand(*shape, generator=generator) * 2 - 1) * float(strength)

    angle = uniform(n) * math.radians(MAX_ROTATION_DEG)
    scale = 1 + uniform(n) * MAX_SCALE
    shear = uniform(n) * MAX_SHEAR
    shift = uniform(n, 2) * MAX_SHIFT * 2  # normalised coordinates span 2 per image side
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = cos / scale
    theta[:, 0, 1] = (shear - sin) / scale
    theta[:, 1, 0] = sin / scale
    theta[:, 1, 1] = cos / scale
    theta[:, :, 2] = shift
    return theta


def warp(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """images float32 [B, C, H, W] warped by theta float32 [B, 2, 3] (bilinear; outside the image the
    border pixel continues, so a white page stays white) -> float32 [B, C, H, W]."""
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


class TensorImages:
    """Every training image decoded once. images: float16 [N, C, H, W] (C = 1 when every image came
    out grey on all three channels, expanded to 3 per step); bad: positions that did not decode (left
    out of every batch); rotations: quarter-turn classes (1 or 4)."""

    def __init__(self, images: torch.Tensor, bad: set[int], rotations: int = 1, seed: int = 0,
                 strength: float = 1.0):
        self.images = images
        self.bad = bad
        self.rotations = int(rotations)
        self.seed = int(seed)
        self.strength = float(strength)

    @classmethod
    def load(cls, paths: Sequence[str], data_config: Mapping[str, Any], *, rotations: int = 1, seed: int = 0,
             workers: int = 2, progress: ProgressFn | None = None) -> TensorImages:
        """Decode ``paths`` with the eval transform of ``data_config``. A file that fails is logged and
        left out. Raises DataError when none decodes or the set would not fit in MAX_BYTES."""
        from engine.preprocess import build_transform, draft_size_for, open_image

        c, h, w = (int(v) for v in data_config["input_size"])
        if len(paths) * c * h * w * 2 > MAX_BYTES:
            raise DataError(f"{len(paths)} images at {h}x{w} do not fit in memory for augment='affine'; use "
                            "augment='timm' or a smaller image size")
        transform = build_transform(data_config)
        draft = draft_size_for(data_config)

        def decode(path: str) -> torch.Tensor | str:
            try:
                image, _ = open_image(path, draft_size=draft)
                return transform(image)
            except ImageError as exc:
                return f"{path}: {exc}"
            except Exception as exc:  # a codec bug must not stop the run
                return f"{path}: {type(exc).__name__}: {exc}"

        images = torch.zeros(len(paths), c, h, w, dtype=torch.float16)
        bad: dict[int, str] = {}
        if progress is not None:
            progress(0, len(paths))
        with ThreadPoolExecutor(max(1, workers)) as pool:
            for i, out in enumerate(pool.map(decode, paths)):
                if isinstance(out, str):
                    bad[i] = out
                else:
                    images[i] = out.to(torch.float16)
                if progress is not None and (i + 1) % 256 == 0:
                    progress(i + 1, len(paths))
        if progress is not None:
            progress(len(paths), len(paths))
        if len(bad) == len(paths):
            raise DataError(f"no training image decodes ({next(iter(bad.values()))})")
        if bad:
            log.warning("%d training images failed to decode and are left out: %s", len(bad),
                        "; ".join(list(bad.values())[:3]))
        if c == 3 and bool((images[:, 0] == images[:, 1]).all() and (images[:, 0] == images[:, 2]).all()):
            images = images[:, :1].clone()  # grey: warp one channel, not three
        return cls(images, set(bad), rotations, seed)

    def batches(self, batches: Iterable[list[tuple[int, int, int]]], epoch: int, pair_mode: bool) -> Iterator[Step]:
        """Steps for the ``(slot, item, tag)`` batches of ``train.data`` (items as in the module
        docstring): float32 [B, 3, H, W] warped images, seeded by run seed and epoch."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(epoch))
        n = len(self.images)
        for items in batches:
            kept = [(s, i, t) for s, i, t in items if i % n not in self.bad]
            if not kept:
                yield None, None, None, []
                continue
            slots, index, tags = (np.asarray(c, np.int64) for c in zip(*kept))
            x = self.images[torch.from_numpy(index % n)].float()
            turns = index // n
            for r in range(1, self.rotations):
                sel = torch.from_numpy(np.flatnonzero(turns == r))
                if len(sel):
                    x[sel] = torch.rot90(x[sel], r, (2, 3))
            x = warp(x, affine_matrices(len(x), generator, self.strength))
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            x = x.contiguous()
            if pair_mode:
                yield x, None, batch_pairs(ImageBatch(None, slots, tags, len(items), [])), []
            else:
                yield x, tags, None, []


def held_validation(paths: Sequence[str], data_config: Mapping[str, Any], workers: int = 2) -> torch.Tensor:
    """Validation images decoded once by the eval transform: float16 [N, 3, H, W], so each epoch's
    validation embeds tensors instead of decoding files again (the pixels ingest sees, to float16 rounding).
    Raises DataError when any fails to decode, as validation from the files does."""
    held = TensorImages.load(paths, data_config, workers=workers)
    if held.bad:
        raise DataError(f"{len(held.bad)} validation images cannot be decoded (e.g. {paths[min(held.bad)]})")
    return held.images.expand(-1, 3, -1, -1)
