"""Fixtures shared by the test modules. Builders of images and checkpoints live in ``tests/util.py``."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

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
