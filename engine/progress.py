"""The one progress callback type shared by long-running library calls.

Library code never draws a progress bar itself: it calls a ``ProgressFn`` and the caller (the CLI,
a test, a notebook) decides how to show it.

``fn(done, total)``:
    done  -- units finished so far in the current phase (int, never decreasing within a phase).
    total -- units the phase will take, or ``None`` when that is not known in advance.

A call that runs several phases one after another (training: feature caching, then one phase per
epoch) starts each phase with ``fn(0, total)``, so a consumer can tell phases apart by ``done``
returning to 0.

``fn(0, None)`` before any count says "the slow part begins" (loading an encoder, opening an
index): a call makes it once its input has been checked, so a consumer can say what is happening
at once, while a mistake in the input stays a one-line error.
"""

from __future__ import annotations

from typing import Callable

ProgressFn = Callable[[int, int | None], None]
"""Progress callback ``fn(done, total)``; ``total`` is ``None`` when unknown."""

__all__ = ["ProgressFn"]
