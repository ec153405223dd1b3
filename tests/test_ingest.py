import os
import shutil

import numpy as np
import pytest

from engine.errors import EngineError, IndexMissingError, ModelMismatchError
from engine.library import Library
from engine.query import search_library
from ingest.pipeline import IngestConfig, ingest_paths, remove_paths
from ingest.reindex import reindex_library
from tests.util import make_folder, make_image, tiny_checkpoint

CFG = IngestConfig(batch_size=4, workers=0)


@pytest.fixture()
def setup(tmp_path):
    ck = tiny_checkpoint(tmp_path / "tiny.pt")
    photos = tmp_path / "photos"
    make_folder(photos, 6)
    return Library(tmp_path / "home", device="cpu"), photos, ck


def _index_matches_store(lib):
    index = lib.open_index()
    assert sorted(index.ids().tolist()) == sorted(lib.store.embedding_ids().tolist())
    assert sorted(lib.store.embedding_ids().tolist()) == sorted(lib.store.image_ids().tolist())


def test_ingest_then_reingest_is_a_no_op(setup):
    lib, photos, ck = setup
    first = ingest_paths(lib, [photos], CFG, model=str(ck))
    assert (first.added, first.embedded, first.failed) == (6, 6, [])
    again = ingest_paths(lib, [photos], CFG)
    assert (again.added, again.unchanged, again.embedded) == (0, 6, 0)
    _index_matches_store(lib)


def test_copy_at_other_path_finds_original_first_and_ids_map_to_rows(setup, tmp_path):
    lib, photos, ck = setup
    ingest_paths(lib, [photos], CFG, model=str(ck))
    outside = tmp_path / "q.png"
    shutil.copy(photos / "img_003.png", outside)
    [res] = search_library(lib, [str(outside)], k=3)
    assert res.hits[0].path == str(photos / "img_003.png")
    assert res.hits[0].score == pytest.approx(1.0, abs=1e-5)
    records = lib.store.get_images([h.id for h in res.hits])
    assert all(records[h.id].path == h.path for h in res.hits)
    # An indexed path is answered from its stored vector, and is its own first hit.
    [own] = search_library(lib, [str(photos / "img_001.png")], k=1)
    assert own.hits[0].path == str(photos / "img_001.png")


def test_byte_identical_copy_is_a_duplicate_not_embedded(setup):
    lib, photos, ck = setup
    ingest_paths(lib, [photos], CFG, model=str(ck))
    shutil.copy(photos / "img_000.png", photos / "zz_copy.png")
    report = ingest_paths(lib, [photos], CFG)
    assert (report.duplicates, report.embedded, report.unchanged) == (1, 0, 6)
    assert lib.store.count() == 6 and lib.store.count_aliases() == 1
    _index_matches_store(lib)


def test_duplicates_inside_one_batch(setup, tmp_path):
    lib, _, ck = setup
    d = tmp_path / "dups"
    make_image(d / "a.png", 1)
    shutil.copy(d / "a.png", d / "b.png")
    report = ingest_paths(lib, [d], CFG, model=str(ck))
    assert (report.added, report.duplicates, report.embedded) == (1, 1, 1)


def test_corrupt_file_is_reported_and_skipped(setup):
    lib, photos, ck = setup
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    report = ingest_paths(lib, [photos], CFG, model=str(ck))
    assert report.added == 6
    assert [os.path.basename(p) for p, _ in report.failed] == ["broken.jpg"]
    assert "broken.jpg" in open(report.report_path).read()


def test_changed_file_is_updated_with_a_new_vector(setup):
    lib, photos, ck = setup
    ingest_paths(lib, [photos], CFG, model=str(ck))
    old_id = lib.store.lookup_paths([str(photos / "img_002.png")])[str(photos / "img_002.png")].image_id
    make_image(photos / "img_002.png", 999)
    os.utime(photos / "img_002.png", (1, 1))
    report = ingest_paths(lib, [photos], CFG)
    assert (report.updated, report.embedded) == (1, 1)
    assert old_id not in lib.open_index().ids()
    _index_matches_store(lib)


