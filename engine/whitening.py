"""Whitening of embeddings, fitted once and applied as one linear layer (numpy only).

Two kinds, both on L2-normalised embeddings (what the encoder returns):

- ``pca``: PCA-whitening. The covariance C of the fitting embeddings is shrunk towards a multiple
  of the identity, C' = (1 - s) C + s (trace(C) / F) I, and x -> C'^(-1/2) (x - mean), keeping the
  top ``dim`` principal directions. s = 1 keeps the variances as they are (a plain PCA rotation and,
  with ``dim``, a reduction); s = 0 is full whitening, which with few images per dimension
  magnifies noise directions (the issue measured MAP@R 0.76 -> 0.18 on a library's own photos).
- ``learned``: supervised "learned whitening" (Radenović, Tolias and Chum 2018) from labelled
  images: whiten by the shrunk within-class covariance (the spread of images of one class, what
  should not count), then rotate onto the principal directions of the whitened data (what
  separates classes), keeping the top ``dim``.

A fitted ``Whitening`` is ``mean`` float32 [F] and ``projection`` float32 [D, F]: applied as
``normalise(projection @ (x - mean))``, which is the layer ``engine.encoder`` stores in a checkpoint
(weight = projection, bias = -projection @ mean).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.config import WHITENINGS
from engine.errors import DataError

KINDS = WHITENINGS
# Default shrinkage, measured (README, "Whitening"; fitted on other classes, scored on held-out
# ones): learned at 0.5 raised MAP@R on photos, faces and characters alike (weaker shrinkage was
# better on characters and worse on photos); PCA at 0.9 was the only setting that raised it on all
# three (on photos PCA-whitening at 0.5 and below lowered it).
DEFAULT_SHRINKAGE = {"pca": 0.9, "learned": 0.5}


@dataclass(frozen=True)
class Whitening:
    """A fitted whitening: mean float32 [F], projection float32 [D, F]; how it was fitted."""

    mean: np.ndarray
    projection: np.ndarray
    kind: str
    shrinkage: float
    images: int

    @property
    def dim(self) -> int:
        return int(self.projection.shape[0])

    @property
    def width(self) -> int:
        return int(self.projection.shape[1])

    def apply(self, embeddings: np.ndarray) -> np.ndarray:
        """embeddings float32 [N, F] (unit rows) -> float32 [N, D], unit rows."""
        out = (np.asarray(embeddings, np.float64) - self.mean) @ self.projection.T.astype(np.float64)
        return _normalise(out)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "shrinkage": self.shrinkage, "dim": self.dim, "images": self.images}


def _normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def _check(features: np.ndarray, dim: int | None, shrinkage: float) -> tuple[np.ndarray, int]:
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 1:
        raise DataError(f"whitening needs at least 2 embeddings [N, F], got shape {x.shape}")
    if not np.isfinite(x).all():
        raise DataError("whitening input holds NaN or infinite values")
    if not (math.isfinite(shrinkage) and 0.0 <= shrinkage <= 1.0):
        raise DataError(f"whitening shrinkage must lie in [0, 1], not {shrinkage!r}")
    width = x.shape[1]
    out_dim = width if dim is None else int(dim)
    if not 1 <= out_dim <= width:
        raise DataError(f"the whitened dimension must lie between 1 and {width}, not {dim}")
    return _normalise(x).astype(np.float64), out_dim


def _shrunk(cov: np.ndarray, shrinkage: float) -> np.ndarray:
    """(1 - s) C + s (trace(C) / F) I: positive definite for s > 0 whatever the rank of C."""
    scale = max(float(np.trace(cov)) / len(cov), 1e-12)
    return (1.0 - shrinkage) * cov + shrinkage * scale * np.eye(len(cov))


def _inverse_sqrt(cov: np.ndarray) -> np.ndarray:
    """C^(-1/2), float64 [F, F]; eigenvalues under a relative floor are raised to it, so a singular
    C gives finite numbers."""
    values, vectors = np.linalg.eigh((cov + cov.T) / 2)
    values = np.maximum(values, max(float(values.max()), 1e-12) * 1e-9)
    return (vectors / np.sqrt(values)) @ vectors.T


def fit_pca_whitening(features: np.ndarray, dim: int | None = None,
                      shrinkage: float = DEFAULT_SHRINKAGE["pca"]) -> Whitening:
    """PCA-whitening of features float32 [N, F] (normalised here), keeping the top ``dim``
    directions (None: all F). Raises DataError for unusable input."""
    x, out_dim = _check(features, dim, shrinkage)
    mean = x.mean(axis=0)
    centred = x - mean
    cov = centred.T @ centred / len(x)
    # Shrinking towards a multiple of I keeps C's eigenvectors and moves only its eigenvalues; they
    # are taken from C itself (at s = 1 the shrunk matrix has no preferred directions left).
    values, vectors = np.linalg.eigh(cov)
    order = np.argsort(values)[::-1][:out_dim]
    scale = max(float(np.trace(cov)) / len(cov), 1e-12)
    shrunk = (1.0 - shrinkage) * np.maximum(values[order], 0.0) + shrinkage * scale
    shrunk = np.maximum(shrunk, max(float(shrunk[0]), 1e-12) * 1e-9)
    projection = (vectors[:, order] / np.sqrt(shrunk)).T
    return Whitening(mean.astype(np.float32), projection.astype(np.float32), "pca", float(shrinkage), len(x))


def fit_learned_whitening(features: np.ndarray, labels: np.ndarray, dim: int | None = None,
                          shrinkage: float = DEFAULT_SHRINKAGE["learned"]) -> Whitening:
    """Learned whitening of features float32 [N, F] (normalised here) with class labels int64 [N]:
    whiten by the shrunk within-class covariance, then keep the top ``dim`` principal directions of
    the whitened data. Raises DataError unless some class has two images."""
    x, out_dim = _check(features, dim, shrinkage)
    labels = np.asarray(labels)
    if labels.shape != (len(x),):
        raise DataError(f"learned whitening needs one label per embedding, got {labels.shape} for {len(x)}")
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    if counts.max() < 2:
        raise DataError("learned whitening needs a class with at least two images")
    means = np.zeros((len(classes), x.shape[1]))
    np.add.at(means, inverse, x)
    means /= counts[:, None]
    within = x - means[inverse]
    within = within[counts[inverse] > 1]  # a class of one image says nothing about the spread
    mean = x.mean(axis=0)
    whiten = _inverse_sqrt(_shrunk(within.T @ within / len(within), shrinkage))
    whitened = (x - mean) @ whiten.T
    values, vectors = np.linalg.eigh(whitened.T @ whitened / len(x))
    rotation = vectors[:, np.argsort(values)[::-1][:out_dim]].T
    projection = rotation @ whiten
    return Whitening(mean.astype(np.float32), projection.astype(np.float32), "learned", float(shrinkage), len(x))

