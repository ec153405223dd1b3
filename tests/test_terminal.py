"""No surprises at the terminal: progress where there is no terminal, global options where people
type them, one message and nothing left behind for a mistake, ``engine info``'s folders, a
database readable with sqlite3, ``engine eval --library`` and the Makefile's install lines."""

from __future__ import annotations

import io
import json
import os
import shutil
import sqlite3
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from db.store import SCHEMA_VERSION
import engine.console as console
from engine.cli import main
from engine.console import Progress
from engine.library import Library
from tests.util import make_class_tree, make_folder, make_image

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, env=None):
    return CliRunner(env=env).invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model):
    """A library of a 3-class tree (4 images each) in two parent folders, built with the CLI."""
    root = tmp_path_factory.mktemp("term")
    make_class_tree(root / "tree", 3, 4)
    r = _run("--home", root / "home", "--device", "cpu", "ingest", root / "tree", "--model", tiny_model,
             "--workers", 0, "--batch-size", 4)
    assert r.exit_code == 0, r.output
    return root


# -- item 6: progress ----------------------------------------------------------------------------

class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_plain_progress_lines_when_not_a_terminal(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(console.time, "monotonic", clock)
    monkeypatch.delenv("ENGINE_PROGRESS", raising=False)
    out = io.StringIO()
    bar = Progress("ingest", stream=out, every_s=5)
    bar.start("loading the encoder...")
    assert out.getvalue() == "ingest: loading the encoder...\n"  # at once, before any count
    bar(0, 3925)
    assert out.getvalue().splitlines()[-1] == "ingest: 0/3,925 img (0%)"
    clock.now += 1
    bar(100, 3925)
    assert len(out.getvalue().splitlines()) == 2  # not every call: one line every few seconds
    clock.now += 5
    bar(600, 3925)
    last = out.getvalue().splitlines()[-1]
    assert last.startswith("ingest: 600/3,925 img (15%)") and "img/s" in last and "ETA" in last
    bar(3925, 3925)
    assert out.getvalue().splitlines()[-1].startswith("ingest: 3,925/3,925 img (100%)")  # the end is shown
    bar.close()


def test_progress_can_be_forced_or_silenced(monkeypatch):
    out = io.StringIO()
    monkeypatch.setenv("ENGINE_PROGRESS", "1")
    Progress("x", stream=out, enabled=False)(1, 2)
    assert out.getvalue()
    out = io.StringIO()
    monkeypatch.setenv("ENGINE_PROGRESS", "0")
    quiet = Progress("x", stream=out)
    quiet.start("hello")
    quiet(1, 2)
    assert out.getvalue() == ""


def test_cli_ingest_shows_life_without_a_terminal_and_says_nothing_new(tmp_path, tiny_model):
    photos = tmp_path / "photos"
    make_folder(photos, 3)
    r = _run("--home", tmp_path / "home", "ingest", photos, "--model", tiny_model, "--workers", 0)
    assert r.exit_code == 0, r.output
    lines = r.stderr.splitlines()
    assert lines[0] == "ingest: loading the encoder..." and lines[1] == "ingest: 0/3 img (0%)"
    assert "images/s embedded" in r.stdout
    again = _run("--home", tmp_path / "home", "ingest", photos)
    assert again.exit_code == 0 and "nothing new to embed" in again.stdout and "0.0 images/s" not in again.stdout
    assert "unchanged 3" in again.stdout


def test_cli_query_of_a_large_batch_shows_progress(built, tmp_path):
    make_folder(tmp_path / "new", 40, seed0=500)  # more than a batch, none indexed: embedded now
    r = _run("--home", built / "home", "query", tmp_path / "new", "-k", 1, "--paths", "--no-server")
    assert r.exit_code == 0, r.output
    assert "query: 0/40 img (0%)" in r.stderr and "query: 40/40 img (100%)" in r.stderr
    assert len(r.stdout.splitlines()) == 40  # stdout keeps only the paths


def test_eval_progress_knows_its_total_from_the_first_call(tmp_path, tiny_model):
    from engine.evaluate import EvalConfig, evaluate

    make_class_tree(tmp_path / "tree", 2, 3)
    calls = []
    evaluate(tmp_path / "tree", tiny_model, EvalConfig(workers=0, n_pairs=4), progress=lambda d, t: calls.append((d, t)))
    assert calls[:2] == [(0, None), (0, 6)] and calls[-1] == (6, 6)  # said at once, then the total


# -- item 7: global options where people type them; help everywhere ---------------------------------

def test_global_options_after_the_command_name(built, monkeypatch, tmp_path):
    home = built / "home"
    img = built / "tree" / "class_1" / "02.png"
    before = _run("--home", home, "query", img, "-k", 2, "--json")
    after = _run("query", "--home", home, img, "-k", 2, "--json", "--device", "cpu")
    assert before.exit_code == after.exit_code == 0, after.output
    assert json.loads(before.stdout) == json.loads(after.stdout)
    # given after the name, it wins over $ENGINE_HOME and over the option before the name
    elsewhere = tmp_path / "elsewhere"
    r = _run("query", img, "--home", home, "-k", 1, "--json", env={"ENGINE_HOME": str(elsewhere)})
    assert r.exit_code == 0 and json.loads(r.stdout)["hits"][0]["path"] == str(img)
    r = _run("--home", elsewhere, "info", "--home", home, "--json")
    assert json.loads(r.stdout)["images"] == 12 and not elsewhere.exists()


def test_every_option_has_help_and_json_reads_the_same_everywhere():
    missing, json_help = [], set()
    for name, command in main.commands.items():
        for param in command.params:
            if isinstance(param, click.Option):
                if not (param.help or "").strip():
                    missing.append(f"{name} {param.opts[0]}")
                if "--json" in param.opts:
                    json_help.add(param.help)
    assert not missing, missing
    assert len(json_help) == 1, json_help
    for option in main.params:
        assert not isinstance(option, click.Option) or option.help


# -- item 8: a mistake gets a message and leaves nothing behind ---------------------------------------

def test_ingest_of_a_path_that_does_not_exist_creates_no_library(tmp_path, tiny_model):
    r = _run("--home", tmp_path / "home", "ingest", tmp_path / "nowhere", "--model", tiny_model)
    assert r.exit_code == 1 and "nowhere" in r.output and "no such file" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "home").exists()


