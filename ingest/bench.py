"""Speed benchmarks behind ``engine bench`` and the scripts in ``benchmarks/``.

Five sections, each a plain function returning a JSON-ready dict, so a script can run one alone:

- ``bench_ingest``: ``ingest_paths`` on a fixed list of files against the bare encoder's forward
  pass on the same images pre-decoded, same batch size, measured in one run, interleaved;
- ``bench_decode_draft``: decode + preprocess of a 12-megapixel JPEG with and without draft mode;
- ``bench_query`` / ``bench_query_embed`` / ``bench_cold_query``: warm search latency over
  synthetic vectors, warm embed of one query image, and a fresh process split into import, index
  load, model load, embed, search and metadata;
- ``bench_metadata``: bulk insert rate into the SQLite store, per-batch commit rate, fetch latency;
- ``bench_index_types``: build time, recall@10 against exact search, queries/s and bytes/vector
  per FAISS index type.

``run_bench(BenchConfig(...))`` runs them all; ``format_bench(results)`` turns the dict into text.
Timings are wall clock on whatever else the machine is doing: ``machine.loadavg`` is recorded at
the start and end so a noisy run can be recognised, and ratios are measured within one run.

Synthetic vectors (index and query sections) are not uniform noise, on which every approximate
index looks hopeless: they are unit vectors drawn around 256 cluster centres along a shared
64-dimensional subspace plus isotropic noise (``SyntheticEmbeddings``), which gives recall figures
of the same kind as real image embeddings.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

log = logging.getLogger(__name__)

SECTIONS = ("ingest", "decode", "query", "metadata", "index")
DEFAULT_FACTORIES = ("Flat", "HNSW32", "IVF1024,Flat", "IVF1024,PQ32")


@dataclass(frozen=True)
class BenchConfig:
    """What ``run_bench`` measures. ``None`` means "the default for full or quick mode".

    n_vectors: synthetic vectors for the index-type table and the larger query size.
    data: a folder of photos for the ingest benchmark (default: the sample shipped with engine).
    quick: fewer files, vectors and repetitions: a smoke run in well under a minute.
    device: encoder device (auto, cpu, cuda). FAISS runs on the CPU.
    model: ``pretrained`` or an engine checkpoint path (a tiny one keeps tests fast).
    dim: dimension of the synthetic vectors (default 1280 = tf_efficientnet_lite0's embedding;
        quick 256, which keeps PQ and HNSW training to seconds).
    ingest_files: the first N image files of ``data`` in sorted order (default 640; quick 64).
    batch_size / workers: the ingest settings measured (workers None = the engine's default).
    rounds: interleaved (bare model, ingest) rounds; the best of each is compared (default 2; quick 1).
    query_sizes: index sizes for query latency (default (10000, n_vectors); quick (n_vectors,)).
    query_repeats: single-query searches timed per size (default 200; quick 50).
    factories: FAISS factory strings for the index-type table.
    search_params: extra search settings tried on each index type (rows beside the defaults).
    index_queries: queries for recall and queries/s (default 1000; quick 200).
    metadata_rows: rows for the bulk insert (default 50000; quick 5000).
    decode_size: (width, height) of the generated JPEG for the draft benchmark.
    cold_query: run the fresh-process query split (a subprocess; costs a few seconds).
    sections: which of ``SECTIONS`` to run.
    """

    n_vectors: int = 100_000
    data: str | None = None
    quick: bool = False
    device: str = "auto"
    model: str = "pretrained"
    dim: int | None = None
    ingest_files: int | None = None
    batch_size: int = 32
    workers: int | None = None
    rounds: int | None = None
    query_sizes: tuple[int, ...] | None = None
    query_repeats: int | None = None
    factories: tuple[str, ...] = DEFAULT_FACTORIES
    search_params: tuple[str, ...] = ("nprobe=16", "efSearch=64")
    index_queries: int | None = None
    metadata_rows: int | None = None
    decode_size: tuple[int, int] = (4000, 3000)
    cold_query: bool = True
    sections: tuple[str, ...] = SECTIONS
    seed: int = 0

    def resolved(self) -> "BenchConfig":
        """A copy with every ``None`` replaced by the value used for this mode."""
        q = self.quick
        n = int(min(self.n_vectors, 10_000) if q else self.n_vectors)
        return replace(
            self,
            n_vectors=n,
            dim=self.dim or (256 if q else 1280),
            ingest_files=self.ingest_files or (64 if q else 640),
            rounds=self.rounds or (1 if q else 2),
            query_sizes=tuple(self.query_sizes or ((n,) if q else tuple(sorted({10_000, n})))),
            query_repeats=self.query_repeats or (50 if q else 200),
            index_queries=self.index_queries or (200 if q else 1000),
            metadata_rows=self.metadata_rows or (5_000 if q else 50_000),
        )


# -- small helpers --------------------------------------------------------------------------------

def _pct(samples_s: Sequence[float]) -> dict[str, float]:
    """Seconds -> {"p50_ms", "p99_ms", "mean_ms"}."""
    ms = np.asarray(samples_s, np.float64) * 1000.0
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "mean_ms": round(float(ms.mean()), 3)}


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its reaped children (decode workers)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gb() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def machine_info() -> dict[str, Any]:
    """CPU model, cores, RAM, library versions, torch threads and the GPU (if any)."""
    import faiss
    import PIL
    import sqlalchemy
    import timm
    import torch

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    return {
        "cpu": _cpu_model(), "logical_cores": os.cpu_count(), "usable_cores": usable, "ram_gb": _ram_gb(),
        "gpu": gpu, "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "faiss": faiss.__version__,
        "timm": timm.__version__, "numpy": np.__version__, "pillow": PIL.__version__,
        "sqlalchemy": sqlalchemy.__version__, "loadavg": _loadavg(),
    }


def image_files(folder: str | os.PathLike, limit: int | None = None) -> list[str]:
    """The first ``limit`` image files under ``folder``, sorted by path (a fixed subset)."""
    from engine.files import find_images
    from engine.preprocess import image_suffixes

    files = sorted(find_images([folder], image_suffixes()).files)
    return files[:limit] if limit else files


def sample_folder() -> Path:
    """The photo folder shipped with engine (used when no ``data`` is given)."""
    import engine

    return Path(engine.__file__).parent / "sample" / "library"


# -- synthetic vectors ----------------------------------------------------------------------------

class SyntheticEmbeddings:
    """Unit vectors float32 [n, dim] with the structure of image embeddings: ``clusters`` centres,
    spread along a shared ``intrinsic``-dimensional subspace, plus isotropic noise.

    The structure is fixed by ``seed``; ``sample(n, seed)`` draws independent points from it, so
    queries (another seed) come from the same distribution as the database without being in it.
    """

    def __init__(self, dim: int, seed: int = 0, clusters: int = 256, intrinsic: int = 64,
                 spread: float = 0.8, noise: float = 0.3):
        rng = np.random.default_rng(seed)
        self.dim = int(dim)
        r = min(intrinsic, dim)
        self.centres = (rng.standard_normal((clusters, dim), dtype=np.float32) / np.sqrt(dim)).astype(np.float32)
        basis, _ = np.linalg.qr(rng.standard_normal((dim, r)).astype(np.float32))
        self.basis = np.ascontiguousarray(basis.T * (spread / np.sqrt(r)), dtype=np.float32)  # [r, dim]
        self.noise = float(noise) / np.sqrt(dim)

    def sample(self, n: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        labels = rng.integers(0, len(self.centres), n)
        z = rng.standard_normal((n, self.basis.shape[0]), dtype=np.float32)
        x = self.centres[labels] + z @ self.basis
        x += rng.standard_normal((n, self.dim), dtype=np.float32) * np.float32(self.noise)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    def chunks(self, n: int, seed: int, chunk: int = 50_000) -> Iterator[np.ndarray]:
        """``n`` vectors in slices of ``chunk`` (so a million never exist twice in memory)."""
        for i, start in enumerate(range(0, n, chunk)):
            yield self.sample(min(chunk, n - start), seed * 1_000_003 + i)


# -- ingest vs bare model -------------------------------------------------------------------------

def _predecode(encoder, paths: Sequence[str], batch_size: int) -> list:
    """The files decoded and transformed exactly as ingest does, stacked into float32 [B, 3, H, W]."""
    from engine.loader import ImageFileDataset, collate_decoded
    from engine.preprocess import build_transform, draft_size_for

    dataset = ImageFileDataset(paths, build_transform(encoder.data_config), draft_size_for(encoder.data_config))
    batches = []
    for start in range(0, len(dataset), batch_size):
        batch = collate_decoded([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        if batch.images is not None:
            batches.append(batch.images)
    return batches


def bench_model_forward(encoder, batches: Sequence, *, threads: int | None = None, warmup: int = 1) -> dict[str, Any]:
    """Images/s of ``encoder.embed`` over pre-decoded ``batches`` (float32 [B, 3, H, W] each): the
    bare model as ingest runs it (channels-last, inference mode), decode excluded."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        for b in batches[:warmup]:
            encoder.embed(b)
        n = sum(len(b) for b in batches)
        c0, t0 = _cpu_seconds(), time.perf_counter()
        for b in batches:
            encoder.embed(b)
        seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    finally:
        torch.set_num_threads(before)
    return {"images": n, "seconds": round(seconds, 3), "images_per_s": round(n / seconds, 2),
            "cpu_ms_per_image": round(cpu / n * 1000, 2), "threads": threads or before}


def _ingest_once(paths: Sequence[str], model: str, batch_size: int, workers: int | None, device: str,
                 threads: int | None = None, home: str | os.PathLike | None = None) -> dict[str, Any]:
    """One ingest of ``paths`` into a fresh library (in ``home``, else a temporary folder) whose
    encoder is set first, so the one-time model setup is timed apart from ``ingest_paths``."""
    import torch

    from engine.library import Library
    from ingest.pipeline import IngestConfig, ingest_paths

    before = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="engine-bench-") as tmp:
        library = Library(home or tmp, device=device)
        t0 = time.perf_counter()
        library.set_model(model)
        setup = time.perf_counter() - t0
        if threads:
            torch.set_num_threads(threads)
        try:
            c0, t0 = _cpu_seconds(), time.perf_counter()
            report = ingest_paths(library, paths, IngestConfig(batch_size=batch_size, workers=workers), model=model)
            seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
        finally:
            torch.set_num_threads(before)
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

    from engine.loader import default_workers
    from engine.encoder import load_encoder, resolve_device

    dev = resolve_device(device)
    encoder = load_encoder(model, dev)
    batches = _predecode(encoder, paths, batch_size)
    bench_model_forward(encoder, batches[:2], threads=threads, warmup=0)  # first-touch costs (oneDNN plans)
    resolved_workers = default_workers() if workers is None else workers
    runs: list[dict[str, Any]] = []
    rounds = max(1, rounds)
    for i in range(rounds):
        runs.append(dict(bench_model_forward(encoder, batches, threads=threads, warmup=0), kind="model"))
        home = keep_library if i == rounds - 1 else None
        runs.append(dict(_ingest_once(paths, model, batch_size, workers, str(dev), threads, home), kind="ingest"))
    model_runs = [r for r in runs if r["kind"] == "model"]
    ingest_runs = [r for r in runs if r["kind"] == "ingest"]
    model_best = max(r["images_per_s"] for r in model_runs)
    ingest_best = max(r["images_per_s"] for r in ingest_runs)
    model_cpu = min(r["cpu_ms_per_image"] for r in model_runs)
    ingest_cpu = min(r["cpu_ms_per_image"] for r in ingest_runs)
    return {
        "files": len(paths), "batch_size": batch_size, "workers": resolved_workers,
        "torch_threads": threads or torch.get_num_threads(), "device": str(dev),
        "backbone": encoder.config.backbone, "input_size": list(encoder.data_config["input_size"]),
        "model_images_per_s": model_best, "ingest_images_per_s": ingest_best,
        "ratio": round(ingest_best / model_best, 3) if model_best else None,
        "model_cpu_ms_per_image": model_cpu, "ingest_cpu_ms_per_image": ingest_cpu,
        "cpu_ratio": round(model_cpu / ingest_cpu, 3) if ingest_cpu else None,
        "embedded": ingest_runs[-1]["embedded"], "failed": ingest_runs[-1]["failed"],
        "model_setup_s": min(r["model_setup_s"] for r in ingest_runs), "runs": runs,
    }


