"""The driver of ``engine ingest PATH... --ray``: plan on this machine, embed on the cluster, commit
here.

1. Walk and plan exactly as plain ingest does (``ingest.pipeline._plan``, under the library's write
   lock): files whose size and mtime match the library are never sent to the cluster; renames,
   touches and copies of indexed bytes are committed before anything is decoded.
2. The files left are cut into partitions (one Ray Data row each), and ``map_batches`` runs them
   through an actor pool of ``ShardEmbedder``s, each writing its partition's shard
   (``engine-shards/1``); the driver shows progress as partitions finish.
3. The manifest is written last, listing this run's shards, and ``engine import``'s loop commits
   them with ingest's rules (``ingest.distributed.commit``), then brings the index up to date.

A driver killed at any step leaves the library as a killed plain ingest does: what was committed
is kept, and a rerun plans again (committed files are unchanged by then) and converges.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from engine.atomic import atomic_path
from engine.errors import EngineError
from engine.faults import DELAY_ENV, FAULT_ENV, fault_point
from engine.shards import MANIFEST, remove_manifest, write_manifest
from ingest.changes import Reconciler
from ingest.distributed.cluster import Placement, RayConfig, connect, place, shards_folder
from ingest.distributed.commit import ingest_committer
from ingest.distributed.embedder import ShardEmbedder
from ingest.importer import ImportConfig, ImportReport, import_shards
from ingest.pipeline import IngestConfig, IngestReport, _write_failures, planned_ingest, walk_inputs
from ingest.prune import prune_roots

if TYPE_CHECKING:
    from engine.library import Library
    from engine.progress import ProgressFn

ENCODER_COPY = "encoder.pt"  # in a cluster's shared shards folder: what the actors of other hosts load


@dataclass
class RayStats:
    """The distributed part of a run: start (seconds to start or join the cluster; 0 when none was
    needed), cluster (wall seconds of the decode + embed + write-shards stage), first_result
    (seconds from the start of that stage to the first partition done: starting the actors and
    loading the encoder in them, plus one partition's work), actor_decode and
    actor_embed (wall seconds summed over the actors, so they may exceed the wall time), actor_cpu
    (CPU seconds of the actors' partitions: start-up excluded), actors,
    partitions, workers (distinct actor processes that returned results: more than ``actors`` when
    Ray replaced a dead one), and the shards folder."""

    start: float = 0.0
    cluster: float = 0.0
    first_result: float = 0.0
    actor_decode: float = 0.0
    actor_embed: float = 0.0
    actor_cpu: float = 0.0
    actors: int = 0
    partitions: int = 0
    workers: int = 0
    shards: str | None = None
    address: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


@dataclass
class RayIngestReport:
    """What a Ray ingest did: ``ingest`` counts files as plain ingest does (``embedded``: files the
    actors embedded; its ``stages`` hold the driver's seconds: model, walk, plan, commit, index),
    ``ray`` the distributed stage, ``imported`` the commit step's report (None when nothing was
    sent to the cluster)."""

    ingest: IngestReport
    ray: RayStats = field(default_factory=RayStats)
    imported: ImportReport | None = None

    def to_dict(self) -> dict[str, Any]:
        """What ``engine ingest --ray --json`` prints: plain ingest's summary and ``ray``."""
        return dict(self.ingest.to_dict(), ray=self.ray.to_dict())


def partitions_of(files: Sequence[str], actors: int, most: int, per_actor: int) -> list[list[str]]:
    """``files`` in consecutive partitions whose sizes differ by at most one: ``per_actor`` per
    actor, more where a partition would hold over ``most`` files, fewer when there are fewer files
    than that."""
    count = min(len(files), max(actors * per_actor, math.ceil(len(files) / max(1, most))))
    if not count:
        return []
    size, larger = divmod(len(files), count)
    parts, start = [], 0
    for n in range(count):
        stop = start + size + (1 if n < larger else 0)
        parts.append(list(files[start:stop]))
        start = stop
    return parts


def _forwarded_env() -> dict[str, str]:
    """Crash-test settings reach the actors too (engine.faults), so a test can kill one."""
    return {k: os.environ[k] for k in (FAULT_ENV, DELAY_ENV) if os.environ.get(k)}


def _run_cluster(ray: Any, placement: Placement, parts: list[list[str]], encoder_path: Path, identity: str,
                 shards_dir: Path, batch_size: int, stats: RayStats, report: IngestReport,
                 progress: Callable[[int], None]) -> list[str]:
    """Embed ``parts`` on the cluster; returns the names of the shards written (partition order).
    Failed files go to ``report.failed``; progress(files) is called as partitions finish."""
    items = [{"partition": n, "paths": [os.fsencode(p) for p in part]} for n, part in enumerate(parts)]
    dataset = ray.data.from_items(items, override_num_blocks=len(items))
    env = _forwarded_env()
    extra: dict[str, Any] = {"runtime_env": {"env_vars": env}} if env else {}
    results = dataset.map_batches(
        ShardEmbedder, batch_size=1, num_cpus=placement.num_cpus, num_gpus=placement.num_gpus or None,
        compute=ray.data.ActorPoolStrategy(size=placement.actors, max_tasks_in_flight_per_actor=1),
        fn_constructor_kwargs={"encoder_path": str(encoder_path), "identity": identity, "shards_dir": str(shards_dir),
                               "device": placement.device, "threads": placement.threads, "batch_size": batch_size},
        **extra)
    shards: dict[int, str] = {}
    workers: set[int] = set()
    began = time.perf_counter()
    try:
        for row in results.iter_rows():
            if not workers:
                stats.first_result = time.perf_counter() - began
            workers.add(int(row["worker"]))
            if row["shard"]:
                shards[int(row["partition"])] = str(row["shard"])
            report.failed.extend((os.fsdecode(bytes(p)), str(r))
                                 for p, r in zip(row["failed_paths"], row["failed_reasons"]))
            stats.actor_decode += float(row["decode_s"])
            stats.actor_embed += float(row["embed_s"])
            stats.actor_cpu += float(row["cpu_s"])
            report.embedded += int(row["rows"])
            progress(int(row["rows"]) + len(row["failed_paths"]))
    except EngineError:
        raise
    except Exception as exc:  # Ray wraps an actor's exception in its own types: one line for the user
        text = str(exc).strip().splitlines()
        raise EngineError(f"the Ray stage failed: {text[-1] if text else type(exc).__name__}") from None
    stats.workers = len(workers)
    return [shards[n] for n in sorted(shards)]


def _update_index(library: Library) -> None:
    # update_index: until the library offers one method for it, open (which reconciles the index
    # with the stored vectors by id) and save.
    index = library.open_index(required=False)
    if index is not None:
        library.save_index(index)


def _clear(shards_dir: Path, names: Sequence[str]) -> None:
    """Delete this run's shards and manifest from the library's own shards folder."""
    for name in names:
        for suffix in (".npy", ".parquet"):
            with contextlib.suppress(FileNotFoundError):
                (shards_dir / f"{name}{suffix}").unlink()
    with contextlib.suppress(FileNotFoundError):
        (shards_dir / MANIFEST).unlink()
    with contextlib.suppress(OSError):
        shards_dir.rmdir()  # only when empty


def _embed_and_commit(library: Library, todo: Sequence[str], dim: int, reconciler: Reconciler, config: IngestConfig,
                      ray_config: RayConfig, result: RayIngestReport, advance: Callable[[int], None]) -> None:
    """Embed ``todo`` on the cluster into shards, write their manifest, then commit them with the
    import's loop and ingest's rules (which brings the index up to date). The caller holds the
    write lock and has planned with ``reconciler``."""
    report, stats, stages = result.ingest, result.ray, result.ingest.stages
    identity = library.model_info().identity
    shards_dir, own_folder = shards_folder(ray_config, library.paths.home)
    ray, stats.start, _ = connect(ray_config)  # a local cluster started here lives as long as this process
    placement = place(ray, ray_config, library.device)
    parts = partitions_of(todo, placement.actors, ray_config.partition_rows, ray_config.partitions_per_actor)
    placement = replace(placement, actors=min(placement.actors, len(parts)))  # no idle actor to start
    stats.actors, stats.partitions, stats.shards = placement.actors, len(parts), str(shards_dir)
    stats.address = ray_config.address
    shards_dir.mkdir(parents=True, exist_ok=True)
    remove_manifest(shards_dir)  # until this run's is written, nothing there is importable
    encoder_file = library.paths.encoder
    if ray_config.address:  # other hosts cannot read this home: the encoder travels in the shared shards folder
        encoder_file = shards_dir / ENCODER_COPY
        with atomic_path(encoder_file) as tmp:
            shutil.copyfile(library.paths.encoder, tmp)
    began = time.perf_counter()
    names = _run_cluster(ray, placement, parts, encoder_file, identity, shards_dir, config.batch_size,
                         stats, report, advance)
    stats.cluster = time.perf_counter() - began
    write_manifest(shards_dir, identity, dim, names)
    fault_point("ray-embedded")
    imported = import_shards(library, shards_dir, ImportConfig(batch_size=max(config.batch_size, 1000)),
                             committer=lambda lib, timed: ingest_committer(lib, reconciler, timed))
    result.imported = imported
    report.failed.extend(imported.failed)  # a shard of this run refused: its files are not indexed
    stages.commit += imported.stages.read + imported.stages.lookup + imported.stages.commit
    stages.index += imported.stages.index
    if own_folder:
        _clear(shards_dir, names)


def ingest_with_ray(library: Library, roots: Sequence[str | os.PathLike], config: IngestConfig = IngestConfig(),
                    ray_config: RayConfig = RayConfig(), *, model: str | None = None,
                    progress: ProgressFn | None = None, on_wait: Callable[[], None] | None = None) -> RayIngestReport:
    """Index every image under ``roots`` into ``library`` on Ray Data; returns the report.

    Same contract as ``ingest.pipeline.ingest_paths`` (model, progress, on_wait, config's
    batch_size, exclude and prune; ``workers`` is not used: the actors decode), with
    ``ray_config`` saying where it runs. Ray is started (or joined) only when there is something
    to embed. Raises EngineError when no image is found, when Ray is missing or unreachable, or
    when the cluster stage fails (what was committed before is kept)."""
    started = time.perf_counter()
    result = RayIngestReport(IngestReport())
    report = result.ingest
    stages = report.stages
    found = walk_inputs(library, roots, config, stages)
    shards_folder(ray_config, library.paths.home)  # an address without a shared folder is refused before anything
    with planned_ingest(library, roots, found, report, model=model, progress=progress,
                        on_wait=on_wait) as (encoder, roots_abs, reconciler, first, todo):
        stale_index = bool(first)  # rows moved or dropped: the index must follow
        if first:
            with stages.timing("commit"):
                reconciler.committed(library.store.apply_changes(first))
        total, done = len(found.files), len(found.files) - len(todo)
        if progress:
            progress(done, total)

        def advance(files: int) -> None:
            nonlocal done
            done += files
            if progress:
                progress(done, total)

        if todo:
            _embed_and_commit(library, todo, encoder.dim, reconciler, config, ray_config, result, advance)
            stale_index = False  # the commit step brought it up to date
        if config.prune:
            with stages.timing("commit"):
                gone = prune_roots(library, roots_abs, found, report)
            stale_index = stale_index or bool(gone)
        if stale_index:
            with stages.timing("index"):
                _update_index(library)
        report.report_path = os.fspath(library.paths.report)
        with stages.timing("commit"):
            _write_failures(library.paths.report, report.failed)
    report.seconds = time.perf_counter() - started
    return result