def test_prune_and_remove_take_vectors_out(setup):
    lib, photos, ck = setup
    ingest_paths(lib, [photos], CFG, model=str(ck))
    victim = str(photos / "img_004.png")
    os.remove(victim)
    report = ingest_paths(lib, [photos], IngestConfig(batch_size=4, workers=0, prune=True))
    assert report.removed == 1
    assert remove_paths(lib, [str(photos / "img_000.png")]) == 1
    hits = search_library(lib, [str(photos / "img_001.png")], k=10)[0].hits
    assert {h.path for h in hits}.isdisjoint({victim, str(photos / "img_000.png")})
    assert len(hits) == 4
    _index_matches_store(lib)


def test_other_model_is_refused_and_reindex_switches(setup, tmp_path):
    lib, photos, ck = setup
    ingest_paths(lib, [photos], CFG, model=str(ck))
    other = tiny_checkpoint(tmp_path / "other.pt", backbone="test_efficientnet")
    with pytest.raises(ModelMismatchError, match="reindex"):
        ingest_paths(lib, [photos], CFG, model=str(other))
    summary = reindex_library(lib, model=str(other), config=CFG)
    assert summary.reembedded == 6 and summary.vectors == 6 and summary.switched
    assert lib.model_info().backbone == "test_efficientnet"
    lib.check_model(str(other))
    summary = reindex_library(lib, factory="HNSW32")
    assert summary.index == "HNSW32" and summary.reembedded == 0
    [res] = search_library(lib, [str(photos / "img_001.png")], k=1)
    assert res.hits[0].path == str(photos / "img_001.png")


def test_index_behind_database_is_reconciled(setup):
    """A crash between the database commit and the index save leaves the index behind; opening
    the library adds the missing vectors from stored embeddings."""
    lib, photos, ck = setup
    ingest_paths(lib, [photos], CFG, model=str(ck))
    stale = lib.paths.index.read_bytes(), lib.paths.index_state.read_text()
    make_image(photos / "new.png", 77)
    ingest_paths(lib, [photos], CFG)
    lib.paths.index.write_bytes(stale[0])
    lib.paths.index_state.write_text(stale[1])
    fresh = Library(lib.paths.home, device="cpu")
    assert fresh.open_index().ntotal == 7
    _index_matches_store(fresh)


def test_report_carries_per_stage_seconds(setup):
    lib, photos, ck = setup
    calls = []
    report = ingest_paths(lib, [photos], CFG, model=str(ck), progress=lambda done, total: calls.append((done, total)))
    stages = report.to_dict()["stages"]
    assert set(stages) == {"model", "walk", "plan", "decode", "embed", "commit", "index"}
    assert all(isinstance(v, float) and v >= 0 for v in stages.values())
    # Six images through a model and a database take measurable time in each of these stages.
    assert all(stages[k] > 0 for k in ("model", "decode", "embed", "commit", "index"))
    # The stages never overlap: together they fit in the wall time (rounding aside).
    assert sum(stages.values()) <= report.seconds + 1e-3
    assert 0 < report.to_dict()["embed_share"] <= 1
    # (0, None) first: the paths are good and the slow part begins (see engine.progress)
    assert calls[0] == (0, None) and [c for c in calls if c[1] is not None][0] == (0, 6) and calls[-1] == (6, 6)
    again = ingest_paths(lib, [photos], CFG)
    assert again.stages.embed == 0.0 and again.stages.decode == 0.0  # nothing changed: nothing decoded


def test_search_walks_folders_like_ingest(setup, tmp_path):
    lib, photos, ck = setup
    ingest_paths(lib, [photos], CFG, model=str(ck))
    (photos / ".hidden.png").write_bytes((photos / "img_000.png").read_bytes())
    (photos / "notes.txt").write_text("not an image")
    results = search_library(lib, [photos, tmp_path / "missing.png"], k=1)
    assert [r.query for r in results] == [str(tmp_path / "missing.png")] + [str(photos / f"img_{i:03d}.png")
                                                                            for i in range(6)]
    assert "no such file" in results[0].error and results[0].hits == []
    assert all(r.error is None and r.hits[0].path == r.query for r in results[1:])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EngineError, match="no image files"):
        search_library(lib, [empty], k=1)


def test_search_of_an_empty_home_creates_nothing(tmp_path):
    lib = Library(tmp_path / "nowhere", device="cpu")
    with pytest.raises(IndexMissingError, match="engine ingest"):
        search_library(lib, [tmp_path], k=1)
    assert not (tmp_path / "nowhere").exists()