def sweep_ingest(paths: Sequence[str], *, model: str = "pretrained", batch_size: int = 32,
                 workers: Sequence[int] = (0, 1, 2), threads: Sequence[int | None] = (None,),
                 device: str = "cpu", rounds: int = 1) -> list[dict[str, Any]]:
    """``bench_ingest`` for each (workers, threads) pair, to choose the engine's defaults."""
    return [bench_ingest(paths, model=model, batch_size=batch_size, workers=w, device=device, rounds=rounds, threads=t)
            for t in threads for w in workers]


def bench_model_configs(model: str = "pretrained", *, batch_size: int = 32, batches: int = 4,
                        device: str = "cpu", threads: Sequence[int] = (), jit: bool = True,
                        rounds: int = 3) -> dict[str, Any]:
    """The bare encoder in the configurations worth trying on a CPU, on random input of the
    encoder's size, best of ``rounds``, interleaved: ``embed`` as shipped (BatchNorm folded,
    channels-last, inference mode) at each torch thread count; the unfolded model channels-last
    (``embed`` before folding) and in the default memory layout; and, with ``jit``, a
    ``torch.jit.trace`` + ``freeze`` graph (deprecated in torch 2.x, measured for comparison).
    Returns {"images_per_s": {name: images/s}, "max_abs_diff": {name: vs embed}, "fastest": name}.
    (``torch.compile`` is left out: about two minutes of compilation on two cores for the same
    speed as the folded model.)"""
    import warnings

    import torch

    from engine.encoder import load_encoder, resolve_device

    encoder = load_encoder(model, resolve_device(device))
    size = tuple(encoder.data_config["input_size"])
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn((batch_size, *size), generator=gen) for _ in range(batches)]
    reference = encoder.embed(inputs[0])
    default_threads = torch.get_num_threads()
    variants: dict[str, Callable[[Any], np.ndarray]] = {}
    for t in sorted({default_threads, *threads}):
        variants[f"embed, {t} threads"] = _with_threads(encoder.embed, t)

    def plain(layout):
        def run(x):
            with torch.inference_mode():
                return encoder(x.to(encoder.device).contiguous(memory_format=layout)).float().cpu().numpy()
        return run

    variants["unfolded, channels-last"] = plain(torch.channels_last)
    nchw = load_encoder(model, resolve_device(device)).to(memory_format=torch.contiguous_format).eval()

    def run_nchw(x):
        with torch.inference_mode():
            return nchw(x.to(nchw.device).contiguous()).float().cpu().numpy()

    variants["unfolded, default layout"] = run_nchw
    if jit and encoder.device.type == "cpu":
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            example = inputs[0].contiguous(memory_format=torch.channels_last)
            frozen = torch.jit.freeze(torch.jit.trace(encoder, example, check_trace=False).eval())

        def run_frozen(x):
            with torch.inference_mode():
                return frozen(x.contiguous(memory_format=torch.channels_last)).numpy()

        variants["jit.trace + freeze"] = run_frozen
    diffs: dict[str, float] = {}
    for name, fn in variants.items():
        out = fn(inputs[0])
        fn(inputs[0])
        diffs[name] = float(np.abs(out - reference).max())
    best: dict[str, float] = {name: 0.0 for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            for x in inputs:
                fn(x)
            best[name] = max(best[name], batch_size * len(inputs) / (time.perf_counter() - t0))
    return {"batch_size": batch_size, "input_size": list(size), "images_per_s": {k: round(v, 2) for k, v in best.items()},
            "max_abs_diff": diffs, "fastest": max(best, key=best.get)}


def _with_threads(fn: Callable, threads: int) -> Callable:
    import torch

    def run(x):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return fn(x)
        finally:
            torch.set_num_threads(before)

    return run


# -- decode with and without draft ----------------------------------------------------------------

def make_test_jpeg(path: str | os.PathLike, size: tuple[int, int] = (4000, 3000), quality: int = 90,
                   seed: int = 0, noise: float = 4.0) -> Path:
    """Write a camera-sized JPEG to ``path``: smooth colour gradients plus Gaussian luminance noise
    of standard deviation ``noise`` (grey levels). Noise sets the entropy, hence the file size and
    the share of decode time spent in Huffman decoding, which draft mode cannot skip: 4000x3000 at
    quality 90 is about 1.2 MB at noise 2, 2.3 MB at 4 and 3.7 MB at 8."""
    from PIL import Image

    width, height = size
    rng = np.random.default_rng(seed)
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    rgb = np.empty((height, width, 3), np.float32)
    rgb[..., 0] = 255 * x * (1 - 0.5 * y)
    rgb[..., 1] = 255 * y * (0.5 + 0.5 * x)
    rgb[..., 2] = 255 * (0.5 + 0.5 * np.sin(6 * x + 4 * y))
    rgb += rng.normal(0, noise, (height, width, 1)).astype(np.float32)
    img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")
    path = Path(path)
    img.save(path, "JPEG", quality=quality)
    return path


def bench_decode_draft(data_config: dict[str, Any], *, image: str | os.PathLike | None = None,
                       size: tuple[int, int] = (4000, 3000), repeats: int = 5, noise: float = 4.0,
                       threads: int | None = 1) -> dict[str, Any]:
    """Decode + preprocess (bytes in memory -> float32 [3, H, W]) of one large JPEG (generated by
    ``make_test_jpeg`` when ``image`` is None) with draft mode (the engine's way: JPEG DCT scaling
    down to the smallest side the transform reads) and without, alternating, ``repeats`` times.
    ``speedup`` = best without / best with (the best of several is the least disturbed by other
    load); medians are reported too. ``threads``: torch threads meanwhile; 1 is what an ingest
    decode worker has (DataLoader workers run single-threaded), and it keeps the tensor half of
    the transform from measuring OpenMP hand-offs instead of work on a busy machine."""
    import torch

    from engine.preprocess import build_transform, draft_size_for, open_image

    transform = build_transform(data_config)
    draft = draft_size_for(data_config)
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="engine-bench-") as tmp:
        path = Path(image) if image else make_test_jpeg(Path(tmp) / "camera.jpg", size, noise=noise)
        data = path.read_bytes()
        timings: dict[str, list[float]] = {"draft": [], "full": []}
        decoded: dict[str, list[int]] = {}
        for _ in range(max(1, repeats)):
            for name, ds in (("draft", draft), ("full", None)):
                t0 = time.perf_counter()
                img, info = open_image(data, draft_size=ds)
                tensor = transform(img)
                timings[name].append(time.perf_counter() - t0)
                decoded[name] = list(img.size)
        assert isinstance(tensor, torch.Tensor)
    torch.set_num_threads(before)
    best = {name: min(v) * 1000 for name, v in timings.items()}
    median = {name: statistics.median(v) * 1000 for name, v in timings.items()}
    return {"image": str(image) if image else f"generated {info.width}x{info.height} JPEG q90, noise {noise:g}",
            "megapixels": round(info.width * info.height / 1e6, 1), "file_bytes": len(data),
            "draft_size": draft, "decoded_size_draft": decoded["draft"], "decoded_size_full": decoded["full"],
            "with_draft_ms": round(best["draft"], 2), "without_draft_ms": round(best["full"], 2),
            "with_draft_median_ms": round(median["draft"], 2), "without_draft_median_ms": round(median["full"], 2),
            "speedup": round(best["full"] / best["draft"], 2),
            "speedup_median": round(median["full"] / median["draft"], 2), "repeats": repeats,
            "torch_threads": threads or before}


