"""Every section in one run: ``run_bench(BenchConfig(...))``, behind ``engine bench``.

Timings are wall clock on whatever else the machine is doing: the load average is recorded at the
start and end so a noisy run can be recognised, and ratios are measured within one run.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from bench.index_types import DEFAULT_FACTORIES, DEFAULT_SEARCH_PARAMS

if TYPE_CHECKING:
    from engine.encoder import Encoder

log = logging.getLogger(__name__)

SECTIONS = ("ingest", "decode", "query", "metadata", "index")


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
    search_params: tuple[str, ...] = DEFAULT_SEARCH_PARAMS
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


def _section(results: dict[str, Any], name: str, fn: Callable[[], Any]) -> None:
    """Run one section into ``results[name]``; a failure becomes ``{"error": ...}`` there."""
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

    from bench.decode import bench_decode_draft
    from bench.index_types import bench_index_types
    from bench.ingest import bench_ingest
    from bench.machine import loadavg, machine_info
    from bench.metadata import bench_metadata
    from bench.models import bench_model_configs
    from bench.samples import image_files, sample_folder
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

    def encoder() -> "Encoder":
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
            _section(results, "query", lambda: query_section(cfg, paths, encoder, home, device))
        if "index" in cfg.sections:
            _section(results, "index", lambda: bench_index_types(cfg.n_vectors, cfg.dim, cfg.factories,
                                                                 n_queries=cfg.index_queries, seed=cfg.seed,
                                                                 polysemous=not cfg.quick,
                                                                 search_params=cfg.search_params))
    results["machine"]["loadavg_end"] = loadavg()
    results["seconds"] = round(time.perf_counter() - started, 1)
    return results


def query_section(cfg: BenchConfig, paths: Sequence[str], encoder: Callable[[], "Encoder"], home: Path,
                  device: str) -> dict[str, Any]:
    """Warm search at each size, warm embed of a query image, and (on a real library: the one the
    ingest section left in ``home``, else a fresh ingest of up to 256 of ``paths``) end-to-end
    and cold. ``cfg`` is resolved; ``encoder`` returns the (cached) encoder."""
    from bench.query import bench_cold_query, bench_query, bench_query_embed, bench_search_library, ingest_library
    from bench.samples import query_image
    from engine.config import LibraryPaths

    out: dict[str, Any] = {"search": bench_query(cfg.query_sizes, dim=cfg.dim, repeats=cfg.query_repeats,
                                                 seed=cfg.seed)}
    image = query_image(fallback=paths[-1] if paths else None)
    out["query_image"] = str(image)
    out["embed"] = bench_query_embed(encoder(), image, repeats=5 if cfg.quick else 20)
    if not LibraryPaths(home).index.exists():
        ingest_library(home, paths[:256], model=cfg.model, batch_size=cfg.batch_size, device=device)
    out["library"] = bench_search_library(home, image, repeats=5 if cfg.quick else 20, device=device)
    if cfg.cold_query:
        out["cold"] = bench_cold_query(home, image, device=device, runs=1 if cfg.quick else 2, cli=not cfg.quick)
    return out
