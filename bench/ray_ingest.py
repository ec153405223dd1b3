"""Ray ingest against plain ingest: the same photos into fresh libraries, the two interleaved round
by round in one run so both see the same machine load; and what starting Ray costs."""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any, Sequence

from bench.ingest import ingest_once


def ray_ingest_once(paths: Sequence[str], model: str, batch_size: int, device: str,
                    actors: int | None) -> dict[str, Any]:
    """One ``ingest_with_ray`` of ``paths`` into a fresh temporary library whose encoder is set
    first (timed apart, as ``bench.ingest.ingest_once`` does), on the Ray cluster already started."""
    from engine.library import Library
    from ingest.distributed import RayConfig, ingest_with_ray
    from ingest.pipeline import IngestConfig

    with tempfile.TemporaryDirectory(prefix="engine-bench-ray-") as tmp:
        library = Library(tmp, device=device)
        try:
            t0 = time.perf_counter()
            library.set_model(model)
            setup = time.perf_counter() - t0
            t0 = time.perf_counter()
            result = ingest_with_ray(library, paths, IngestConfig(batch_size=batch_size), RayConfig(actors=actors),
                                     model=model)
            seconds = time.perf_counter() - t0
        finally:
            library.close()
    report = result.ingest
    return {"files": len(paths), "embedded": report.embedded, "failed": len(report.failed),
            "duplicates": report.duplicates, "seconds": round(seconds, 3),
            "images_per_s": round(report.embedded / seconds, 2) if seconds > 0 else 0.0,
            "cpu_ms_per_image": round(result.ray.actor_cpu / max(1, report.embedded) * 1000, 2),
            "model_setup_s": round(setup, 3), "ray": result.ray.to_dict(), "stages": report.stages.to_dict()}


def start_ray(cpus: int | None = None) -> float:
    """Start a local Ray cluster as ``engine ingest --ray`` does (``cpus``: default the machine's
    cores); returns the seconds it took."""
    from ingest.distributed.cluster import RayConfig, connect

    if cpus is None:
        return connect(RayConfig())[1]
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    started = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    return time.perf_counter() - started


def bench_ray_ingest(paths: Sequence[str], *, model: str = "pretrained", batch_size: int = 32, rounds: int = 2,
                     device: str = "cpu", actors: int | None = None, workers: int | None = None) -> dict[str, Any]:
    """Images/s of ``engine ingest --ray`` against plain ``engine ingest`` of ``paths``.

    Ray is started once first (``ray_start_s``); then each round runs a plain ingest and a Ray
    ingest into fresh libraries (encoder set beforehand and timed apart), alternating which goes
    first. Each Ray run includes starting its actor pool and loading the encoder in every actor
    (``first_result_s`` of the pool is part of ``seconds``). ``ratio`` = best Ray images/s / best
    plain images/s. ``cpu_ratio`` = plain CPU ms per image (its process and decode workers) / Ray's
    (the actors' CPU for their partitions: their start-up, the driver and Ray's own daemons left
    out): the ratio with every core fully used, much less disturbed than wall time when other
    processes share the machine. ``workers``: plain ingest's decode processes (None: its default)."""
    start_s = start_ray()
    runs: list[dict[str, Any]] = []
    for i in range(max(1, rounds)):
        order = ("plain", "ray") if i % 2 == 0 else ("ray", "plain")
        for kind in order:
            if kind == "plain":
                runs.append(dict(ingest_once(paths, model, batch_size, workers, device), kind="plain"))
            else:
                runs.append(dict(ray_ingest_once(paths, model, batch_size, device, actors), kind="ray"))
    plain = max((r for r in runs if r["kind"] == "plain"), key=lambda r: r["images_per_s"])
    ray_best = max((r for r in runs if r["kind"] == "ray"), key=lambda r: r["images_per_s"])
    plain_cpu = min(r["cpu_ms_per_image"] for r in runs if r["kind"] == "plain")
    ray_cpu = min(r["cpu_ms_per_image"] for r in runs if r["kind"] == "ray")
    return {"files": len(paths), "batch_size": batch_size, "device": device, "ray_start_s": round(start_s, 2),
            "actors": ray_best["ray"]["actors"], "plain_images_per_s": plain["images_per_s"],
            "ray_images_per_s": ray_best["images_per_s"],
            "ratio": round(ray_best["images_per_s"] / plain["images_per_s"], 3) if plain["images_per_s"] else None,
            "plain_cpu_ms_per_image": plain_cpu, "ray_cpu_ms_per_image": ray_cpu,
            "cpu_ratio": round(plain_cpu / ray_cpu, 3) if ray_cpu else None,
            "ray_first_result_s": ray_best["ray"]["first_result"],
            "ray_stages": {**ray_best["stages"], **{f"ray_{k}": v for k, v in ray_best["ray"].items()
                                                    if isinstance(v, (int, float))}},
            "runs": runs}
