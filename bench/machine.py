"""What a benchmark ran on: CPU, cores, RAM, GPU, library versions and the load average, so a
figure can be judged (and a noisy run recognised) later."""

from __future__ import annotations

import os
import platform
from typing import Any


def loadavg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ram_gb() -> float | None:
    """Physical memory in GiB (None where sysconf cannot tell)."""
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def usable_cores() -> int | None:
    """Cores this process may run on (its affinity mask), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()


def machine_info() -> dict[str, Any]:
    """CPU model, cores, RAM, library versions, torch threads and the GPU (if any), JSON-ready."""
    import faiss
    import numpy as np
    import PIL
    import sqlalchemy
    import timm
    import torch

    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    return {
        "cpu": cpu_model(), "logical_cores": os.cpu_count(), "usable_cores": usable_cores(), "ram_gb": ram_gb(),
        "gpu": gpu, "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "faiss": faiss.__version__,
        "timm": timm.__version__, "numpy": np.__version__, "pillow": PIL.__version__,
        "sqlalchemy": sqlalchemy.__version__, "loadavg": loadavg(),
    }
