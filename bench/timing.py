"""Small measuring tools shared by the sections: latency percentiles, CPU time, torch threads."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence, TypeVar

import numpy as np

T = TypeVar("T")


def percentiles(samples_s: Sequence[float]) -> dict[str, float]:
    """Durations in seconds -> {"p50_ms", "p99_ms", "mean_ms"} (milliseconds, rounded to 3 places)."""
    ms = np.asarray(samples_s, np.float64) * 1000.0
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "mean_ms": round(float(ms.mean()), 3)}


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its reaped children (decode workers)."""
    import resource  # Unix only: imported here so the rest of the module works anywhere

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Run the block with torch's intra-op thread count set to ``threads`` (None or 0: as it is),
    restoring the previous count afterwards. Yields the count in force."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield threads or before
    finally:
        torch.set_num_threads(before)


def with_threads(fn: Callable[..., T], threads: int) -> Callable[..., T]:
    """``fn`` wrapped to run with ``threads`` torch threads, restoring the count after each call."""
    def run(*args, **kwargs) -> T:
        with torch_threads(threads):
            return fn(*args, **kwargs)

    return run
