"""A library on read-only media (issue 9, item 9): a mounted backup or a shared read-only folder is
searched (`query`, `info`, `compare`, `doctor`) without writing anything beside its files, and every
command that would change it refuses with one line.

Tests run as root, for whom permission bits do not apply, so the read-only state is forced: with
``--read-only``, ``$ENGINE_READ_ONLY``, or by making ``os.access`` report the folder unwritable
(what the library checks); the real ``chmod`` check runs only for other users.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import stat
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from engine.cli import main
from engine.errors import ReadOnlyError
from engine.library import Library
from engine.query import search_library
from ingest.pipeline import IngestConfig, ingest_paths
from tests.util import make_image

CFG = IngestConfig(batch_size=4, workers=0)
N = 8


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("readonly")
    paths = [make_image(root / "photos" / f"img_{i}.png", seed=300 + i) for i in range(N)]
    lib = Library(root / "home", device="cpu")
    ingest_paths(lib, [root / "photos"], CFG, model=tiny_model)
    [result] = search_library(lib, [str(paths[2])], k=N)
    lib.close()
    # rounded as the CLI's JSON (6 places) is, then to 5: a score whose 6th place is a 5 would
    # otherwise round one way here and the other way from the JSON
    return root / "home", paths, [(h.path, round(round(h.score, 6), 5)) for h in result.hits]


@pytest.fixture()
def home(pristine, tmp_path):
    src, paths, expected = pristine
    shutil.copytree(src, tmp_path / "home")
    return tmp_path / "home", paths, expected


def _snapshot(home: Path, skip: tuple[str, ...] = ()) -> dict[str, tuple[int, str]]:
    """Every file in the home: name -> (mtime_ns, content hash)."""
    return {p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(home.iterdir()) if p.name not in skip}


def _cli(home: Path, *args, env: dict[str, str] | None = None):
    return CliRunner().invoke(main, ["--home", str(home), "--device", "cpu", *map(str, args)], env=env)


@pytest.fixture(params=["flag", "env", "unwritable-folder"])
def read_only(request, monkeypatch):
    """How the library comes to be read-only: the global option, the environment, or a folder this
    process may not write (os.access, which root would pass, reports it so)."""
    prefix: list[str] = []
    if request.param == "flag":
        prefix = ["--read-only"]
    elif request.param == "env":
        monkeypatch.setenv("ENGINE_READ_ONLY", "1")
    else:
        real = os.access

        def access(path, mode, *args, **kwargs):
            if mode & os.W_OK and Path(path).name in ("home", "library.db"):
                return False
            return real(path, mode, *args, **kwargs)

        monkeypatch.setattr(os, "access", access)
    return prefix


def test_read_only_is_detected_or_asked_for(home, monkeypatch):
    home, _, _ = home
    assert not Library(home).read_only
    assert Library(home, read_only=True).read_only_reason == "opened read-only"
    monkeypatch.setenv("ENGINE_READ_ONLY", "1")
    assert Library(home).read_only and not Library(home, read_only=False).read_only
    monkeypatch.delenv("ENGINE_READ_ONLY")
    monkeypatch.setattr(os, "access", lambda path, mode, *a, **k: not (mode & os.W_OK and Path(path) == home))
    assert Library(home).read_only_reason == "its folder is not writable"
    assert not Library(home.parent / "new-home").read_only  # a home that does not exist yet is created


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; the parameter tests cover it")
def test_chmod_read_only_home_is_searched(home):
    home, paths, expected = home
    for path in [home, *home.iterdir()]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        lib = Library(home, device="cpu")
        assert lib.read_only
        [result] = search_library(lib, [str(paths[2])], k=N)
        assert [(h.path, round(round(h.score, 6), 5)) for h in result.hits] == expected
    finally:
        for path in [home, *home.iterdir()]:
            path.chmod(path.stat().st_mode | stat.S_IWUSR)


def test_read_only_library_is_searched_and_nothing_is_written(home, read_only, tmp_path):
    home, paths, expected = home
    before = _snapshot(home)
    r = _cli(home, *read_only, "query", paths[2], "-k", N, "--json", "--no-server")
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    hits = json.loads(r.stdout)["hits"]
    assert [(h["path"], round(h["score"], 5)) for h in hits] == expected
    new = make_image(tmp_path / "new.png", seed=77)  # not in the library: the encoder embeds it
    r = _cli(home, *read_only, "query", new, "-k", 3, "--no-server")
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    r = _cli(home, *read_only, "info", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["images"] == N, r.output
    r = _cli(home, *read_only, "compare", paths[0], paths[0], "--no-server")
    assert r.exit_code == 0 and r.output.startswith("similar"), r.output
    r = _cli(home, *read_only, "doctor")
    assert r.exit_code == 0 and "ok: database, index and files agree" in r.output, r.output
    assert _snapshot(home) == before  # not a byte, not a -wal, -shm or lock file


def test_read_only_library_without_a_usable_index_is_searched_from_memory(home, read_only):
    """A missing or damaged index is rebuilt in memory for the query; nothing is saved or set aside."""
    home, paths, expected = home
    (home / "index.faiss").write_bytes(b"\0" * 100)
    before = _snapshot(home)
    r = _cli(home, *read_only, "query", paths[2], "-k", N, "--json", "--no-server")
    assert r.exit_code == 0, r.output
    assert [(h["path"], round(h["score"], 5)) for h in json.loads(r.stdout)["hits"]] == expected
    (home / "index.faiss").unlink()
    before.pop("index.faiss")
    r = _cli(home, *read_only, "info", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["vectors"] == N, r.output
    assert _snapshot(home) == before


@pytest.mark.parametrize("command", [("ingest", "{photos}", "--workers", "0"), ("remove", "{photo}"), ("reindex",),
                                     ("reindex", "--index-type", "HNSW32"), ("doctor", "--repair")])
def test_commands_that_change_the_library_refuse(home, read_only, command):
    home, paths, _ = home
    before = _snapshot(home)
    args = [a.format(photos=paths[0].parent, photo=paths[0]) for a in command]
    r = _cli(home, *read_only, *args)
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1
    assert "is read-only" in r.output and "can be searched, but not changed" in r.output
    assert _snapshot(home) == before
    with pytest.raises(ReadOnlyError):
        Library(home, read_only=True).save_index(Library(home, read_only=True).open_index())


def _killed_ingest(home: Path, folder: Path, engine_command, subprocess_env) -> None:
    """An ingest killed after its commits, before any checkpoint: its rows are only in -wal."""
    env = dict(subprocess_env, ENGINE_FAULT="index-replaced")
    proc = subprocess.run([*engine_command, "--home", str(home), "--device", "cpu", "ingest", str(folder),
                           "--workers", "0"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (home / "library.db-wal").stat().st_size > 0 and (home / "library.db-shm").exists()


def test_read_only_open_sees_commits_still_in_the_wal(home, tmp_path, engine_command, subprocess_env):
    """-wal and -shm both there (a writer was killed; the folder then mounted read-only): every
    committed row is seen, and the database and its -wal are not touched."""
    home, _, _ = home
    more = [make_image(tmp_path / "more" / f"new_{i}.png", seed=400 + i) for i in range(3)]
    _killed_ingest(home, tmp_path / "more", engine_command, subprocess_env)
    before = _snapshot(home, skip=("library.db-shm",))  # SQLite may refresh its shared-memory index
    lib = Library(home, device="cpu", read_only=True)
    assert lib.store.count() == N + 3
    [result] = search_library(lib, [str(more[0])], k=3)
    assert result.hits[0].path == str(more[0])
    lib.close()
    assert _snapshot(home, skip=("library.db-shm",)) == before


def test_read_only_open_without_shm_warns_that_wal_commits_are_unseen(home, tmp_path, engine_command,
                                                                      subprocess_env, caplog):
    """A -wal without its -shm cannot be read on read-only media: the database is opened
    immutable (as it was at its last checkpoint), with a warning naming what is not seen."""
    home, paths, expected = home
    make_image(tmp_path / "more" / "new.png", seed=500)
    _killed_ingest(home, tmp_path / "more", engine_command, subprocess_env)
    (home / "library.db-shm").unlink()
    before = _snapshot(home)
    with caplog.at_level(logging.WARNING):
        lib = Library(home, device="cpu", read_only=True)
        assert lib.store.count() == N  # the last checkpoint's state
    assert any("library.db-wal" in rec.getMessage() and "not seen" in rec.getMessage() for rec in caplog.records)
    [result] = search_library(lib, [str(paths[2])], k=N)
    assert [(h.path, round(round(h.score, 6), 5)) for h in result.hits] == expected
    lib.close()
    assert _snapshot(home) == before and not (home / "library.db-shm").exists()