# -- query ----------------------------------------------------------------------------------------

def build_synthetic_index(n: int, dim: int, factory: str = "Flat", *, seed: int = 0,
                          gen: SyntheticEmbeddings | None = None):
    """A ``VectorIndex`` holding ``n`` synthetic unit vectors under ids 1..n, built in slices."""
    from engine.index import VectorIndex

    gen = gen or SyntheticEmbeddings(dim, seed)
    index = VectorIndex.build(dim, factory)
    start = 1
    for chunk in gen.chunks(n, seed + 1):
        if not index.is_trained:
            index.train(chunk)
        index.add(chunk, np.arange(start, start + len(chunk), dtype=np.int64))
        start += len(chunk)
    return index


def bench_query(sizes: Sequence[int] = (10_000, 1_000_000), *, dim: int = 1280, k: int = 10, repeats: int = 200,
                factory: str = "Flat", seed: int = 0, budget_s: float = 30.0) -> list[dict[str, Any]]:
    """Warm in-process search latency of single queries ([1, dim]) at each index size: p50/p99 ms
    over ``repeats`` queries (fewer, but at least 20, when they would take more than ``budget_s``;
    ``queries`` says how many), plus queries/s when the same queries go as one batch."""
    gen = SyntheticEmbeddings(dim, seed)
    queries = gen.sample(repeats, seed + 999)
    out = []
    for n in sizes:
        t0 = time.perf_counter()
        index = build_synthetic_index(int(n), dim, factory, seed=seed, gen=gen)
        build_s = time.perf_counter() - t0
        for q in queries[:3]:
            index.search(q[None], k)
        samples: list[float] = []
        for q in queries:
            if len(samples) >= 20 and sum(samples) > budget_s:
                break
            t0 = time.perf_counter()
            index.search(q[None], k)
            samples.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        index.search(queries[:len(samples)], k)
        batch_s = time.perf_counter() - t0
        out.append({"n": int(n), "dim": dim, "factory": factory, "k": k, "build_s": round(build_s, 2),
                    "search": dict(_pct(samples), queries=len(samples)),
                    "batch_queries_per_s": round(len(samples) / batch_s, 1),
                    "index_bytes": index.memory_bytes() if n <= 200_000 else n * (dim * 4 + 8)})
        del index
    return out


