"""A library whose metadata store is PostgreSQL (``--database-url postgresql+psycopg://...``),
against the same library on SQLite where both apply (``store_url``): the commands of a library's
life, ``kill -9`` during an ingest, the write lock across homes (an advisory lock), and two homes
on one database (ingest through one, query through the other)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from db.vectors import TOLERANCE
from engine.cli import main
from engine.errors import LockError
from engine.library import Library
from tests.util import make_image

N = 8


def _cli(home: Path, url: str, *args):
    return CliRunner().invoke(main, ["--home", str(home), "--device", "cpu", "--database-url", url, *map(str, args)])


def _summary(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def _photos(root: Path, n: int = N, seed: int = 500) -> list[Path]:
    return [make_image(root / f"img_{i:02d}.png", seed + i) for i in range(n)]


@pytest.fixture()
def postgres_url(postgres_server) -> str:
    """A new, empty database on the session's server (PostgreSQL only)."""
    if isinstance(postgres_server, str):
        pytest.skip(postgres_server)
    url = postgres_server.create_database()
    yield url
    postgres_server.drop_database(url)


def _consistent(home: Path, url: str) -> Library:
    """The library agrees with itself: every row has one vector, the index holds exactly them,
    and each vector is its file's embedding (float16 as stored); doctor finds nothing."""
    from engine.embedding import embed_files
    from ingest.doctor import check_library

    lib = Library(home, device="cpu", database_url=url)
    store = lib.store
    ids = store.image_ids()
    np.testing.assert_array_equal(store.embedding_ids(), ids)
    np.testing.assert_array_equal(np.sort(lib.open_index().ids()), ids)
    records = store.get_images(ids.tolist())
    fresh = embed_files(lib.encoder(), [records[i].path for i in ids.tolist()], workers=0)
    np.testing.assert_allclose(store.get_embeddings(ids, lib.model_info().dim)[1], fresh.embeddings, atol=TOLERANCE)
    report = check_library(lib)
    assert report.ok and report.findings == [], report.lines()
    return lib


# -- a library's life, on both stores -----------------------------------------------------------------
def test_ingest_query_remove_prune_and_doctor(store_url, tmp_path, tiny_model):
    photos = tmp_path / "photos"
    paths = _photos(photos / "a")
    shutil.copy2(paths[0], photos / "a" / "z_copy.png")  # byte-identical: an alias
    (photos / "b").mkdir()
    (photos / "b" / "broken.png").write_bytes(b"not an image")
    home = tmp_path / "home"
    done = _summary(_cli(home, store_url, "ingest", photos, "--model", tiny_model, "--workers", "0", "--json"))
    assert (done["added"], done["duplicates"], done["failed"]) == (N, 1, 1)
    again = _summary(_cli(home, store_url, "ingest", photos, "--workers", "0", "--json"))
    assert (again["added"], again["unchanged"]) == (0, N + 1)  # size and mtime read back exactly

    r = _cli(home, store_url, "query", paths[2], "-k", 3, "--json", "--no-server")
    hits = json.loads(r.stdout.splitlines()[0])["hits"]
    assert r.exit_code == 0 and hits[0]["path"] == str(paths[2]) and hits[0]["distance"] < 1e-3
    r = _cli(home, store_url, "query", paths[0], "-k", 2, "--exclude-self", "--under", photos / "a", "--json",
             "--no-server")
    hits = json.loads(r.stdout.splitlines()[0])["hits"]
    assert r.exit_code == 0 and str(paths[0]) not in {h["path"] for h in hits} and len(hits) == 2

    assert _cli(home, store_url, "remove", paths[5]).exit_code == 0
    lib = Library(home, device="cpu", database_url=store_url)
    assert lib.store.count() == N - 1 and str(paths[5]) not in lib.store.lookup_paths([str(paths[5])])
    lib.close()  # (still on disk: the next ingest of its folder indexes it again)
    paths[4].unlink()
    pruned = _summary(_cli(home, store_url, "ingest", photos, "--prune", "--workers", "0", "--json"))
    assert pruned["removed"] == 1
    r = _cli(home, store_url, "doctor")
    assert r.exit_code == 0, r.output
    paths[3].unlink()
    r = _cli(home, store_url, "doctor")
    assert r.exit_code == 1 and "gone from disk" in r.output
    r = _cli(home, store_url, "doctor", "--repair")
    assert r.exit_code == 0, r.output

    lib = _consistent(home, store_url)
    kept = {rec.path for rec in lib.store.get_images(lib.store.image_ids().tolist()).values()}
    assert kept == {str(p) for p in paths[:3] + paths[5:]} and lib.store.count_aliases() == 1
    lib.close()


