"""User mistakes and a hostile machine (issue 9, item 13): each is a one-line message and a non-zero
exit, never ``internal error`` or a traceback, and leaves nothing half-written behind."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from engine.cli import main
from engine.errors import EngineError
from engine.library import Library
from tests.util import make_folder, make_image


def _cli(home: Path | str | None, *args: str, env: dict[str, str] | None = None):
    prefix = ["--home", str(home)] if home is not None else []
    return CliRunner().invoke(main, [*prefix, "--device", "cpu", *args], env=env)


def _one_line_error(result, *, code: int = 1) -> str:
    assert result.exit_code == code, result.output
    assert "internal error" not in result.output and "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def _leftovers(home: Path) -> list[str]:
    return sorted(p.name for p in home.rglob("*") if p.name.endswith(".tmp"))


@pytest.fixture()
def photos(tmp_path) -> Path:
    make_folder(tmp_path / "photos", 6)
    return tmp_path / "photos"


# -- the database URL ---------------------------------------------------------------------------

@pytest.mark.parametrize("url, phrase", [
    ("garbage", "is not a database URL"),
    ("foo://host/db", "unknown kind of database 'foo'"),
    ("postgresql+nosuchdriver://u@h/db", "unknown kind of database"),
    ("postgresql://user:secret@localhost/db", "postgresql://user:***@localhost/db"),
])
def test_bad_database_url_is_one_line(tmp_path, photos, tiny_model, url, phrase):
    home = tmp_path / "home"
    for args in (["info"], ["ingest", str(photos), "--model", tiny_model], ["doctor"]):
        line = _one_line_error(_cli(home, "--database-url", url, *args))
        assert phrase in line and "secret" not in line, line
    line = _one_line_error(_cli(home, "info", env={"ENGINE_DATABASE_URL": url}))
    assert phrase in line
    assert not home.exists()  # a URL that cannot be used creates no library folder


# -- disk full ----------------------------------------------------------------------------------

def _enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_saving_the_encoder_on_first_ingest(tmp_path, photos, tiny_model, monkeypatch):
    import torch

    def full_after_a_bit(obj, f, *args, **kwargs):
        f.write(b"partial checkpoint")
        _enospc()

    monkeypatch.setattr(torch, "save", full_after_a_bit)
    home = tmp_path / "home"
    line = _one_line_error(_cli(home, "ingest", str(photos), "--model", tiny_model, "--workers", "0"))
    assert "No space left on device" in line and "free some space" in line
    assert _leftovers(home) == [] and not (home / "encoder.pt").exists()
    monkeypatch.undo()
    r = _cli(home, "ingest", str(photos), "--model", tiny_model, "--workers", "0")  # space again: it works
    assert r.exit_code == 0, r.output


def test_disk_full_saving_the_index(tmp_path, photos, tiny_model, monkeypatch):
    import faiss

    real = faiss.write_index

    def full_after_a_bit(index, target):
        real(index, target)  # the bytes are written, then the disk fills up
        _enospc()

    home = tmp_path / "home"
    assert _cli(home, "ingest", str(photos / "img_000.png"), "--model", tiny_model, "--workers", "0").exit_code == 0
    monkeypatch.setattr(faiss, "write_index", full_after_a_bit)
    line = _one_line_error(_cli(home, "ingest", str(photos), "--workers", "0"))
    assert "No space left on device" in line
    assert _leftovers(home) == []
    monkeypatch.undo()
    r = _cli(home, "query", str(photos / "img_003.png"), "-k", "1", "--json", "--no-server")
    assert r.exit_code == 0 and '"rank": 1' in r.stdout  # committed rows are kept and found


def test_disk_full_writing_the_failures_report(tmp_path, photos, tiny_model, monkeypatch):
    home = tmp_path / "home"
    real = Path.write_bytes

    def full_for_the_report(self, data):
        if self.name.startswith(".ingest-failures"):
            real(self, data[:3])
            _enospc()
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full_for_the_report)
    line = _one_line_error(_cli(home, "ingest", str(photos), "--model", tiny_model, "--workers", "0"))
    assert "No space left on device" in line
    assert _leftovers(home) == []


def test_disk_full_in_the_database(tmp_path, photos, tiny_model, monkeypatch):
    """SQLite's "database or disk is full", made real with a page limit on the file."""
    import db.store as store

    home = tmp_path / "home"
    assert _cli(home, "ingest", str(photos / "img_000.png"), "--model", tiny_model, "--workers", "0").exit_code == 0
    real = store._sqlite_pragmas

    def capped(dbapi_conn, record):
        real(dbapi_conn, record)
        pages = dbapi_conn.execute("PRAGMA page_count").fetchone()[0]
        dbapi_conn.execute(f"PRAGMA max_page_count={pages}")

    more = tmp_path / "more"
    for i in range(40):
        make_image(more / f"m{i:02d}.png", 500 + i)
    monkeypatch.setattr(store, "_sqlite_pragmas", capped)
    line = _one_line_error(_cli(home, "ingest", str(more), "--workers", "0", "--batch-size", "4"))
    assert "no space left to write the database" in line, line
    monkeypatch.undo()
    assert Library(home, device="cpu").store.count() >= 1  # what was committed stays


# -- a closed pipe ------------------------------------------------------------------------------