def bench_query_embed(encoder, image: str | os.PathLike, *, repeats: int = 20) -> dict[str, Any]:
    """Warm decode + preprocess + forward of one query image (``embed_files`` with no workers, as
    ``engine query`` does for a few images): p50/p99 ms."""
    from engine.embedding import embed_files

    embed_files(encoder, [image], workers=0)
    samples = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        embed_files(encoder, [image], workers=0)
        samples.append(time.perf_counter() - t0)
    return dict(_pct(samples), repeats=repeats)


def bench_search_library(home: str | os.PathLike, image: str | os.PathLike, *, k: int = 10, repeats: int = 20,
                         device: str = "cpu") -> dict[str, Any]:
    """Warm end-to-end ``search_library`` (embed + search + metadata) on a real library: p50/p99 ms."""
    from engine.library import Library
    from engine.query import search_library

    library = Library(home, device=device)
    try:
        search_library(library, [os.fspath(image)], k)
        samples = []
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            result = search_library(library, [os.fspath(image)], k)
            samples.append(time.perf_counter() - t0)
        ntotal = library.open_index().ntotal
    finally:
        library.close()
    assert result and not result[0].error, result
    return dict(_pct(samples), vectors=ntotal, repeats=repeats)


# The child of ``bench_cold_query``: what `engine query IMAGE` does, in the same order, timed.
_COLD_QUERY_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import engine.cli, engine.library, engine.query, engine.encoder, engine.embedding, engine.index
import numpy, torch, timm, faiss, sqlalchemy, PIL.Image
t1 = time.perf_counter()
from engine.library import Library
from engine.query import embed_queries
home, image, k, device = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
library = Library(home, device=device)
index = library.open_index()
t2 = time.perf_counter()
library.encoder()
t3 = time.perf_counter()
vectors, errors = embed_queries(library, [image])
t4 = time.perf_counter()
scores, ids = index.search(vectors, k)
t5 = time.perf_counter()
records = library.store.get_images(ids[ids >= 0].tolist())
hits = [records[int(i)].path for i in ids[0] if int(i) in records]
t6 = time.perf_counter()
assert errors == [None] and hits, (errors, hits)
print(json.dumps({"import_s": t1 - t0, "index_load_s": t2 - t1, "model_load_s": t3 - t2, "embed_s": t4 - t3,
                  "search_s": t5 - t4, "metadata_s": t6 - t5, "in_process_s": t6 - t0, "hits": len(hits)}))
