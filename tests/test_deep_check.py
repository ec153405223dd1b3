"""``engine doctor --deep`` (issue 9, item 14): bytes that changed behind an unchanged size and mtime
are invisible to ingest and plain doctor (they trust size and mtime); ``--deep`` hashes every
indexed file and reports them, ``--deep --repair`` re-embeds them and mends aliases."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from db.vectors import TOLERANCE
from engine.cli import main
from engine.embedding import embed_files
from engine.library import Library
from ingest.deep_check import deep_check
from ingest.doctor import check_library
from ingest.pipeline import IngestConfig, ingest_paths
from tests.util import make_image

CFG = IngestConfig(batch_size=4, workers=0)


def _swap_bytes_keep_stat(path: Path, seed: int) -> None:
    """Rewrite ``path`` with another image of the same byte size (BMP: size follows the
    dimensions) and put its mtime back, as a tool that preserves timestamps would."""
    st = os.stat(path)
    make_image(path, seed, fmt="BMP")
    assert os.stat(path).st_size == st.st_size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _setup(tmp_path: Path, tiny_model: str) -> tuple[Library, Path]:
    photos = tmp_path / "photos"
    for i in range(4):
        make_image(photos / f"img_{i}.bmp", i, fmt="BMP")
    shutil.copy2(photos / "img_1.bmp", photos / "z_copy_of_1.bmp")  # an alias of img_1
    lib = Library(tmp_path / "home", device="cpu")
    ingest_paths(lib, [photos], CFG, model=tiny_model)
    assert lib.store.count_aliases() == 1
    return lib, photos


def _vector_of(lib: Library, path: Path) -> np.ndarray:
    state = lib.store.lookup_paths([str(path)])[str(path)]
    return lib.store.get_embeddings([state.image_id], lib.encoder().dim)[1][0]


def test_changed_bytes_behind_same_size_and_mtime(tmp_path, tiny_model):
    lib, photos = _setup(tmp_path, tiny_model)
    changed, alias = photos / "img_2.bmp", photos / "z_copy_of_1.bmp"
    old_vector = _vector_of(lib, changed)
    _swap_bytes_keep_stat(changed, 77)
    _swap_bytes_keep_stat(alias, 78)
    # the fast path cannot see it
    assert check_library(lib).ok
    again = ingest_paths(lib, [photos], CFG)
    assert (again.unchanged, again.embedded) == (5, 0)
    # --deep does
    report = check_library(lib, deep=True)
    assert not report.ok and report.facts["hashed"] == 5
    [finding] = [f for f in report.findings if f.code == "content-changed"]
    assert finding.count == 2 and set(finding.examples) == {str(changed), str(alias)}
    # --deep --repair re-embeds: the vector is the encoder's for the new bytes
    repaired = check_library(lib, deep=True, repair=True)
    assert repaired.ok, repaired.lines()
    assert any("re-read 2 file(s)" in a and "2 re-embedded" in a for a in repaired.actions), repaired.actions
    fresh = embed_files(lib.encoder(), [str(changed), str(alias)], batch_size=2, workers=0).embeddings
    np.testing.assert_allclose(_vector_of(lib, changed), fresh[0], atol=TOLERANCE)  # stored as float16
    assert np.abs(_vector_of(lib, changed) - old_vector).max() > 1e-3
    state = lib.store.lookup_paths([str(alias)])[str(alias)]
    assert not state.is_alias  # its bytes are no longer img_1's: a row of its own
    np.testing.assert_allclose(_vector_of(lib, alias), fresh[1], atol=TOLERANCE)  # stored as float16
    assert lib.store.count() == 5 and lib.store.count_aliases() == 0
    assert sorted(lib.open_index().ids().tolist()) == sorted(lib.store.image_ids().tolist())
    assert not check_library(lib, deep=True).findings
    assert ingest_paths(lib, [photos], CFG).embedded == 0


def test_alias_that_now_matches_another_photo_is_re_pointed(tmp_path, tiny_model):
    lib, photos = _setup(tmp_path, tiny_model)
    alias = photos / "z_copy_of_1.bmp"
    st = os.stat(alias)
    shutil.copyfile(photos / "img_3.bmp", alias)  # now a copy of img_3, same size, old mtime
    os.utime(alias, ns=(st.st_atime_ns, st.st_mtime_ns))
    report = check_library(lib, deep=True, repair=True)
    assert report.ok, report.lines()
    state = lib.store.lookup_paths([str(alias), str(photos / "img_3.bmp")])
    assert state[str(alias)].is_alias and state[str(alias)].image_id == state[str(photos / "img_3.bmp")].image_id
    assert lib.store.count() == 4


def test_deep_check_streams_in_slices(tmp_path, tiny_model):
    lib, photos = _setup(tmp_path, tiny_model)
    slices = list(lib.store.iter_files(chunk=2))
    assert max(len(s) for s in slices) == 2 and sum(len(s) for s in slices) == 5
    calls = []
    _swap_bytes_keep_stat(photos / "img_0.bmp", 55)
    result = deep_check(lib, chunk=2, progress=calls.append)
    assert result.changed == [str(photos / "img_0.bmp")] and result.hashed == 5 and len(calls) == len(slices)


def test_doctor_deep_cli(tmp_path, tiny_model):
    lib, photos = _setup(tmp_path, tiny_model)
    home = lib.paths.home
    lib.close()
    _swap_bytes_keep_stat(photos / "img_3.bmp", 66)
    run = CliRunner().invoke
    assert run(main, ["--home", str(home), "doctor"]).exit_code == 0
    r = run(main, ["--home", str(home), "doctor", "--deep", "--json"])
    assert r.exit_code == 1, r.output
    codes = [f["code"] for f in json.loads(r.stdout)["findings"]]
    assert codes == ["content-changed"]
    r = run(main, ["--home", str(home), "doctor", "--deep"])
    assert r.exit_code == 1 and "changed behind an unchanged size and mtime" in r.output
    r = run(main, ["--home", str(home), "doctor", "--deep", "--repair"])
    assert r.exit_code == 0, r.output
    assert "re-embedded" in r.output
    assert run(main, ["--home", str(home), "doctor", "--deep"]).exit_code == 0
