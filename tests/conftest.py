"""Fixtures shared by the test modules. Builders of images and checkpoints live in ``tests/util.py``."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Iterator

import pytest

from tests.util import tiny_checkpoint


@pytest.fixture(scope="session", autouse=True)
def private_config_home(tmp_path_factory) -> Path:
    """Keys the engine keeps per user (``engine.scripted.signing_key_path``) go to a temporary
    folder, never the real ``~/.config``; subprocesses inherit it."""
    folder = tmp_path_factory.mktemp("config")
    previous = os.environ.get("XDG_CONFIG_HOME")
    os.environ["XDG_CONFIG_HOME"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("XDG_CONFIG_HOME", None)
    else:
        os.environ["XDG_CONFIG_HOME"] = previous


@pytest.fixture(scope="session", autouse=True)
def plain_ranking() -> Iterator[None]:
    """Queries rank by the encoder's own distances (``$ENGINE_EXPAND=0``, no query expansion), since
    most tests check hits against a brute-force nearest-neighbour reference; tests/test_expansion.py
    lifts it to test the default expansion. Subprocesses inherit it."""
    previous = os.environ.get("ENGINE_EXPAND")
    os.environ["ENGINE_EXPAND"] = "0"
    yield
    if previous is None:
        os.environ.pop("ENGINE_EXPAND", None)
    else:
        os.environ["ENGINE_EXPAND"] = previous


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A random-init ``test_resnet`` encoder (32 px input, 96-d) saved once per session: the path."""
    return str(tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny.pt"))


@pytest.fixture(scope="session")
def engine_command() -> list[str]:
    """The argv prefix that runs the real ``engine`` CLI in a subprocess (console script if installed
    beside this Python, else the same entry point through ``-c``)."""
    script = Path(sys.executable).with_name("engine")
    if script.exists():
        return [str(script)]
    found = shutil.which("engine")
    if found:
        return [found]
    return [sys.executable, "-c", "from engine.cli import main; main()"]


@pytest.fixture()
def subprocess_env() -> dict[str, str]:
    """Environment for CLI subprocesses: offline, one thread each (two cores are shared by several
    processes in these tests), and no fault injection or library location inherited."""
    inherited = ("ENGINE_FAULT", "ENGINE_HOME", "ENGINE_DATABASE_URL")
    env = {k: v for k, v in os.environ.items() if not k.startswith(inherited)}
    env.update(ENGINE_OFFLINE="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


@pytest.fixture(scope="session")
def postgres_server():
    """One throw-away PostgreSQL server for the session (``tests/postgres.py``), or the reason none
    could be started (a string); stopped at the end."""
    from tests.postgres import start_server

    server = start_server()
    yield server
    if not isinstance(server, str):
        server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path) -> str:
    """The URL of a new, empty library database: a SQLite file, then a database of its own on the
    session's PostgreSQL server (skipped, with the reason, where no server can be started)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'library.db'}"
        return
    server = request.getfixturevalue("postgres_server")
    if isinstance(server, str):
        pytest.skip(server)
    url = server.create_database()
    yield url
    server.drop_database(url)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a module of tiny models and tensors: faster than two there (and far
    faster on a busy machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def one_faiss_thread():
    """FAISS on one thread (modules that build indexes use it): its OpenMP threads spin-wait, and on two cores shared with other test
    processes two of them make training several times slower, not faster."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)