"""


def bench_cold_query(home: str | os.PathLike, image: str | os.PathLike, *, k: int = 10, device: str = "cpu",
                     runs: int = 1, cli: bool = True) -> dict[str, Any]:
    """A fresh Python process answering one query against the library in ``home``, split into
    interpreter start, imports, index load (+ database open), model load, embed (decode, preprocess,
    forward), search and metadata fetch. With ``cli``, also the wall time of the real
    ``engine query IMAGE --json`` for comparison. The OS file cache is warm (the library was just
    written); the process is cold. Best of ``runs`` by total wall time."""
    env = dict(os.environ, ENGINE_OFFLINE="1", PYTHONWARNINGS="ignore")
    best: dict[str, Any] | None = None
    for _ in range(max(1, runs)):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", _COLD_QUERY_CHILD, os.fspath(home), os.fspath(image), str(k), device],
                              capture_output=True, text=True, env=env, timeout=600)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"cold query child failed: {proc.stderr.strip().splitlines()[-1:]}")
        split = json.loads(proc.stdout.strip().splitlines()[-1])
        split["interpreter_start_s"] = wall - split["in_process_s"]
        split["wall_s"] = wall
        if best is None or wall < best["wall_s"]:
            best = split
    assert best is not None
    out = {key: round(value, 3) if isinstance(value, float) else value for key, value in best.items()}
    if cli:
        cli_best = math.inf
        for _ in range(max(1, runs)):
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", "from engine.cli import main; main()", "--home", os.fspath(home),
                                   "--device", device, "query", os.fspath(image), "-k", str(k), "--json"],
                                  capture_output=True, text=True, env=env, timeout=600)
            if proc.returncode != 0:
                raise RuntimeError(f"engine query failed: {proc.stderr.strip().splitlines()[-1:]}")
            cli_best = min(cli_best, time.perf_counter() - t0)
        out["cli_wall_s"] = round(cli_best, 3)
    return out


# -- metadata -------------------------------------------------------------------------------------

def _rows(n: int, start: int = 0) -> list[dict[str, Any]]:
    from datetime import datetime

    taken = datetime(2024, 5, 1, 12, 0, 0)
    return [{"path": f"/photos/{i // 1000:04d}/IMG_{i:07d}.jpg", "content_hash": f"{i:064x}", "bytes": 2_000_000 + i,
             "mtime": 1.7e9 + i, "width": 4000, "height": 3000, "format": "JPEG", "taken_at": taken,
             "camera": "Bench Camera"} for i in range(start, start + n)]


def bench_metadata(n_rows: int = 50_000, *, batch_size: int = 32, dim: int = 1280, batches: int = 50,
                   k: int = 10, repeats: int = 200, seed: int = 0) -> dict[str, Any]:
    """SQLite via ``MetadataStore``: bulk ``insert_rows`` of ``n_rows`` rows in one call (rows/s);
    ingest-like ``write_batch`` of ``batch_size`` rows + float32 [batch_size, dim] vectors per
    transaction, ``batches`` times (rows/s); and fetch of ``k`` random records by id (p50/p99 ms)."""
    from db.store import MetadataStore

    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(prefix="engine-bench-") as tmp:
        store = MetadataStore.for_file(Path(tmp) / "bulk.db")
        rows = _rows(n_rows)
        t0 = time.perf_counter()
        ids = store.insert_rows(rows)
        bulk_s = time.perf_counter() - t0
        assert len(ids) == n_rows
        samples = []
        for _ in range(repeats):
            wanted = rng.choice(ids, size=min(k, len(ids)), replace=False).tolist()
            t0 = time.perf_counter()
            got = store.get_images(wanted)
            samples.append(time.perf_counter() - t0)
        assert len(got) == len(wanted)
        store.close()
        store = MetadataStore.for_file(Path(tmp) / "batches.db")
        vectors = rng.standard_normal((batch_size, dim), dtype=np.float32)
        t0 = time.perf_counter()
        for b in range(batches):
            store.write_batch(_rows(batch_size, b * batch_size), vectors)
        batch_s = time.perf_counter() - t0
        store.close()
    return {"rows": n_rows, "bulk_seconds": round(bulk_s, 3), "bulk_rows_per_s": round(n_rows / bulk_s),
            "batch_size": batch_size, "batches": batches, "batch_ms": round(batch_s / batches * 1000, 2),
            "batch_rows_per_s": round(batches * batch_size / batch_s), "fetch": dict(_pct(samples), k=k)}


# -- index types ----------------------------------------------------------------------------------

def fit_factory(factory: str, n: int, *, polysemous: bool = True) -> str:
    """``factory`` with IVF list counts lowered to what ``n`` training vectors support (FAISS wants
    about 39 per list): ``IVF1024`` stays for n >= 39,936, and halves until it fits. With
    ``polysemous=False``, ``PQm`` becomes ``PQmnp``: FAISS's factory turns on polysemous training
    for PQ codes by default, which alone takes minutes on two cores whatever ``n`` is."""
    def shrink(match: re.Match) -> str:
        nlist = int(match.group(1))
        while nlist > 16 and n < 39 * nlist:
            nlist //= 2
        return f"IVF{nlist}"

    out = re.sub(r"IVF(\d+)", shrink, factory)
    if not polysemous:
        out = re.sub(r"(?<![A-Za-z])PQ(\d+(?:x\d+)?)(?=,|$)", r"PQ\1np", out)
    return out


def exact_neighbours(database: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Row positions int64 [Q, k] of the exact top-k by inner product (brute force)."""
    import faiss

    flat = faiss.IndexFlatIP(database.shape[1])
    flat.add(database)
    return flat.search(queries, k)[1]


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / k, for id arrays [Q, k] (-1 never matches)."""
    k = truth.shape[1]
    return float(np.mean([len(set(f[f >= 0].tolist()) & set(t.tolist())) / k for f, t in zip(found, truth)]))


def bench_index_types(n: int = 100_000, dim: int = 1280, factories: Sequence[str] = DEFAULT_FACTORIES, *,
                      k: int = 10, n_queries: int = 1000, seed: int = 0, polysemous: bool = True,
                      search_params: Sequence[str] = ()) -> dict[str, Any]:
    """Per FAISS index type (through ``VectorIndex``, as the engine builds it, default search
    parameters): build time (train + add), recall@k against exact search, batch queries/s,
    single-query p50 and serialised bytes per vector, on ``n`` synthetic vectors. Factories are
    adapted by ``fit_factory`` (see there; ``factory_used`` says what ran).

    ``search_params``: FAISS ParameterSpace strings (``"nprobe=16"``, ``"efSearch=64"``) tried on
    each index after its default row; each that applies adds a row (same build, other search)."""
    import faiss

    from engine.index import VectorIndex

    gen = SyntheticEmbeddings(dim, seed)
    database = np.concatenate(list(gen.chunks(n, seed + 1)))
    queries = gen.sample(n_queries, seed + 999)
    ids = np.arange(n, dtype=np.int64)
    truth = exact_neighbours(database, queries, k)
    rows = []
    for factory in factories:
        used = fit_factory(factory, n, polysemous=polysemous)
        index = VectorIndex.build(dim, used)
        t0 = time.perf_counter()
        index.train(database)
        index.add(database, ids)
        build_s = time.perf_counter() - t0
        size = round(index.memory_bytes() / n, 1)
        for params in ("", *search_params):
            if params:
                try:
                    faiss.ParameterSpace().set_index_parameters(index._index, params)
                except RuntimeError:  # not a parameter of this index type
                    continue
            t0 = time.perf_counter()
            _, found = index.search(queries, k)
            batch_s = time.perf_counter() - t0
            single = []
            for q in queries[:50]:
                t1 = time.perf_counter()
                index.search(q[None], k)
                single.append(time.perf_counter() - t1)
            rows.append({"factory": factory, "factory_used": used, "params": params or "default",
                         "build_s": round(build_s, 2), f"recall@{k}": round(recall_at_k(found, truth), 4),
                         "queries_per_s": round(n_queries / batch_s, 1), "single_p50_ms": _pct(single)["p50_ms"],
                         "bytes_per_vector": size})
        del index
    return {"n": n, "dim": dim, "k": k, "queries": n_queries, "data": "synthetic clustered unit vectors",
            "rows": rows}


# -- everything -----------------------------------------------------------------------------------

def _section(results: dict[str, Any], name: str, fn: Callable[[], Any]) -> None:
    t0 = time.perf_counter()
    try:
        value = fn()
    except Exception as exc:  # one broken section must not hide the others' figures
        log.warning("bench section %s failed: %s", name, exc, exc_info=True)
        value = {"error": f"{type(exc).__name__}: {exc}"}
    if isinstance(value, dict):
        value.setdefault("section_s", round(time.perf_counter() - t0, 2))
    results[name] = value


def run_bench(config: BenchConfig = BenchConfig()) -> dict[str, Any]:
    """Run the sections named in ``config.sections``; returns a JSON-serialisable dict with
    ``machine``, ``config`` and one entry per section (``{"error": ...}`` when one failed).

    The quick flavour also builds PQ indexes without polysemous training (``factory_used`` shows
    it), which alone would take minutes."""
    import torch

    from engine.encoder import load_encoder, resolve_device

    cfg = config.resolved()
    device = str(resolve_device(cfg.device))
    started = time.perf_counter()
    results: dict[str, Any] = {"machine": machine_info(), "config": asdict(cfg)}
    results["config"]["device"] = device
    data = Path(cfg.data) if cfg.data else sample_folder()
    paths = image_files(data, cfg.ingest_files)
    results["config"]["data"] = str(data)
    state: dict[str, Any] = {}

    def encoder():
        if "encoder" not in state:
            state["encoder"] = load_encoder(cfg.model, torch.device(device))
        return state["encoder"]

    with tempfile.TemporaryDirectory(prefix="engine-bench-") as tmp:
        home = Path(tmp) / "library"
        if "ingest" in cfg.sections:
            _section(results, "ingest", lambda: bench_ingest(paths, model=cfg.model, batch_size=cfg.batch_size,
                                                             workers=cfg.workers, device=device, rounds=cfg.rounds,
                                                             keep_library=home))
            if not cfg.quick and "error" not in results["ingest"]:
                results["ingest"]["model_configs"] = bench_model_configs(
                    cfg.model, batch_size=cfg.batch_size, device=device, threads=(1,), rounds=2)
        if "decode" in cfg.sections:
            _section(results, "decode", lambda: bench_decode_draft(encoder().data_config, size=cfg.decode_size,
                                                                   repeats=3 if cfg.quick else 7))
        if "metadata" in cfg.sections:
            _section(results, "metadata", lambda: bench_metadata(cfg.metadata_rows, dim=cfg.dim,
                                                                 batches=10 if cfg.quick else 50, seed=cfg.seed))
        if "query" in cfg.sections:
            _section(results, "query", lambda: _query_section(cfg, paths, encoder, home, device))
        if "index" in cfg.sections:
            _section(results, "index", lambda: bench_index_types(cfg.n_vectors, cfg.dim, cfg.factories,
                                                                 n_queries=cfg.index_queries, seed=cfg.seed,
                                                                 polysemous=not cfg.quick,
                                                                 search_params=cfg.search_params))
    results["machine"]["loadavg_end"] = _loadavg()
    results["seconds"] = round(time.perf_counter() - started, 1)
    return results


def _query_section(cfg: BenchConfig, paths: Sequence[str], encoder: Callable, home: Path, device: str) -> dict[str, Any]:
    """Warm search at each size, warm embed of a query image, and (on a real library: the one the
    ingest section left in ``home``, else a fresh ingest of up to 256 files) end-to-end and cold."""
    from engine.library import Library
    from ingest.pipeline import IngestConfig, ingest_paths

    out: dict[str, Any] = {"search": bench_query(cfg.query_sizes, dim=cfg.dim, repeats=cfg.query_repeats, seed=cfg.seed)}
    queries = sorted((sample_folder().parent / "query").glob("*.jpg"))
    image = queries[0] if queries else Path(paths[-1])
    out["query_image"] = str(image)
    out["embed"] = bench_query_embed(encoder(), image, repeats=5 if cfg.quick else 20)
    if not (home / "index.faiss").exists():
        library = Library(home, device=device)
        ingest_paths(library, paths[:256], IngestConfig(batch_size=cfg.batch_size), model=cfg.model)
        library.close()
    out["library"] = bench_search_library(home, image, repeats=5 if cfg.quick else 20, device=device)
    if cfg.cold_query:
        out["cold"] = bench_cold_query(home, image, device=device, runs=1 if cfg.quick else 2, cli=not cfg.quick)
    return out


# -- text -----------------------------------------------------------------------------------------

def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return ["  " + line for line in lines]


def format_bench(results: dict[str, Any]) -> str:
    """A readable report of ``run_bench`` results: one block per section, tables where apt."""
    lines: list[str] = []
    m = results.get("machine", {})
    lines.append(f"machine: {m.get('cpu')}, {m.get('usable_cores')} cores, {m.get('ram_gb')} GB RAM, "
                 f"GPU: {m.get('gpu') or 'none'}")
    lines.append(f"         torch {m.get('torch')} ({m.get('torch_threads')} threads), faiss {m.get('faiss')}, "
                 f"timm {m.get('timm')}, python {m.get('python')}; load average {m.get('loadavg')} -> "
                 f"{m.get('loadavg_end')}")

    def failed(name: str) -> bool:
        sec = results.get(name)
        if isinstance(sec, dict) and "error" in sec:
            lines.append(f"{name}: FAILED: {sec['error']}")
            return True
        return sec is None

    if not failed("ingest"):
        s = results["ingest"]
        lines += ["", f"ingest: {s['files']} files, {s['backbone']} {s['input_size'][-1]} px, batch {s['batch_size']}, "
                      f"{s['workers']} decode workers, {s['torch_threads']} torch threads, {s['device']}"]
        lines += _table(["", "images/s", "CPU ms/image"],
                        [["bare model (pre-decoded)", s["model_images_per_s"], s["model_cpu_ms_per_image"]],
                         ["ingest_paths", s["ingest_images_per_s"], s["ingest_cpu_ms_per_image"]],
                         ["ratio", s["ratio"], s["cpu_ratio"]]])
        lines.append(f"  (new-library model setup {s['model_setup_s']} s, not in the ratio; "
                     f"{s['embedded']} embedded, {s['failed']} failed)")
        mc = s.get("model_configs")
        if mc:
            lines.append(f"  bare model configurations, batch {mc['batch_size']}, random input "
                         f"(max |diff| from embed in brackets):")
            lines += _table(["configuration", "images/s"],
                            [[f"{name} [{mc['max_abs_diff'][name]:.1g}]", v] for name, v in mc["images_per_s"].items()])
    if not failed("decode"):
        s = results["decode"]
        lines += ["", f"decode + preprocess: {s['image']} ({s['megapixels']} MP, {s['file_bytes'] // 1024} KiB), "
                      f"{s.get('torch_threads')} torch thread(s) as in a decode worker"]
        lines += _table(["", "best ms", "median ms", "decoded size"],
                        [["with draft", s["with_draft_ms"], s["with_draft_median_ms"],
                          "x".join(map(str, s["decoded_size_draft"]))],
                         ["without draft", s["without_draft_ms"], s["without_draft_median_ms"],
                          "x".join(map(str, s["decoded_size_full"]))],
                         ["speedup", f"{s['speedup']}x", f"{s['speedup_median']}x", ""]])
    if not failed("query"):
        s = results["query"]
        lines += ["", "query, warm, in process (synthetic unit vectors, Flat index):"]
        lines += _table(["vectors", "dim", "search p50 ms", "p99 ms", "batch q/s", "build s"],
                        [[f"{r['n']:,}", r["dim"], r["search"]["p50_ms"], r["search"]["p99_ms"],
                          r["batch_queries_per_s"], r["build_s"]] for r in s["search"]])
        e = s["embed"]
        lines.append(f"  embed one query image (decode + preprocess + forward): p50 {e['p50_ms']} ms, p99 {e['p99_ms']} ms")
        meta = results.get("metadata")
        if isinstance(meta, dict) and "fetch" in meta:
            lines.append(f"  metadata fetch of {meta['fetch']['k']} records: p50 {meta['fetch']['p50_ms']} ms, "
                         f"p99 {meta['fetch']['p99_ms']} ms")
            for r in s["search"]:
                total = e["p50_ms"] + r["search"]["p50_ms"] + meta["fetch"]["p50_ms"]
                lines.append(f"  total at {r['n']:,} vectors (sum of p50s): {total:.1f} ms")
        lib = s.get("library")
        if lib:
            lines.append(f"  search_library on a real {lib['vectors']}-image library: p50 {lib['p50_ms']} ms, "
                         f"p99 {lib['p99_ms']} ms")
        c = s.get("cold")
        if c:
            lines.append("  cold `engine query` (fresh process, warm file cache), seconds:")
            lines += _table(["interpreter", "import", "index load", "model load", "embed", "search", "metadata", "total"],
                            [[c["interpreter_start_s"], c["import_s"], c["index_load_s"], c["model_load_s"],
                              c["embed_s"], c["search_s"], c["metadata_s"], c["wall_s"]]])
            if "cli_wall_s" in c:
                lines.append(f"  the real `engine query --json` took {c['cli_wall_s']} s wall")
    if not failed("metadata"):
        s = results["metadata"]
        lines += ["", f"metadata (SQLite): insert_rows of {s['rows']:,} rows: {s['bulk_rows_per_s']:,} rows/s; "
                      f"write_batch of {s['batch_size']} rows + vectors: {s['batch_ms']} ms "
                      f"({s['batch_rows_per_s']:,} rows/s)"]
    if not failed("index"):
        s = results["index"]
        lines += ["", f"index types: {s['n']:,} {s['data']}, dim {s['dim']}, {s['queries']} queries, "
                      "engine default search parameters unless stated"]
        lines += _table(["factory", "search", "build s", f"recall@{s['k']}", "queries/s", "1-query p50 ms",
                         "bytes/vector"],
                        [[r["factory_used"], r.get("params", "default"), r["build_s"], r[f"recall@{s['k']}"],
                          r["queries_per_s"], r["single_p50_ms"], r["bytes_per_vector"]] for r in s["rows"]])
    if "seconds" in results:
        lines += ["", f"total {results['seconds']} s"]
    return "\n".join(lines)
