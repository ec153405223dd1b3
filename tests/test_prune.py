"""``engine ingest ROOT --prune`` never forgets what it merely could not see (issue 9, item 2): a
root that is missing, unmounted, unreadable or holds no image, a root whose indexed files are all
missing at once (the rule ``doctor --repair`` applies too), and a subfolder that could not be
listed keep their rows; the summary says so and the command exits non-zero."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

import ingest.doctor
import ingest.prune
from engine.cli import main
from engine.library import Library
from ingest.doctor import check_library
from ingest.pipeline import IngestConfig, ingest_paths
from ingest.presence import looks_unmounted, split_missing
from tests.util import make_image

PRUNE = IngestConfig(batch_size=4, workers=0, prune=True)


def _library(tmp_path: Path, tiny_model: str, n: int = 4) -> tuple[Library, Path]:
    photos = tmp_path / "photos"
    for i in range(n):
        make_image(photos / "sub" / f"img_{i}.png", i)
        make_image(photos / f"top_{i}.png", 100 + i)
    lib = Library(tmp_path / "home", device="cpu")
    ingest_paths(lib, [photos], IngestConfig(batch_size=4, workers=0), model=tiny_model)
    return lib, photos


def _cli(home: Path, *args) -> "object":
    return CliRunner().invoke(main, ["--home", str(home), *map(str, args)])


def test_missing_or_empty_root_keeps_every_row_and_exits_non_zero(tmp_path, tiny_model):
    lib, photos = _library(tmp_path, tiny_model)
    rows = lib.store.count()
    moved_away = tmp_path / "elsewhere"
    os.rename(photos, moved_away)  # unmounted / renamed: the root is missing
    r = _cli(lib.paths.home, "ingest", photos, "--prune", "--workers", 0, "--json")
    assert r.exit_code == 1, r.output
    summary = json.loads(r.stdout)
    assert summary["removed"] == 0 and summary["unwalked"] == [str(photos)]
    assert summary["prune_kept"] == [{"path": str(photos), "reason": summary["prune_kept"][0]["reason"], "kept": rows}]
    assert "could not be walked" in summary["prune_kept"][0]["reason"]
    assert Library(lib.paths.home).store.count() == rows
    photos.mkdir()  # an empty mount point
    r = _cli(lib.paths.home, "ingest", photos, "--prune", "--workers", 0)
    assert r.exit_code == 1 and "not pruned under" in r.output and "holds no image file" in r.output
    assert "removed 0" in r.output and "Traceback" not in r.output
    assert Library(lib.paths.home).store.count() == rows
    photos.rmdir()
    photos.symlink_to(tmp_path / "no_such_drive")  # a broken link
    r = _cli(lib.paths.home, "ingest", photos, "--prune", "--workers", 0)
    assert r.exit_code == 1 and "not pruned under" in r.output
    assert Library(lib.paths.home).store.count() == rows
    photos.unlink()
    os.rename(moved_away, photos)  # mounted again: nothing was lost
    r = _cli(lib.paths.home, "ingest", photos, "--prune", "--workers", 0, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["unchanged"] == rows


def test_all_indexed_files_missing_is_refused_like_doctor(tmp_path, tiny_model):
    """Every file indexed under the root gone at once, though the walk finds an image file there
    (one that cannot be decoded): the unmounted-drive rule, from the one helper ``doctor
    --repair`` uses too."""
    lib, photos = _library(tmp_path, tiny_model, n=2)
    rows = lib.store.count()
    shutil.rmtree(photos)
    photos.mkdir()
    (photos / "stray.png").write_bytes(b"not an image")
    report = ingest_paths(lib, [photos], PRUNE)
    assert (report.added, report.removed, len(report.failed)) == (0, 0, 1)
    assert [(p, n) for p, _, n in report.prune_kept] == [(str(photos), rows)]
    assert "unmounted drive" in report.prune_kept[0][1]
    assert lib.store.count() == rows
    doctor = check_library(lib, repair=True)  # the same rule: the rows stay
    assert any("unmounted drive" in a for a in doctor.actions) and lib.store.count() == rows


def test_a_second_drive_unmounted_keeps_its_rows_in_prune_and_doctor(tmp_path, tiny_model):
    """Two folders indexed, one on a drive that is now unmounted (its mount point left empty):
    neither ``ingest --prune`` of the parent nor ``doctor --repair`` forgets its rows, while a
    file really deleted beside files that remain is forgotten by both."""
    lib, photos = _library(tmp_path, tiny_model)
    drive = photos / "drive"
    for i in range(3):
        make_image(drive / "2019" / f"d_{i}.png", 300 + i)
    ingest_paths(lib, [photos], IngestConfig(batch_size=4, workers=0))
    rows = lib.store.count()
    shutil.rmtree(drive / "2019")  # unmounted: the mount point is an empty folder
    (photos / "sub" / "img_0.png").unlink()  # a real deletion
    report = ingest_paths(lib, [photos], PRUNE)
    assert report.removed == 1 and [(p, n) for p, _, n in report.prune_kept] == [(str(drive), 3)]
    assert lib.store.count() == rows - 1
    (photos / "sub" / "img_1.png").unlink()
    doctor = check_library(lib, repair=True)
    assert any("dropped 1 file" in a for a in doctor.actions), doctor.actions
    assert any("kept 3 missing files" in a and str(drive) in a for a in doctor.actions), doctor.actions
    assert lib.store.count() == rows - 2
    r = _cli(lib.paths.home, "ingest", photos, "--prune", "--workers", 0)
    assert r.exit_code == 1 and f"not pruned under {drive}" in r.output


def test_deleting_the_only_photo_of_a_folder_or_all_beside_a_sidecar_is_pruned(tmp_path, tiny_model):
    """A folder that still exists and is not empty was changed on purpose: its missing photos are
    pruned even when every indexed file in it is gone (found by the seeded convergence test)."""
    lib, photos = _library(tmp_path, tiny_model)
    make_image(photos / "single" / "only.png", 500)
    make_image(photos / "pair" / "a.png", 501)
    make_image(photos / "pair" / "b.png", 502)
    ingest_paths(lib, [photos], IngestConfig(batch_size=4, workers=0))
    rows = lib.store.count()
    (photos / "single" / "only.png").unlink()  # the folder is left empty, but held one photo only
    for name in ("a.png", "b.png"):
        (photos / "pair" / name).unlink()
    (photos / "pair" / "notes.xmp").write_text("sidecar")
    report = ingest_paths(lib, [photos], PRUNE)
    assert report.removed == 3 and report.prune_kept == [], report.prune_kept
    assert lib.store.count() == rows - 3


def test_split_missing_is_the_shared_rule(tmp_path):
    (tmp_path / "kept").mkdir()
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "here.png").write_bytes(b"x")
    indexed = [str(tmp_path / "kept" / "a.png"), str(tmp_path / "kept" / "deep" / "b.png"),
               str(tmp_path / "real" / "here.png"), str(tmp_path / "real" / "gone.png"),
               str(tmp_path / "real" / "folder" / "gone.png"), str(tmp_path / "other" / "c.png")]
    missing = [p for p in indexed if not p.endswith("here.png")]
    forget, kept = split_missing(missing, indexed)
    # "kept": every file under it missing; "real" still holds a file; tmp_path holds "real/here.png"
    assert sorted(forget) == sorted([indexed[3], indexed[4], indexed[5]])
    assert kept == {str(tmp_path / "kept"): 2}
    assert ingest.prune.split_missing is ingest.doctor.split_missing is split_missing
    assert looks_unmounted(3, 3) and not looks_unmounted(3, 2) and not looks_unmounted(0, 0)


def _deny(monkeypatch, folder: Path) -> None:
    """Make ``folder`` behave as one without read and search permission (listing and stat of
    anything inside fail with EACCES), also when the tests run as root."""
    denied = str(folder)
    real_scandir, real_stat = os.scandir, os.stat

    def scandir(path="."):
        if os.fspath(path) == denied:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    def stat(path, *args, **kwargs):
        text = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else ""
        if text.startswith(denied + os.sep):
            raise PermissionError(13, "Permission denied", text)
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(os, "stat", stat)


def test_unreadable_subfolder_keeps_its_rows_and_the_rest_is_pruned(tmp_path, tiny_model, monkeypatch):
    lib, photos = _library(tmp_path, tiny_model)
    rows = lib.store.count()
    (photos / "top_0.png").unlink()  # really gone
    _deny(monkeypatch, photos / "sub")
    report = ingest_paths(lib, [photos], PRUNE)
    assert report.removed == 1
    assert [(p, n) for p, _, n in report.prune_kept] == [(str(photos / "sub"), 4)]
    assert any(p == str(photos / "sub") and "cannot list folder" in why for p, why in report.failed)
    assert lib.store.count() == rows - 1
    assert sorted(lib.open_index().ids().tolist()) == sorted(lib.store.image_ids().tolist())


def test_unreadable_root_keeps_every_row(tmp_path, tiny_model, monkeypatch):
    lib, photos = _library(tmp_path, tiny_model)
    rows = lib.store.count()
    _deny(monkeypatch, photos)
    report = ingest_paths(lib, [photos], PRUNE)
    assert report.removed == 0 and report.unwalked == [str(photos)]
    assert [(p, n) for p, _, n in report.prune_kept] == [(str(photos), rows)]
    assert lib.store.count() == rows


@pytest.mark.skipif(os.geteuid() == 0, reason="permissions do not bind root")
def test_really_unreadable_subfolder(tmp_path, tiny_model):
    lib, photos = _library(tmp_path, tiny_model)
    rows = lib.store.count()
    (photos / "sub").chmod(0)
    try:
        report = ingest_paths(lib, [photos], PRUNE)
    finally:
        (photos / "sub").chmod(0o755)
    assert report.removed == 0 and lib.store.count() == rows


def test_prune_still_forgets_what_is_gone(tmp_path, tiny_model):
    lib, photos = _library(tmp_path, tiny_model)
    rows = lib.store.count()
    (photos / "sub" / "img_1.png").unlink()
    (photos / "top_2.png").unlink()
    r = _cli(lib.paths.home, "ingest", photos, "--prune", "--workers", 0, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["removed"] == 2 and json.loads(r.stdout)["prune_kept"] == []
    assert Library(lib.paths.home).store.count() == rows - 2