def test_closed_stdout_pipe_exits_quietly(tmp_path, photos, tiny_model, engine_command, subprocess_env):
    """`engine info | head -1`: the reader is gone before engine writes."""
    home = tmp_path / "home"
    assert _cli(home, "ingest", str(photos), "--model", tiny_model, "--workers", "0").exit_code == 0
    for args in (["info"], ["query", str(photos), "-k", "3", "--no-server"], ["info", "--json"]):
        read_end, write_end = os.pipe()
        os.close(read_end)
        try:
            run = subprocess.run([*engine_command, "--home", str(home), *args], stdout=write_end,
                                 stderr=subprocess.PIPE, env=subprocess_env, timeout=120)
        finally:
            os.close(write_end)
        assert run.stderr == b"", run.stderr
        assert run.returncode == 141  # as if SIGPIPE had ended it, like other Unix tools


# -- thresholds ---------------------------------------------------------------------------------

@pytest.mark.parametrize("value, phrase", [("nan", "finite"), ("inf", "finite"), ("-inf", "finite"),
                                           ("-1", "never negative"), ("-0.5", "never negative"),
                                           ("abc", "must be a number")])
def test_threshold_must_be_a_distance_everywhere(tmp_path, photos, value, phrase):
    a, b = str(photos / "img_000.png"), str(photos / "img_001.png")
    for args in (["query", a, "--threshold", value, "--no-server"], ["compare", a, b, "--threshold", value],
                 ["eval", str(photos), "--threshold", value], ["query", a, f"--threshold={value}"]):
        r = _cli(tmp_path / "home", *args)
        assert r.exit_code == 2 and "Invalid value for '--threshold'" in r.stderr and phrase in r.stderr, \
            (args, r.output)
        assert "No such option" not in r.stderr


def test_library_functions_refuse_non_finite_thresholds(tmp_path, photos, tiny_model):
    from engine.encoder import load_checkpoint
    from engine.query import compare_images, search_library

    home = tmp_path / "home"
    assert _cli(home, "ingest", str(photos), "--model", tiny_model, "--workers", "0").exit_code == 0
    lib = Library(home, device="cpu")
    for bad in (float("nan"), float("inf"), -1.0, "x"):
        with pytest.raises(EngineError, match="threshold"):
            search_library(lib, [photos / "img_000.png"], k=1, threshold=bad)
        with pytest.raises(EngineError, match="threshold"):
            compare_images(load_checkpoint(tiny_model, "cpu"), str(photos / "img_000.png"),
                           str(photos / "img_001.png"), threshold=bad)


@pytest.mark.parametrize("option, value", [("--lr", "nan"), ("--margin", "inf"), ("--val-classes", "nan"),
                                           ("--weight-decay", "-1")])
def test_other_numbers_are_finite_too(tmp_path, photos, option, value):
    r = _cli(tmp_path / "home", "train", str(photos), "--out", str(tmp_path / "run"), option, value)
    assert r.exit_code == 2 and f"Invalid value for '{option}'" in r.stderr
    r = _cli(tmp_path / "home", "serve", "--max-upload-mb", "nan")
    assert r.exit_code == 2 and "finite" in r.stderr


# -- the home folder ----------------------------------------------------------------------------

def test_tilde_in_the_home_means_the_home_folder(tmp_path, photos, tiny_model, monkeypatch):
    user_home = tmp_path / "user"
    user_home.mkdir()
    workdir = tmp_path / "work"
    workdir.mkdir()
    monkeypatch.setenv("HOME", str(user_home))
    monkeypatch.chdir(workdir)
    r = _cli(None, "ingest", str(photos), "--model", tiny_model, "--workers", "0", env={"ENGINE_HOME": "~/lib"})
    assert r.exit_code == 0, r.output
    assert (user_home / "lib" / "library.db").exists()
    r = _cli("~/lib2", "ingest", str(photos), "--model", tiny_model, "--workers", "0")  # --home '~/lib2' quoted
    assert r.exit_code == 0, r.output
    assert (user_home / "lib2" / "library.db").exists()
    assert not (workdir / "~").exists()
    assert Library("~/lib").paths.home == user_home / "lib"


@pytest.mark.parametrize("model", ["missing", "garbage"])
def test_failed_first_ingest_creates_no_home(tmp_path, photos, model):
    home = tmp_path / "home"
    spec = tmp_path / "model.pt"
    if model == "garbage":
        spec.write_bytes(b"this is not a checkpoint")
    line = _one_line_error(_cli(home, "ingest", str(photos), "--model", str(spec)))
    assert "model" in line.lower() or "checkpoint" in line.lower()
    assert not home.exists()


@pytest.mark.parametrize("args", [["remove", "PHOTOS"], ["reindex"], ["query", "PHOTOS", "--no-server"]])
def test_commands_on_a_missing_library_create_nothing(tmp_path, photos, args):
    home = tmp_path / "home"
    _one_line_error(_cli(home, *[str(photos) if a == "PHOTOS" else a for a in args]))
    assert not home.exists()


def test_doctor_on_an_empty_library_says_it_is_empty(tmp_path):
    home = tmp_path / "home"
    Library(home, device="cpu").store  # a database and nothing in it (an older engine's failed first ingest)
    r = _cli(home, "doctor")
    assert r.exit_code == 0, r.output
    assert "unreadable" not in r.output and "empty" in r.output
    r = _cli(home, "doctor", "--repair")
    assert r.exit_code == 0 and "unreadable" not in r.output