def test_ingest_of_a_folder_without_images_says_what_it_looked_for(tmp_path, tiny_model):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("hello")
    (tmp_path / "docs" / ".hidden.jpg").write_bytes(b"x")
    r = _run("--home", tmp_path / "home", "ingest", tmp_path / "docs", "--model", tiny_model)
    assert r.exit_code == 1 and "no images found under" in r.output
    assert "looked for: bmp, gif, jpeg, jpg, png" in r.output and not (tmp_path / "home").exists()


def test_remove_of_a_path_that_is_not_indexed_says_so_and_removes_nothing(tmp_path, tiny_model):
    photos = tmp_path / "photos"
    make_folder(photos, 3)
    _run("--home", tmp_path / "home", "ingest", photos, "--model", tiny_model, "--workers", 0)
    r = _run("--home", tmp_path / "home", "remove", photos / "img_000.png", photos / "typo.png")
    assert r.exit_code == 1 and "not indexed" in r.output and "typo.png" in r.output
    r = _run("--home", tmp_path / "home", "info", "--json")
    assert json.loads(r.stdout)["images"] == 3  # the right path of the two was not removed either
    r = _run("--home", tmp_path / "home", "remove", photos / "img_000.png")
    assert r.exit_code == 0 and "removed 1" in r.output


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_says_so(tmp_path, tiny_model, built):
    photos = tmp_path / "photos"
    make_folder(photos, 2)
    r = _run("--home", tmp_path / "home", "--device", "cuda", "ingest", photos, "--model", tiny_model)
    assert r.exit_code == 1 and "no CUDA device" in r.output and "repair" not in r.output
    assert not (tmp_path / "home").exists()
    fresh = make_image(tmp_path / "fresh.png", 4242)
    r = _run("--home", built / "home", "query", fresh, "--device", "cuda", "--no-server")
    assert r.exit_code == 1 and "no CUDA device" in r.output and "repair" not in r.output


# -- item 9: folders in engine info; a database readable with sqlite3 --------------------------------

def test_info_lists_the_indexed_folders_with_counts(built):
    r = _run("--home", built / "home", "info", "--json")
    folders = {f["folder"]: f["files"] for f in json.loads(r.stdout)["folders"]}
    assert folders == {str(built / "tree" / f"class_{c}"): 4 for c in range(3)}
    r = _run("--home", built / "home", "info")
    assert "folders: 3" in r.stdout and f"4  {built / 'tree' / 'class_2'}" in r.stdout


