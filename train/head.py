"""The projection head a run trains, and where it starts.

The head is ``Linear(F, D)`` on the backbone's pooled features (width F), D = ``--dim``. It starts so
that epoch 0 is as close to the pretrained encoder as its width allows:

- D = F: the identity (``engine.encoder.init_identity_head``), so epoch 0 *is* the pretrained encoder.
- D < F: the PCA projection of the centred training features (rows: the top D principal directions).
  With fewer training images than D, the data gives only as many directions as it has images less
  one; the head then takes those and completes them with random orthonormal directions (seeded),
  and the log says so.
- D > F: the identity padded with zero rows, which keeps every distance of the pretrained features.

Every start but the padded one has orthonormal rows, so distances shrink only by what is projected
away.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.errors import ModelError

if TYPE_CHECKING:
    from engine.encoder import Encoder

log = logging.getLogger(__name__)

# Principal directions whose singular value is below this share of the largest carry no variance
# (rounding noise, or the direction lost to centring): they are not taken from the data.
_RANK_TOLERANCE = 1e-6


def with_head(base: Encoder, head_dim: int, device: torch.device | str) -> Encoder:
    """``base``'s backbone with a fresh projection head of ``head_dim``, on ``device`` in channels-last
    layout. A square head starts as the identity; any other is set by ``init_head`` once the training
    features are known."""
    from engine.encoder import Encoder, init_identity_head

    # A whitening layer was fitted on the old head's output: training changes that, so it goes.
    encoder = Encoder(replace(base.config, head_dim=head_dim, whiten_dim=None), base.backbone, base.data_config)
    init_identity_head(encoder)
    encoder.metadata = dict(base.metadata)
    return encoder.to(device).to(memory_format=torch.channels_last)


def head_needs_features(encoder: Encoder) -> bool:
    """Whether ``init_head`` needs training features (a head narrower than the backbone)."""
    return encoder.dim < encoder.feature_dim


def init_head(encoder: Encoder, features: np.ndarray | None, seed: int = 0) -> str:
    """Set the start of a head that is not square (see the module docstring), in place.

    features: float32 [N, F] pooled backbone features of training images (needed when the head is
    narrower than F; ignored otherwise). Returns how the head was set, for the log.
    """
    weight = encoder.head.weight
    dim, width = weight.shape
    completed = False  # PCA could not give every direction: worth a warning
    if dim >= width:
        w = torch.zeros(dim, width, dtype=torch.float64)
        w[:width] = torch.eye(width, dtype=torch.float64)
        mean = torch.zeros(width, dtype=torch.float64)
        how = "identity" if dim == width else f"identity padded with {dim - width} zero rows"
    else:
        if features is None or len(features) == 0:
            raise ModelError(f"a {dim}-wide head on {width} features starts from training features; none given")
        x = torch.from_numpy(np.asarray(features, np.float64))
        mean = x.mean(0)
        _, s, v = torch.linalg.svd(x - mean, full_matrices=False)
        rank = int((s > _RANK_TOLERANCE * max(float(s[0]), 1e-30)).sum()) if len(s) else 0
        if rank >= dim:
            w = v[:dim]
            how = "PCA of the training features"
        else:
            w = torch.cat([v[:rank], _orthonormal_complement(v[:rank], dim - rank, width, seed)])
            completed = True
            how = (f"PCA gives only {rank} directions from {len(x)} training images; the other {dim - rank} "
                   "head directions start as random orthonormal ones")
    log.log(logging.WARNING if completed else logging.INFO, "head of %d on %d features starts as: %s", dim, width,
            how)
    with torch.no_grad():
        weight.copy_(w.float().to(weight.device))
        encoder.head.bias.copy_((-(w @ mean)).float().to(weight.device))
    return how


def pooled_features(encoder: Encoder, paths: list[str], seed: int, workers: int | None,
                    limit: int = 2048) -> np.ndarray:
    """Pooled backbone features float32 [n, F] of up to ``limit`` of ``paths`` (a seeded choice), for
    ``init_head`` when no feature cache has them already."""
    from engine.embedding import embed_files
    from engine.encoder import Encoder

    rng = np.random.default_rng(seed)
    chosen = [paths[i] for i in sorted(rng.choice(len(paths), min(limit, len(paths)), replace=False))]
    bare = Encoder(replace(encoder.config, head_dim=None), encoder.backbone, encoder.data_config)
    return embed_files(bare, chosen, batch_size=64, workers=0 if workers is None else workers).embeddings


def _orthonormal_complement(basis: torch.Tensor, n: int, width: int, seed: int) -> torch.Tensor:
    """float64 [n, width]: seeded random orthonormal rows, orthogonal to the rows of ``basis``
    (float64 [k, width], orthonormal rows, k + n <= width)."""
    generator = torch.Generator().manual_seed(int(seed))
    draw = torch.randn(width, n, generator=generator, dtype=torch.float64)
    if len(basis):
        draw = draw - basis.T @ (basis @ draw)
    q, _ = torch.linalg.qr(draw)
    if len(basis):  # once more against the basis: QR of a projected draw can leak rounding back into it
        q = q - basis.T @ (basis @ q)
        q, _ = torch.linalg.qr(q)
    return q.T.contiguous()