def test_a_failed_batch_leaves_nothing_behind(store_url):
    """A path already indexed makes the whole batch fail, its rows and vectors with it (PostgreSQL
    writes a batch by COPY; it must stay one transaction)."""
    from sqlalchemy.exc import IntegrityError

    from db.store import MetadataStore

    store = MetadataStore(store_url)
    row = {"path": "/p/1.jpg", "content_hash": "a" * 64, "bytes": 1, "mtime": 1.0}
    ids, _ = store.write_batch([row], np.eye(1, 4, dtype=np.float32))
    with pytest.raises(IntegrityError):
        store.write_batch([dict(row, path="/p/2.jpg"), row], np.eye(2, 4, dtype=np.float32))
    assert store.count() == 1 and store.count_embeddings() == 1 and store.generation() == 1
    new, _ = store.write_batch([dict(row, path="/p/3.jpg"), dict(row, path="/p/4.jpg")], np.eye(2, 4, dtype=np.float32))
    assert new[0] > ids[0] and new[1] > new[0]  # in order, and ids are never reused
    store.close()


def test_import_of_shards_then_rerun(store_url, tmp_path, tiny_model):
    """``engine import`` writes whole batches (COPY on PostgreSQL); a rerun adds nothing."""
    from engine.encoder import load_checkpoint
    from engine.shards import write_manifest, write_shard
    from ingest.importer import ImportConfig, import_shards

    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((10, 96)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    paths = [f"/photos/imported/{i:02d}.jpg" for i in range(10)]
    folder = tmp_path / "shards"
    for s, part in enumerate((slice(0, 6), slice(6, 10))):
        write_shard(folder, f"part-{s:05d}", vectors[part], {"path": paths[part]})
    write_manifest(folder, load_checkpoint(tiny_model).identity(), 96, ["part-00000", "part-00001"])
    library = Library(tmp_path / "home", device="cpu", database_url=store_url)
    report = import_shards(library, folder, ImportConfig(batch_size=4), model=tiny_model)
    assert (report.added, report.failed) == (10, [])
    ids = library.store.image_ids()
    records = library.store.get_images(ids.tolist())
    stored = dict(zip((records[i].path for i in ids.tolist()), library.store.get_embeddings(ids, 96)[1]))
    np.testing.assert_allclose([stored[p] for p in paths], vectors, atol=TOLERANCE)
    assert import_shards(library, folder).added == 0 and library.store.count() == 10
    np.testing.assert_array_equal(np.sort(library.open_index().ids()), library.store.image_ids())
    library.close()


# -- kill -9 during an ingest -------------------------------------------------------------------------
@pytest.mark.parametrize("fault", ["commit:5", "batch-committed:2"])
def test_ingest_killed_mid_run_converges_on_rerun(postgres_url, fault, tmp_path, tiny_model, engine_command,
                                                   subprocess_env):
    """(SQLite: tests/test_crash.py.) Inside a batch's COMMIT, and after a batch was committed."""
    store_url = postgres_url
    photos = tmp_path / "photos"
    _photos(photos, 12)
    home = tmp_path / "home"
    cmd = [*engine_command, "--home", str(home), "--device", "cpu", "--database-url", store_url, "ingest", str(photos),
           "--model", tiny_model, "--workers", "0", "--batch-size", "4"]
    killed = subprocess.run(cmd, env=dict(subprocess_env, ENGINE_FAULT=fault), capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    lib = Library(home, device="cpu", database_url=store_url)
    assert lib.store.count() < 12  # killed before the end
    lib.close()
    rerun = subprocess.run(cmd, env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    lib = _consistent(home, store_url)
    assert lib.store.count() == 12  # each photo exactly once
    lib.close()


# -- the write lock across homes ----------------------------------------------------------------------
def test_writers_on_two_homes_of_one_database_take_turns(postgres_url, tmp_path):
    first = Library(tmp_path / "a", device="cpu", database_url=postgres_url)
    second = Library(tmp_path / "b", device="cpu", database_url=postgres_url)
    order: list[str] = []
    with first.write_lock():
        with pytest.raises(LockError, match="another process is writing"):
            with second.write_lock(wait=False):
                pass
        waiting = threading.Event()

        def writer() -> None:
            with second.write_lock(on_wait=waiting.set):
                order.append("second")

        thread = threading.Thread(target=writer)
        thread.start()
        assert waiting.wait(30)
        time.sleep(0.2)
        order.append("first")
    thread.join(30)
    assert order == ["first", "second"]
    with second.write_lock(wait=False):  # released again
        pass
    first.close()
    second.close()


_HOLD_THE_LOCK = """
import sys, time
from engine.library import Library
lib = Library(sys.argv[1], device="cpu", database_url=sys.argv[2])
with lib.write_lock():
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_writer_killed_holding_the_lock_releases_it(postgres_url, tmp_path, subprocess_env):
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_THE_LOCK, str(tmp_path / "a"), postgres_url],
                              env=dict(subprocess_env, PYTHONPATH=str(Path(__file__).parents[1])),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        other = Library(tmp_path / "b", device="cpu", database_url=postgres_url)
        with pytest.raises(LockError):
            with other.write_lock(wait=False):
                pass
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
        deadline = time.monotonic() + 30
        while True:  # the server notices the closed connection at once; allow it a moment
            try:
                with other.write_lock(wait=False):
                    break
            except LockError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        other.close()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


# -- many query nodes, one library ----------------------------------------------------------------------
def test_ingest_through_one_home_query_through_another(postgres_url, tmp_path, tiny_model, monkeypatch):
    photos = tmp_path / "photos"
    paths = _photos(photos, 6)
    home_a, home_b = tmp_path / "node-a", tmp_path / "node-b"
    assert _cli(home_a, postgres_url, "ingest", photos, "--model", tiny_model, "--workers", "0").exit_code == 0
    # a photo no home has indexed: node B needs the encoder, which only the database can give it
    query = make_image(tmp_path / "elsewhere" / "q.png", 502)  # the bytes of img_02, at a new path
    r = _cli(home_b, postgres_url, "query", query, "-k", 2, "--json", "--no-server")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.splitlines()[0])["hits"][0]["path"] == str(paths[2])
    assert (home_b / "encoder.pt").read_bytes() == (home_a / "encoder.pt").read_bytes()
    assert (home_b / "index.faiss").exists()

    # node A changes the library; node B catches up by generation, without a full rebuild
    more = _photos(photos / "more", 3, seed=700)
    assert _cli(home_a, postgres_url, "ingest", photos, "--workers", "0").exit_code == 0
    assert _cli(home_a, postgres_url, "remove", paths[0]).exit_code == 0
    monkeypatch.setattr(Library, "rebuild_index", lambda *a, **k: pytest.fail("node B rebuilt its whole index"))
    r = _cli(home_b, postgres_url, "query", more[1], "-k", 20, "--json", "--no-server")
    assert r.exit_code == 0, r.output
    hits = json.loads(r.stdout.splitlines()[0])["hits"]
    assert hits[0]["path"] == str(more[1]) and str(paths[0]) not in {h["path"] for h in hits}
    assert len(hits) == 6 - 1 + 3
    monkeypatch.undo()
    node_b = Library(home_b, device="cpu", database_url=postgres_url)
    np.testing.assert_array_equal(np.sort(node_b.open_index().ids()), node_b.store.image_ids())
    node_b.close()