def test_paths_are_text_in_sqlite_where_valid_utf8_and_exact_bytes_otherwise(tmp_path, tiny_model):
    photos = tmp_path / "photos"
    make_folder(photos, 2)
    odd = os.fsencode(photos) + b"/caf\xe9.png"  # Latin-1, not UTF-8
    make_image(Path(os.fsdecode(odd)), 99)
    r = _run("--home", tmp_path / "home", "ingest", photos, "--model", tiny_model, "--workers", 0)
    assert r.exit_code == 0, r.output
    with sqlite3.connect(tmp_path / "home" / "library.db") as db:
        rows = dict(db.execute("SELECT path, typeof(path) FROM images").fetchall())
    assert rows[str(photos / "img_000.png")] == "text" and rows[odd] == "blob"
    again = _run("--home", tmp_path / "home", "ingest", photos, "--json")
    assert json.loads(again.stdout)["unchanged"] == 3  # every path, text or bytes, is found again


def test_an_older_library_with_byte_paths_is_upgraded_when_opened(tmp_path, tiny_model):
    photos = tmp_path / "photos"
    make_folder(photos, 3)
    _run("--home", tmp_path / "home", "ingest", photos, "--model", tiny_model, "--workers", 0)
    db_file = tmp_path / "home" / "library.db"
    with sqlite3.connect(db_file) as db:  # as schema 1 wrote it: every path a BLOB
        db.execute("UPDATE images SET path = CAST(path AS BLOB)")
        db.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
        assert {t for (t,) in db.execute("SELECT typeof(path) FROM images")} == {"blob"}
    again = _run("--home", tmp_path / "home", "ingest", photos, "--json")
    assert again.exit_code == 0 and json.loads(again.stdout)["unchanged"] == 3
    with sqlite3.connect(db_file) as db:
        assert {t for (t,) in db.execute("SELECT typeof(path) FROM images")} == {"text"}
        assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == str(SCHEMA_VERSION)


# -- item 4: engine eval --library ---------------------------------------------------------------------

def test_eval_library_equals_eval_of_the_same_tree_without_decoding(built, tiny_model, monkeypatch, tmp_path):
    tree = _run("eval", built / "tree", "--model", tiny_model, "--json", "--pairs", 20, "--workers", 0)
    assert tree.exit_code == 0, tree.output
    import engine.embedding

    def no_decode(*args, **kwargs):
        raise AssertionError("eval --library decoded an image")

    monkeypatch.setattr(engine.embedding, "embed_files", no_decode)
    lib = _run("--home", built / "home", "eval", "--library", "--json", "--pairs", 20, "--out", tmp_path / "rep")
    assert lib.exit_code == 0, lib.output
    a, b = json.loads(tree.stdout)["metrics"], json.loads(lib.stdout)["metrics"]
    for key in ("recall@1", "recall@5", "precision@5", "map@r", "map", "roc_auc"):
        assert b[key] == pytest.approx(a[key], abs=1e-5), key
    assert (tmp_path / "rep" / "report.md").exists()
    text = _run("--home", built / "home", "eval", "--library", "--pairs", 20)
    assert text.exit_code == 0 and "12 images, 3 classes" in text.stdout


def test_eval_library_mistakes(built, tmp_path, tiny_model):
    assert _run("eval").exit_code == 2
    r = _run("--home", built / "home", "eval", built / "tree", "--library")
    assert r.exit_code == 2 and "not both" in r.output
    r = _run("--home", built / "home", "eval", "--library", "--model", tiny_model)
    assert r.exit_code == 2 and "own encoder" in r.output
    r = _run("--home", tmp_path / "empty", "eval", "--library")
    assert r.exit_code == 1 and "engine ingest" in r.output and not (tmp_path / "empty").exists()


# -- item 10: make demo shows what it installs ---------------------------------------------------------

def test_makefile_install_lines_are_not_silent():
    text = (ROOT / "Makefile").read_text()
    installs = [line for line in text.splitlines() if "pip install" in line]
    assert installs and not any(" -q" in line for line in installs)
    assert "source $(BIN)/activate" in text and "cpu-torch" in text


def test_cli_help_is_instant_and_shows_the_new_commands():
    r = _run("--help")
    assert r.exit_code == 0 and "duplicates" in r.output
    assert shutil.which("sh")  # (the layering test checks that --help imports no torch)
