"""Where a Ray ingest runs: a local cluster of this machine's cores, or an existing cluster by
address; and how many embedding actors it gets there."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import EngineError

USAGE_STATS_ENV = "RAY_USAGE_STATS_ENABLED"


@dataclass(frozen=True)
class RayConfig:
    """address: a running cluster (``ray start --head`` prints it; ``auto`` finds a local one);
    None starts a local cluster of this machine's cores. shards: the folder the actors write
    shards to (default: ``ray-shards`` in the library's home, deleted after the commit; required
    with an address, and then a folder every node can write and the driver can read). actors:
    embedding actors (default: one per CPU of the cluster, or one per GPU when it has GPUs and the
    device is not ``cpu``). partition_rows: the most files in one partition (one task, one shard).
    partitions_per_actor: the fewest partitions per actor, so the actors' last partitions end
    close together (a short idle tail)."""

    address: str | None = None
    shards: str | None = None
    actors: int | None = None
    partition_rows: int = 10000
    partitions_per_actor: int = 16


@dataclass(frozen=True)
class Placement:
    """How the actors run: how many, the CPUs and GPUs each reserves, their device, and the threads
    each decodes with (and torch computes with on the CPU)."""

    actors: int
    num_cpus: float
    num_gpus: float
    device: str
    threads: int


def connect(config: RayConfig) -> tuple[Any, float, bool]:
    """(the ``ray`` module, seconds spent starting or joining the cluster, whether this call
    started it). An already initialised Ray (a test session, a notebook) is used as it is.
    Raises EngineError when Ray is not installed or the cluster cannot be started or reached."""
    os.environ.setdefault(USAGE_STATS_ENV, "0")  # the local cluster reports nothing anywhere
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise EngineError(f"--ray needs Ray Data ({exc.name or 'ray'} is not installed): "
                          "pip install 'engine[ray]'") from None
    _quiet(ray)
    if ray.is_initialized():
        return ray, 0.0, False
    started = time.perf_counter()
    try:
        if config.address:
            ray.init(address=config.address, logging_level=logging.WARNING, log_to_driver=False)
        else:
            ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, logging_level=logging.WARNING,
                     log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
        where = f"reach the Ray cluster at {config.address}" if config.address else "start a local Ray cluster"
        raise EngineError(f"cannot {where}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return ray, time.perf_counter() - started, True


def _quiet(ray: Any) -> None:
    """No progress bars or per-operator chatter from Ray Data: the driver draws its own progress."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its warnings are about its own progress bars


def place(ray: Any, config: RayConfig, device: str) -> Placement:
    """The actors of this run, from the cluster's resources: one per GPU (device cuda) when the
    cluster has GPUs and ``device`` allows it (the CPUs shared among them for decoding), else one
    per CPU, each with one thread."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = max(1, int(resources.get("CPU", 1)))
    if gpus and device != "cpu":  # the host's CPUs decode for its GPUs: shared among its actors
        actors = config.actors or gpus
        each = max(1, cpus // actors)
        return Placement(actors, float(each), 1.0, "cuda", each)
    if device == "cuda":
        raise EngineError("--device cuda with --ray: the Ray cluster has no GPU")
    actors = config.actors or cpus
    return Placement(actors, 1.0, 0.0, "cpu", 1)


def shards_folder(config: RayConfig, home: Path) -> tuple[Path, bool]:
    """(the folder the actors write shards to, whether it is the library's own, deleted after the
    commit). Raises EngineError for a cluster address without a shared shards folder."""
    if config.shards:
        return Path(config.shards).expanduser().absolute(), False
    if config.address:
        raise EngineError("--ray-address needs --shards DIR: a folder every node of the cluster can write and this "
                          "machine can read (the actors write the embeddings there)")
    return home / "ray-shards", True
