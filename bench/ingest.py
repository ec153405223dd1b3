"""Ingest throughput: ``ingest_paths`` against the bare encoder's forward pass on the same images
pre-decoded, same batch size, interleaved in one run so both sides see the same machine load."""

from __future__ import annotations

import os
import tempfile
import time
from typing import TYPE_CHECKING, Any, Sequence

from bench.timing import cpu_seconds, torch_threads

if TYPE_CHECKING:
    import torch

    from engine.encoder import Encoder


def predecode(encoder: "Encoder", paths: Sequence[str], batch_size: int) -> list["torch.Tensor"]:
    """The files decoded and transformed exactly as ingest does (``engine.loader``), stacked into
    float32 [B, 3, H, W] batches; unreadable files are left out."""
    from engine.loader import ImageFileDataset, collate_decoded
    from engine.preprocess import build_transform, draft_size_for

    dataset = ImageFileDataset(paths, build_transform(encoder.data_config), draft_size_for(encoder.data_config))
    batches = []
    for start in range(0, len(dataset), batch_size):
        batch = collate_decoded([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        if batch.images is not None:
            batches.append(batch.images)
    return batches


def bench_model_forward(encoder: "Encoder", batches: Sequence["torch.Tensor"], *, threads: int | None = None,
                        warmup: int = 1) -> dict[str, Any]:
    """Images/s of ``encoder.embed`` over pre-decoded ``batches`` (float32 [B, 3, H, W] each): the
    bare model as ingest runs it (channels-last, inference mode), decode excluded."""
    with torch_threads(threads) as used:
        for b in batches[:warmup]:
            encoder.embed(b)
        n = sum(len(b) for b in batches)
        c0, t0 = cpu_seconds(), time.perf_counter()
        for b in batches:
            encoder.embed(b)
        seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    return {"images": n, "seconds": round(seconds, 3), "images_per_s": round(n / seconds, 2),
            "cpu_ms_per_image": round(cpu / n * 1000, 2), "threads": used}


def ingest_once(paths: Sequence[str], model: str, batch_size: int, workers: int | None, device: str,
                threads: int | None = None, home: str | os.PathLike | None = None) -> dict[str, Any]:
    """One ``ingest_paths`` of ``paths`` into a fresh library (in ``home``, else a temporary
    folder) whose encoder is set first, so the one-time model setup is timed apart."""
    from engine.library import Library
    from ingest.pipeline import IngestConfig, ingest_paths

    with tempfile.TemporaryDirectory(prefix="engine-bench-") as tmp:
        library = Library(home or tmp, device=device)
        try:
            t0 = time.perf_counter()
            library.set_model(model)
            setup = time.perf_counter() - t0
            with torch_threads(threads):
                c0, t0 = cpu_seconds(), time.perf_counter()
                report = ingest_paths(library, paths, IngestConfig(batch_size=batch_size, workers=workers), model=model)
                seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
        finally:
            library.close()
    return {"files": len(paths), "embedded": report.embedded, "failed": len(report.failed),
            "duplicates": report.duplicates, "seconds": round(seconds, 3),
            "images_per_s": round(report.embedded / seconds, 2) if seconds > 0 else 0.0,
            "cpu_ms_per_image": round(cpu / max(1, report.embedded) * 1000, 2), "model_setup_s": round(setup, 3)}


def bench_ingest(paths: Sequence[str], *, model: str = "pretrained", batch_size: int = 32,
                 workers: int | None = None, device: str = "cpu", rounds: int = 2,
                 threads: int | None = None, keep_library: str | os.PathLike | None = None) -> dict[str, Any]:
    """Ingest throughput of ``paths`` against the bare encoder on the same images, pre-decoded.

    Each round runs the bare forward pass, then a full ``ingest_paths`` (hash, decode, embed,
    SQLite commit per batch, index add and save) into a fresh library; the best of each over the
    rounds are compared, so a burst of load elsewhere does not land on one side only. The model
    setup of a new library (build + checkpoint save) is reported apart as ``model_setup_s``.

    ``ratio`` = ingest images/s / bare model images/s; 1.0 would mean decode, hashing and writes
    cost nothing. ``cpu_ratio`` = the same with CPU time per image (all threads and decode
    workers): what the ratio would be with perfect overlap on fully used cores, and much less
    disturbed than wall time when other processes share the machine. ``threads`` sets torch's
    thread count for both sides (None: as it is). ``keep_library``: an empty folder that receives
    the library of the last round (else a temporary one is used and deleted).
    Returns a dict (see keys) with every run listed under ``runs``.
    """
    import torch

    from engine.encoder import load_encoder, resolve_device
    from engine.loader import default_workers

    dev = resolve_device(device)
    encoder = load_encoder(model, dev)
    batches = predecode(encoder, paths, batch_size)
    bench_model_forward(encoder, batches[:2], threads=threads, warmup=0)  # first-touch costs (oneDNN plans)
    runs: list[dict[str, Any]] = []
    rounds = max(1, rounds)
    for i in range(rounds):
        runs.append(dict(bench_model_forward(encoder, batches, threads=threads, warmup=0), kind="model"))
        home = keep_library if i == rounds - 1 else None
        runs.append(dict(ingest_once(paths, model, batch_size, workers, str(dev), threads, home), kind="ingest"))
    model_runs = [r for r in runs if r["kind"] == "model"]
    ingest_runs = [r for r in runs if r["kind"] == "ingest"]
    model_best = max(r["images_per_s"] for r in model_runs)
    ingest_best = max(r["images_per_s"] for r in ingest_runs)
    model_cpu = min(r["cpu_ms_per_image"] for r in model_runs)
    ingest_cpu = min(r["cpu_ms_per_image"] for r in ingest_runs)
    return {
        "files": len(paths), "batch_size": batch_size, "workers": default_workers() if workers is None else workers,
        "torch_threads": threads or torch.get_num_threads(), "device": str(dev),
        "backbone": encoder.config.backbone, "input_size": list(encoder.data_config["input_size"]),
        "model_images_per_s": model_best, "ingest_images_per_s": ingest_best,
        "ratio": round(ingest_best / model_best, 3) if model_best else None,
        "model_cpu_ms_per_image": model_cpu, "ingest_cpu_ms_per_image": ingest_cpu,
        "cpu_ratio": round(model_cpu / ingest_cpu, 3) if ingest_cpu else None,
        "embedded": ingest_runs[-1]["embedded"], "failed": ingest_runs[-1]["failed"],
        "model_setup_s": min(r["model_setup_s"] for r in ingest_runs), "runs": runs,
    }
