"""The feature cache: a frozen backbone prefix run once per image, so each step runs only the tail.

When the first stages of the backbone stay frozen for the whole run, their output for an image never
changes (for a given view of it). ``build_cache`` computes it once for the plain (eval) view of every
training image, for ``cache_views - 1`` augmented views, and for the validation images; each step then
draws one cached view per image and runs only the trainable ``Tail``. On CPU that turns hours into
minutes.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from engine.errors import DataError
from train.backbone import BackboneParts, ForwardFeatures, Tail, run_modules
from train.data import ImageBatch, batch_pairs
from train.precision import autocast
from train.seeding import seed_all

if TYPE_CHECKING:
    from engine.encoder import Encoder
    from engine.progress import ProgressFn
    from train.config import TrainConfig

log = logging.getLogger(__name__)

Step = tuple[torch.Tensor | None, np.ndarray | None, tuple[np.ndarray, np.ndarray, np.ndarray] | None, list[str]]
"""One training step's input: (images or cached features float32 [B, ...], class labels int64 [B] or
None, pairs (i, j, same) int64 [P] each or None, decode failures 'path: reason')."""

_CHUNK = 256  # cached rows run through the tail at once when embedding


class FeatureCache:
    """The frozen prefix's output for every training image (one tensor per view) and validation image,
    and the trainable ``tail`` that turns it into embeddings.

    train_views: float32 [N, ...] per view, on the encoder's device; val: float32 [M, ...];
    bad: positions of training images that did not decode (left out of every batch)."""

    def __init__(self, tail: Tail, train_views: list[torch.Tensor], val: torch.Tensor, bad: set[int], seed: int):
        self.tail = tail
        self.train_views = train_views
        self.val = val
        self.bad = bad
        self.seed = seed

    @torch.inference_mode()
    def _apply(self, features: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        self.tail.encoder.eval()
        return torch.cat([fn(features[s:s + _CHUNK]) for s in range(0, len(features), _CHUNK)]).float()

    def embed_val(self) -> np.ndarray:
        """Validation embeddings float32 [M, D], eval mode."""
        return self._apply(self.val, self.tail).cpu().numpy()

    def pooled_train(self) -> np.ndarray:
        """Pooled backbone features of the plain training view, float32 [N, F] (for the head's start)."""
        return self._apply(self.train_views[0], self.tail.pool).cpu().numpy()

    def batches(self, batches: Iterable[list[tuple[int, int, int]]], epoch: int, pair_mode: bool) -> Iterator[Step]:
        """Steps drawn from the cache for the ``(slot, image, tag)`` batches of ``train.data``; each image
        shows one of its views at random (seeded by run seed and epoch)."""
        rng = np.random.default_rng([self.seed, epoch, 17])
        first = self.train_views[0]
        for items in batches:
            kept = [(s, i, t) for s, i, t in items if i not in self.bad]
            slots, index, tags = (np.asarray(c, np.int64) for c in zip(*kept)) if kept else (np.zeros(0, np.int64),) * 3
            idx = torch.from_numpy(index).to(first.device)
            x = first[idx]
            which = torch.from_numpy(rng.integers(0, len(self.train_views), len(index))).to(first.device)
            for v in range(1, len(self.train_views)):
                sel = torch.nonzero(which == v).flatten()
                if len(sel):
                    x[sel] = self.train_views[v][idx[sel]]
            if pair_mode:
                yield x, None, batch_pairs(ImageBatch(None, slots, tags, len(items), [])), []
            else:
                yield x, tags, None, []


@torch.inference_mode()
def compute_features(encoder: Encoder, modules: list[nn.Module], pooled: bool, paths: list[str],
                     transform: Callable, config: TrainConfig,
                     progress: ProgressFn | None) -> tuple[torch.Tensor, list[tuple[int, str]]]:
    """The prefix ``modules``' output for every image of ``paths`` (pooled when ``pooled``):
    float32 [N, ...] on the encoder's device, and the failures as (position, 'path: reason'). Images
    that fail to decode get zeros. ``progress(done, len(paths))`` after each batch, from 0.
    Raises DataError when no image decodes."""
    from engine.loader import ImageFileDataset, decode_batches
    from engine.preprocess import draft_size_for

    encoder.eval()
    device = encoder.device
    dataset = ImageFileDataset(paths, transform, draft_size_for(encoder.data_config))
    out: torch.Tensor | None = None
    failures: list[tuple[int, str]] = []
    done = 0
    if progress is not None:
        progress(0, len(paths))
    for batch in decode_batches(dataset, 64, config.workers):
        if batch.images is not None:
            x = batch.images.to(device).contiguous(memory_format=torch.channels_last)
            with autocast(device, config.amp):
                y = run_modules(modules, x)
                if pooled:
                    y = encoder.backbone.forward_head(y)
            y = y.float()
            if out is None:
                out = torch.zeros((len(paths), *y.shape[1:]), dtype=torch.float32, device=device)
                if y.ndim == 4:
                    out = out.contiguous(memory_format=torch.channels_last)
            out[[it.position for it in batch.items]] = y
        failures.extend((it.position, f"{it.path}: {it.error}") for it in batch.failures)
        done += len(batch.items) + len(batch.failures)
        if progress is not None:
            progress(done, len(paths))
    if out is None:
        raise DataError(f"none of the {len(paths)} images could be decoded")
    return out, failures


def build_cache(encoder: Encoder, parts: BackboneParts | None, cut: int | None, train_paths: list[str],
                val_paths: list[str], config: TrainConfig, progress: ProgressFn | None) -> FeatureCache:
    """Run the frozen prefix (everything before stage ``cut``; None: the whole backbone, pooled) once
    over every image: the plain view and ``cache_views - 1`` augmented views of the training images,
    and the plain view of the validation images. Each is a progress phase. Raises DataError when a
    validation image, or every training image, does not decode."""
    from engine.preprocess import build_transform

    if parts is None:
        prefix: list[nn.Module] = [ForwardFeatures(encoder.backbone)]
    else:
        prefix = parts.prefix(cut if cut is not None else len(parts.stages))
    pooled = cut is None
    plain = build_transform(encoder.data_config)
    augmented = build_transform(encoder.data_config, train=True)
    n_views = max(1, int(config.cache_views))
    views, bad = [], set()
    for v in range(n_views):
        seed_all(config.seed, 10_000 + v)  # each augmented view its own draw, the same on a resumed run
        log.info("caching features of %d training images (view %d of %d)", len(train_paths), v + 1, n_views)
        feats, failed = compute_features(encoder, prefix, pooled, train_paths, plain if v == 0 else augmented,
                                         config, progress)
        views.append(feats)
        bad |= {position for position, _ in failed}
        if failed and v == 0:
            log.warning("%d training images failed to decode and are left out: %s", len(failed),
                        "; ".join(msg for _, msg in failed[:3]))
    log.info("caching features of %d validation images", len(val_paths))
    val, failed = compute_features(encoder, prefix, pooled, val_paths, plain, config, progress)
    if failed:
        raise DataError(f"{len(failed)} validation images cannot be decoded: "
                        + "; ".join(msg for _, msg in failed[:5]))
    return FeatureCache(Tail(encoder, parts, cut), views, val, bad, config.seed)
