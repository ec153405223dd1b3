"""What this machine can hold: the number of decode worker processes that fit its cores and its
memory, each worker counted at ``engine.preprocess.DECODE_BUDGET_BYTES``. Torch-free, so the CLI can
check ``--workers`` while it parses.
"""

from __future__ import annotations

import os
from pathlib import Path

_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_memory() -> int | None:
    """Bytes this process can still use: the smaller of the memory the system reports available
    (``MemAvailable``, else the physical total) and the container's limit, when there is one.
    None when nothing can be read."""
    found: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
                break
    except (OSError, ValueError, IndexError):
        pass
    if not found:
        try:
            found.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            pass
    for path in _CGROUP_LIMITS:
        limit = _read_int(path)
        if limit is not None and limit < 1 << 60:  # "max" (no limit) is not a number; huge means none
            used = _read_int(path.replace("memory.max", "memory.current").replace("limit_in_bytes", "usage_in_bytes"))
            found.append(max(0, limit - (used or 0)))
            break
    return min(found) if found else None


def worker_limit(budget_bytes: int | None = None) -> int:
    """The most decode processes this machine holds: one per core, and no more than the available
    memory divided by the per-worker budget (default ``DECODE_BUDGET_BYTES``); at least 1."""
    if budget_bytes is None:
        from engine.preprocess import DECODE_BUDGET_BYTES

        budget_bytes = DECODE_BUDGET_BYTES
    cores = os.cpu_count() or 1
    memory = available_memory()
    by_memory = cores if memory is None else memory // max(1, budget_bytes)
    return max(1, min(cores, by_memory))


def cap_workers(requested: int) -> tuple[int, str | None]:
    """``requested`` decode processes capped at ``worker_limit()``: (workers, the reason when capped,
    else None). 0 (decode in-process) is never changed."""
    limit = worker_limit()
    if requested <= limit:
        return requested, None
    from engine.preprocess import DECODE_BUDGET_BYTES

    memory = available_memory()
    held = "" if memory is None else f", {memory / 2**30:.1f} GiB available"
    return limit, (f"{requested} decode workers capped at {limit}: this machine has {os.cpu_count() or 1} cores"
                   f"{held}, and each worker may need {DECODE_BUDGET_BYTES / 2**30:.1f} GiB")
