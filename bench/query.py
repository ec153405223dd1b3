"""Query latency: warm search over synthetic vectors, warm embed of one query image, warm
``search_library`` on a real library, and a cold ``engine query`` in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from bench.errors import BenchError
from bench.synthetic import SyntheticEmbeddings, build_synthetic_index
from bench.timing import percentiles

if TYPE_CHECKING:
    from engine.encoder import Encoder


def bench_query(sizes: Sequence[int] = (10_000, 1_000_000), *, dim: int = 1280, k: int = 10, repeats: int = 200,
                factory: str = "Flat", seed: int = 0, budget_s: float = 30.0) -> list[dict[str, Any]]:
    """Warm in-process ``VectorIndex.search`` latency of single queries (float32 [1, dim]) at each
    index size: p50/p99 ms over ``repeats`` queries (fewer, but at least 20, when they would take
    more than ``budget_s``; ``queries`` says how many), plus queries/s when the same queries go as
    one batch."""
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
                    "search": dict(percentiles(samples), queries=len(samples)),
                    "batch_queries_per_s": round(len(samples) / batch_s, 1),
                    # serialising a million vectors to measure them would copy 5 GB: counted instead
                    "index_bytes": index.memory_bytes() if n <= 200_000 else n * (dim * 4 + 8)})
        del index
    return out


def bench_query_embed(encoder: "Encoder", image: str | os.PathLike, *, repeats: int = 20) -> dict[str, Any]:
    """Warm decode + preprocess + forward of one query image (``embed_files`` with no workers, as
    ``engine query`` does for a few images): p50/p99 ms. Raises BenchError when it fails."""
    from engine.embedding import embed_files

    first = embed_files(encoder, [image], workers=0)
    if first.failures:
        raise BenchError(f"cannot embed the query image: {first.failures[0][0]}: {first.failures[0][1]}")
    samples = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        embed_files(encoder, [image], workers=0)
        samples.append(time.perf_counter() - t0)
    return dict(percentiles(samples), repeats=repeats)


def ingest_library(home: str | os.PathLike, paths: Sequence[str], *, model: str = "pretrained",
                   batch_size: int = 32, device: str = "cpu") -> None:
    """Ingest ``paths`` into the library in ``home`` with the real ``ingest_paths`` (a library to
    query; nothing is timed). Raises BenchError when nothing was embedded."""
    from engine.library import Library
    from ingest.pipeline import IngestConfig, ingest_paths

    library = Library(home, device=device)
    try:
        report = ingest_paths(library, paths, IngestConfig(batch_size=batch_size), model=model)
    finally:
        library.close()
    if report.embedded == 0 and not library.paths.index.exists():
        raise BenchError(f"no image of {len(paths)} could be ingested into {home}")


def bench_search_library(home: str | os.PathLike, image: str | os.PathLike, *, k: int = 10, repeats: int = 20,
                         device: str = "cpu") -> dict[str, Any]:
    """Warm end-to-end ``search_library`` (embed + search + metadata) on the real library in
    ``home``: p50/p99 ms, its vector count and its index type as read back from the index file.
    Raises BenchError when the query reports an error or finds nothing."""
    from bench.index_types import saved_index_type
    from engine.library import Library
    from engine.query import search_library

    library = Library(home, device=device)
    try:
        search_library(library, [os.fspath(image)], k)
        samples = []
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            results = search_library(library, [os.fspath(image)], k)
            samples.append(time.perf_counter() - t0)
        ntotal = library.open_index().ntotal
        kind = saved_index_type(library.paths.index) if library.paths.index.exists() else None
    finally:
        library.close()
    if not results or results[0].error or not results[0].hits:
        raise BenchError(f"search_library of {image} failed: {results[0].error if results else 'no result'}")
    return dict(percentiles(samples), vectors=ntotal, index_type=kind, repeats=repeats)


def _child_env() -> dict[str, str]:
    """Offline, quiet, and able to import ``bench`` from wherever this copy of it lives."""
    root = str(Path(__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, ENGINE_OFFLINE="1", PYTHONWARNINGS="ignore",
                PYTHONPATH=root + (os.pathsep + path if path else ""))


def run_child(argv: Sequence[str], what: str, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``argv`` with ``env``; (the finished process, its wall seconds). Raises BenchError
    naming ``what`` and the last line of its stderr when it fails or takes over 600 s."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, env=env, timeout=600)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{what} took more than 600 s") from None
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise BenchError(f"{what} failed (exit status {proc.returncode}): {last}")
    return proc, wall


def bench_cold_query(home: str | os.PathLike, image: str | os.PathLike, *, k: int = 10, device: str = "cpu",
                     runs: int = 1, cli: bool = True) -> dict[str, Any]:
    """A fresh Python process answering one query against the library in ``home`` through the
    engine's own ``search_library`` (``python -m bench.cold_query``), split into interpreter
    start, imports, database open, index load, model load, embed (decode, preprocess, forward),
    search, metadata fetch and the rest. With ``cli``, also the wall time of the real ``engine
    query IMAGE --json --no-server`` (in-process: a running ``engine serve`` is never timed). The OS file cache is warm (the library was just written); the process is
    cold. Best of ``runs`` by total wall time; seconds, rounded to the millisecond."""
    env = _child_env()
    child = [sys.executable, "-m", "bench.cold_query", os.fspath(home), os.fspath(image), "--k", str(k),
             "--device", device]
    best: dict[str, Any] = {}
    for _ in range(max(1, runs)):
        proc, wall = run_child(child, "the cold query child", env)
        try:
            split = json.loads(proc.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            raise BenchError(f"the cold query child printed no timings: {proc.stdout[-200:]!r}") from None
        split["interpreter_start_s"] = wall - split["in_process_s"]
        split["wall_s"] = wall
        if not best or wall < best["wall_s"]:
            best = split
    out = {key: round(value, 3) if isinstance(value, float) else value for key, value in best.items()}
    if cli:
        command = [sys.executable, "-c", "from engine.cli import main; main()", "--home", os.fspath(home),
                   "--device", device, "query", os.fspath(image), "-k", str(k), "--json", "--no-server"]
        out["cli_wall_s"] = round(min(run_child(command, "engine query", env)[1] for _ in range(max(1, runs))), 3)
    return out
