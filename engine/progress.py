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

import contextlib
import time
from dataclasses import fields
from typing import Callable, Iterator

ProgressFn = Callable[[int, int | None], None]
"""Progress callback ``fn(done, total)``; ``total`` is ``None`` when unknown."""

__all__ = ["ProgressFn"]


class StageClock:
    """Base of a dataclass whose float fields are wall seconds per stage of one command (ingest,
    import): ``timing(stage)`` adds a block's seconds to its field."""

    @contextlib.contextmanager
    def timing(self, stage: str) -> Iterator[None]:
        """Add the seconds spent in the ``with`` block to ``stage``."""
        started = time.perf_counter()
        try:
            yield
        finally:
            setattr(self, stage, getattr(self, stage) + time.perf_counter() - started)

    def to_dict(self) -> dict[str, float]:
        return {f.name: round(getattr(self, f.name), 4) for f in fields(self)}
