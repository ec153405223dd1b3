"""One seed for every random number generator a run touches (Python, NumPy, torch), per epoch, so a
resumed run draws exactly what an uninterrupted one would."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_all(seed: int, epoch: int) -> None:
    """Seed Python's, NumPy's and torch's global generators from (``seed``, ``epoch``)."""
    s = (int(seed) * 1_000_003 + int(epoch)) % (2**31 - 1)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
