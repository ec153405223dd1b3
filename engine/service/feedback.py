"""Relevance feedback: Rocchio's query update on stored unit vectors.

    q' = alpha * q + beta * mean(more like this) - gamma * mean(less like this), then L2-normalised

q is the original query vector (absent when refining from marks alone). The weights are Rocchio's
usual ones; gamma is small because a "less like this" photo says less about what is wanted than a
"more like this" one does.
"""

from __future__ import annotations

import numpy as np

from engine.service.errors import Unprocessable

ALPHA, BETA, GAMMA = 1.0, 0.75, 0.25


def rocchio(query: np.ndarray | None, positive: np.ndarray, negative: np.ndarray, *, alpha: float = ALPHA,
            beta: float = BETA, gamma: float = GAMMA) -> np.ndarray:
    """The refined query: float32 [D], unit norm.

    query: float32 [D] or None; positive: float32 [P, D]; negative: float32 [N, D] (P or N may be 0).
    Raises Unprocessable when there is nothing to move towards (no query and no positive vector) or
    the update cancels out.
    """
    if query is None and len(positive) == 0:
        raise Unprocessable("nothing to refine from: mark at least one result as more like this")
    dim = len(query) if query is not None else positive.shape[1]
    q = np.zeros(dim, np.float64)
    if query is not None:
        q += alpha * np.asarray(query, np.float64)
    if len(positive):
        q += beta * np.asarray(positive, np.float64).mean(axis=0)
    if len(negative):
        q -= gamma * np.asarray(negative, np.float64).mean(axis=0)
    norm = float(np.linalg.norm(q))
    if not np.isfinite(norm) or norm < 1e-9:
        raise Unprocessable("the marks cancel out: mark a different set of results")
    return (q / norm).astype(np.float32)
