"""``engine ingest --ray`` on a real local Ray cluster (one per test session): the same rows and
vectors as plain ingest, incremental reruns, an actor killed mid-run (Ray replaces it and retries
its partition: nothing lost or doubled), and the driver killed then rerun (converges)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from engine.library import Library
from ingest.pipeline import IngestConfig, ingest_paths
from tests.util import make_image

ray = pytest.importorskip("ray")

from ingest.distributed import RayConfig, ingest_with_ray  # noqa: E402
from ingest.distributed.driver import partitions_of  # noqa: E402

FLOAT_ATOL = 2e-3  # float32 batches of other sizes, stored as float16


@pytest.fixture(scope="session")
def ray_cluster() -> str:
    """One local Ray cluster for the session (2 CPUs, no dashboard, no usage reports): its address."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _photos(root: Path, n: int, seed0: int = 500) -> list[Path]:
    """``n`` seeded photos in three folders, two byte-identical copies and a broken file."""
    paths = [make_image(root / f"f{i % 3}" / f"img_{i:02d}.png", seed=seed0 + i, size=(28, 24)) for i in range(n)]
    for k, source in enumerate(paths[:2]):
        copy = root / "copies" / f"copy_{k}.png"
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, copy)
    (root / "f1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    return paths


def _state(library: Library) -> tuple[list[tuple], list[tuple], dict[str, np.ndarray]]:
    """(image rows without ids and times, aliases as (path, image path), path -> stored vector)."""
    store = library.store
    records = store.get_images(store.image_ids())
    rows = sorted((r.path, r.content_hash, r.bytes, r.mtime, r.width, r.height, r.format, r.taken_at, r.camera)
                  for r in records.values())
    aliases = store.aliases_of(records)
    alias_rows = sorted((a, records[i].path) for i, paths in aliases.items() for a in paths)
    ids, vectors = store.get_embeddings(sorted(records), library.model_info().dim)
    return rows, alias_rows, {records[int(i)].path: v for i, v in zip(ids, vectors)}


def _same(a: Library, b: Library) -> None:
    rows_a, aliases_a, vectors_a = _state(a)
    rows_b, aliases_b, vectors_b = _state(b)
    assert rows_b == rows_a
    assert aliases_b == aliases_a
    assert sorted(vectors_b) == sorted(vectors_a)
    for path, vector in vectors_a.items():
        np.testing.assert_allclose(vectors_b[path], vector, atol=FLOAT_ATOL)
    index = b.open_index()
    assert sorted(index.ids().tolist()) == b.store.embedding_ids().tolist()


def test_partitions_cover_the_files_once_in_order():
    files = [f"/p/{i}" for i in range(103)]
    for actors, most, per_actor in ((1, 10000, 4), (2, 10000, 16), (2, 7, 4), (8, 5, 16), (3, 1000, 1)):
        parts = partitions_of(files, actors, most, per_actor)
        assert [p for part in parts for p in part] == files
        assert len(parts) == min(len(files), max(actors * per_actor, -(-len(files) // most)))
        assert max(map(len, parts)) <= most and max(map(len, parts)) - min(map(len, parts)) <= 1
    assert partitions_of([], 2, 10, 4) == [] and partitions_of(["/a"], 2, 10, 4) == [["/a"]]


def test_ray_options_are_checked_before_anything_starts(tmp_path):
    from click.testing import CliRunner

    from engine.cli import main

    make_image(tmp_path / "photos" / "a.png", seed=1)
    home = tmp_path / "home"
    runner = CliRunner()
    lone = runner.invoke(main, ["--home", str(home), "ingest", str(tmp_path / "photos"), "--shards",
                                str(tmp_path / "s")])
    assert lone.exit_code == 2 and "--ray-address and --shards go with --ray" in lone.output
    remote = runner.invoke(main, ["--home", str(home), "ingest", str(tmp_path / "photos"), "--ray",
                                  "--ray-address", "10.0.0.1:6379"])
    assert remote.exit_code == 1 and "--ray-address needs --shards DIR" in remote.output, remote.output
    assert "Traceback" not in remote.output and not home.exists()


def test_ray_ingest_gives_the_rows_and_vectors_of_plain_ingest(tmp_path, tiny_model, ray_cluster):
    photos = tmp_path / "photos"
    _photos(photos, 24)
    plain = Library(tmp_path / "plain", device="cpu")
    expected = ingest_paths(plain, [photos], IngestConfig(workers=0), model=tiny_model)
    home = tmp_path / "ray"
    library = Library(home, device="cpu")
    seen: list[tuple[int, int | None]] = []
    result = ingest_with_ray(library, [photos], IngestConfig(batch_size=4), RayConfig(), model=tiny_model,
                             progress=lambda d, t: seen.append((d, t)))
    report = result.ingest
    assert (report.added, report.duplicates, len(report.failed)) == (24, 2, 1)
    assert report.failed == expected.failed and report.failed[0][0].endswith("broken.jpg")
    assert result.ray.actors == 2 and result.ray.partitions == min(27, 2 * RayConfig().partitions_per_actor)
    assert result.ray.cluster > 0
    assert seen[-1] == (27, 27)
    assert not (home / "ray-shards").exists()  # the library's own shards folder is cleared after the commit
    _same(plain, library)
    summary = result.to_dict()
    assert summary["ray"]["workers"] >= 1 and set(summary["stages"]) >= {"model", "walk", "plan", "commit", "index"}

    # incremental: nothing changed, so nothing is sent to the cluster
    (photos / "f1" / "broken.jpg").unlink()
    again = ingest_with_ray(library, [photos], IngestConfig(), RayConfig())
    assert (again.ingest.added, again.ingest.unchanged, again.ingest.embedded) == (0, 26, 0)
    assert again.ray.partitions == 0 and again.imported is None


@pytest.mark.slow
def test_changes_between_ray_runs_are_ingested_as_plain_ingest_does(tmp_path, tiny_model, ray_cluster):
    photos = tmp_path / "photos"
    made = _photos(photos, 12)
    plain = Library(tmp_path / "plain", device="cpu")
    library = Library(tmp_path / "ray", device="cpu")
    ingest_paths(plain, [photos], IngestConfig(workers=0), model=tiny_model)
    ingest_with_ray(library, [photos], IngestConfig(), RayConfig(), model=tiny_model)
    make_image(made[3], seed=999, size=(28, 24))  # new content at a known path
    os.rename(made[4], photos / "f0" / "renamed.png")  # a move
    make_image(photos / "f2" / "new.png", seed=998)
    ingest_paths(plain, [photos], IngestConfig(workers=0, prune=True))
    result = ingest_with_ray(library, [photos], IngestConfig(prune=True), RayConfig())
    assert (result.ingest.updated, result.ingest.moved, result.ingest.added) == (1, 1, 1)
    _same(plain, library)


@pytest.mark.slow
def test_a_killed_actor_is_replaced_and_nothing_is_lost_or_doubled(tmp_path, tiny_model, ray_cluster, monkeypatch):
    photos = tmp_path / "photos"
    _photos(photos, 30, seed0=700)
    plain = Library(tmp_path / "plain", device="cpu")
    ingest_paths(plain, [photos], IngestConfig(workers=0), model=tiny_model)
    # every actor process dies (kill -9) right after writing its second shard, before returning it:
    # Ray starts another and retries the partition, which writes the same shard again
    monkeypatch.setenv("ENGINE_FAULT", "ray-shard-written:2")
    library = Library(tmp_path / "ray", device="cpu")
    result = ingest_with_ray(library, [photos], IngestConfig(batch_size=4), RayConfig(partitions_per_actor=3),
                             model=tiny_model)
    assert result.ray.workers > result.ray.actors, result.ray  # actors were replaced
    assert (result.ingest.added, result.ingest.duplicates) == (30, 2)
    _same(plain, library)


def _killed(cmd: list[str], env: dict[str, str], fault: str) -> int:
    env = dict(env)
    env["ENGINE_FAULT"] = fault
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode


@pytest.mark.slow
def test_driver_killed_then_rerun_converges(tmp_path, tiny_model, ray_cluster, engine_command, subprocess_env):
    photos = tmp_path / "photos"
    _photos(photos, 20, seed0=900)
    plain = Library(tmp_path / "plain", device="cpu")
    ingest_paths(plain, [photos], IngestConfig(workers=0), model=tiny_model)
    home, shards = tmp_path / "ray", tmp_path / "shards"
    cmd = [*engine_command, "--home", str(home), "--device", "cpu", "ingest", str(photos), "--model", tiny_model,
           "--ray", "--ray-address", ray_cluster, "--shards", str(shards), "--batch-size", "4", "--json"]
    env = dict(subprocess_env, RAY_USAGE_STATS_ENABLED="0")
    # killed: after the cluster stage (shards and manifest written, nothing committed), then inside
    # the commit step after its second transaction
    assert _killed(cmd, env, "ray-embedded:1") == -signal.SIGKILL
    assert (shards / "manifest.json").exists()
    assert _killed(cmd, env, "batch-committed:2") == -signal.SIGKILL
    partial = Library(home, device="cpu")
    committed = partial.store.count()
    assert 0 < committed < 20
    assert partial.store.embedding_ids().tolist() == partial.store.image_ids().tolist()
    partial.close()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    # the files committed before the kill are not sent to the cluster again (the broken one is tried again)
    assert summary["unchanged"] > 0 and summary["unchanged"] + summary["embedded"] == 22
    library = Library(home, device="cpu")
    _same(plain, library)
    assert (shards / "manifest.json").exists()  # --shards folders are kept
