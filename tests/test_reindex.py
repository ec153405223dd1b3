"""`engine reindex`: re-embedding with another encoder never loses the library (staged beside the
live vectors, switched in one transaction, resumable, refused when files are missing), and a new
index type is validated before anything is stored. Kill -9 tests: tests/test_crash_reindex.py."""

from __future__ import annotations

import shutil
import sqlite3

import numpy as np
import pytest
from click.testing import CliRunner

from db.vectors import TOLERANCE
from db.store import MetadataStore
from engine.cli import main
from engine.encoder import load_checkpoint
from engine.library import Library
from ingest.doctor import check_library
from ingest.pipeline import IngestConfig, ingest_paths, remove_paths
from ingest.reindex import REPORT_NAME, reindex_library
from tests.reindex_util import answers, assert_converged, assert_same_answers, assert_self_found, live_state
from tests.util import make_image, tiny_checkpoint

CFG = IngestConfig(batch_size=2, workers=0)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    """Tiny random-init encoders: ``small`` is 32-d (the library's 96-d ``tiny_model`` -> a change of
    dimension); ``r48`` and ``e48`` are two different 48-d ones (a change of encoder, same dimension)."""
    root = tmp_path_factory.mktemp("models")
    return {"small": str(tiny_checkpoint(root / "small.pt", head_dim=32)),
            "r48": str(tiny_checkpoint(root / "r48.pt", head_dim=48)),
            "e48": str(tiny_checkpoint(root / "e48.pt", backbone="test_efficientnet", head_dim=48))}


@pytest.fixture()
def library(tmp_path, tiny_model):
    """10 photos ingested with the 96-d ``tiny_model``; (home, photos, an outside query image)."""
    photos = tmp_path / "photos"
    paths = [make_image(photos / f"img_{i:02d}.png", seed=900 + i) for i in range(10)]
    home = tmp_path / "home"
    lib = Library(home, device="cpu")
    ingest_paths(lib, [photos], CFG, model=tiny_model)
    lib.close()
    outside = make_image(tmp_path / "outside" / "query.png", seed=4242)
    return home, paths, outside


def _cli(home, *args):
    return CliRunner().invoke(main, ["--home", str(home), "--device", "cpu", *map(str, args)])


def _one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "internal error" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def _ids(home) -> list[int]:
    lib = Library(home, device="cpu")
    try:
        return lib.store.image_ids().tolist()
    finally:
        lib.close()


# -- item 3: unreadable photos never cost the library ------------------------------------------
def test_unreachable_photos_refuse_the_switch_and_change_nothing(library, models):
    home, photos, outside = library
    queries = [*photos, outside]
    before, state = answers(home, queries), live_state(home)
    ids = _ids(home)
    photos[0].parent.rename(photos[0].parent.with_name("unmounted"))  # the drive is gone

    message = _one_line_error(_cli(home, "reindex", "--model", models["small"], "--batch-size", 2, "--workers", 0))
    assert "none of the 10 indexed files could be read" in message and "--allow-missing" in message
    assert "nothing of it changed" in message
    photos[0].parent.with_name("unmounted").rename(photos[0].parent)
    assert live_state(home) == state  # rows, vectors, model, generation, encoder/index files: all as they were
    assert_same_answers(answers(home, queries), before, exact=True)

    result = _cli(home, "reindex", "--model", models["small"], "--batch-size", 2, "--workers", 0)
    assert result.exit_code == 0, result.output
    assert "switched the library to" in result.output
    assert_converged(home, models["small"], ids)
    assert_self_found(answers(home, photos), photos)


def test_missing_files_keep_their_rows_until_allow_missing_drops_them(library, models):
    home, photos, outside = library
    queries = [p for n, p in enumerate(photos) if n not in (3, 7)] + [outside]
    before, state = answers(home, queries), live_state(home)
    ids = _ids(home)
    photos[3].unlink()
    photos[7].write_bytes(b"not an image any more")

    message = _one_line_error(_cli(home, "reindex", "--model", models["small"], "--batch-size", 2, "--workers", 0))
    assert "2 of 10 indexed files could not be read" in message and "8 new vectors made so far are kept" in message
    assert live_state(home) == state
    assert_same_answers(answers(home, queries), before, exact=True)
    listed = (home / REPORT_NAME).read_text()
    assert str(photos[3]) in listed and str(photos[7]) in listed
    lib = Library(home, device="cpu")
    findings = {f.code: f for f in check_library(lib).findings}
    assert "reindex-pending" in findings and "8 vectors staged" in findings["reindex-pending"].message
    lib.close()

    lib = Library(home, device="cpu")
    report = reindex_library(lib, model=models["small"], allow_missing=True, config=CFG)
    lib.close()
    assert (report.switched, report.resumed, report.reembedded, report.dropped) == (True, 8, 0, 2)
    assert sorted(p for p, _ in report.failed) == sorted([str(photos[3]), str(photos[7])])
    kept = [i for n, i in enumerate(ids) if n not in (3, 7)]
    assert_converged(home, models["small"], kept)


def test_an_alias_stands_in_for_an_unreadable_original(library, models):
    home, photos, _ = library
    shutil.copy(photos[4], photos[4].with_name("zz_copy.png"))
    lib = Library(home, device="cpu")
    assert ingest_paths(lib, [photos[0].parent], CFG).duplicates == 1
    photos[4].unlink()
    report = reindex_library(lib, model=models["small"], config=CFG)
    lib.close()
    assert report.switched and report.failed == [] and report.dropped == 0
    lib = Library(home, device="cpu")
    [row] = [i for p, i, alias in lib.store.iter_paths() if p == str(photos[4])]
    _, stored = lib.store.get_embeddings([row], 32)
    from engine.embedding import embed_files

    fresh = embed_files(load_checkpoint(models["small"], "cpu"), [str(photos[4].with_name("zz_copy.png"))], workers=0)
    np.testing.assert_allclose(stored, fresh.embeddings, atol=TOLERANCE)  # stored as float16
    lib.close()


# -- item 4: a stopped re-embedding resumes; the old library answers until the switch ------------
def test_a_stopped_reembedding_resumes_without_embedding_staged_rows_again(library, models, monkeypatch):
    home, photos, outside = library
    queries = [*photos, outside]
    before, state = answers(home, queries), live_state(home)
    ids = _ids(home)
    staged_batches = []
    real_put = MetadataStore.put_pending

    def dies_on_third_batch(self, batch_ids, vectors):
        if len(staged_batches) == 2:
            raise KeyboardInterrupt  # what Ctrl-C (or a crash) does mid-run
        staged_batches.append(list(batch_ids))
        real_put(self, batch_ids, vectors)

    monkeypatch.setattr(MetadataStore, "put_pending", dies_on_third_batch)
    lib = Library(home, device="cpu")
    with pytest.raises(KeyboardInterrupt):
        reindex_library(lib, model=models["small"], config=CFG)
    lib.close()
    monkeypatch.undo()
    assert live_state(home) == state
    assert_same_answers(answers(home, queries), before, exact=True)
    # meanwhile (with the old encoder) a new photo is ingested, a staged one removed, a staged one
    # edited: the rerun embeds the new and the edited, and forgets the removed one's staged vector
    make_image(photos[0].parent / "new.png", seed=31)
    make_image(photos[1], seed=32)
    lib = Library(home, device="cpu")
    assert remove_paths(lib, [photos[0]]) == 1
    photos[0].unlink()
    assert ingest_paths(lib, [photos[0].parent], CFG).added == 1
    report = reindex_library(lib, model=models["small"], config=CFG)
    lib.close()
    assert (report.resumed, report.reembedded) == (2, 8)
    assert_converged(home, models["small"], _ids(home))
    assert len(_ids(home)) == len(ids)


def test_a_change_of_dimension_leaves_query_ingest_and_doctor_working(library, models):
    home, photos, outside = library
    result = _cli(home, "reindex", "--model", models["small"], "--workers", 0, "--json")
    assert result.exit_code == 0, result.output
    make_image(photos[0].parent / "later.png", seed=77)
    assert _cli(home, "ingest", photos[0].parent, "--workers", 0).exit_code == 0
    result = _cli(home, "query", outside, "-k", 3)
    assert result.exit_code == 0, result.output
    assert_self_found(answers(home, [*photos, photos[0].parent / "later.png"]),
                      [*photos, photos[0].parent / "later.png"])
    assert_converged(home, models["small"], _ids(home))


def test_an_index_of_the_previous_vectors_is_rebuilt_not_reconciled(tmp_path, models):
    """Same dimension, same ids, other vectors: reconciling by id would keep the old encoder's
    vectors. A crash between the switch and the index save is simulated by putting the old index
    and its state file back."""
    photos = [make_image(tmp_path / "p" / f"{i}.png", seed=60 + i) for i in range(6)]
    home = tmp_path / "home"
    lib = Library(home, device="cpu")
    ingest_paths(lib, [tmp_path / "p"], CFG, model=models["r48"])
    old = {p: p.read_bytes() for p in (lib.paths.index, lib.paths.index_state)}
    reindex_library(lib, model=models["e48"], config=CFG)
    expected = answers(home, photos)
    for path, data in old.items():
        path.write_bytes(data)
    lib.close()

    lib = Library(home, device="cpu")
    findings = check_library(lib).findings
    assert [f.code for f in findings] == ["index-previous-vectors"] and findings[0].severity == "note"
    lib.close()
    assert_same_answers(answers(home, photos), expected)
    assert_converged(home, models["e48"], _ids(home))  # the query saved the rebuilt index


def test_an_unfinished_encoder_rename_is_finished_by_the_next_use(library, models):
    home, photos, outside = library
    old_encoder = (home / "encoder.pt").read_bytes()
    lib = Library(home, device="cpu")
    reindex_library(lib, model=models["small"], config=CFG)
    lib.close()
    expected = answers(home, [outside])
    # the crash: database switched, new encoder still beside the old one
    shutil.copy(home / "encoder.pt", home / "encoder.pending.pt")
    (home / "encoder.pt").write_bytes(old_encoder)
    lib = Library(home, device="cpu")
    findings = check_library(lib).findings
    assert [f.code for f in findings] == ["encoder-switch"] and check_library(lib).ok
    lib.close()
    assert_same_answers(answers(home, [outside]), expected)  # embeds with the new encoder, and renames it
    assert_converged(home, models["small"], _ids(home))


def test_a_reindex_finishes_an_earlier_encoder_rename_before_staging(library, models):
    """The same crash, then a reindex to a third encoder that is refused: staging must not have
    overwritten the switched-to encoder's file while it still waited beside the old one."""
    home, photos, outside = library
    old_encoder = (home / "encoder.pt").read_bytes()
    lib = Library(home, device="cpu")
    reindex_library(lib, model=models["small"], config=CFG)
    lib.close()
    expected = answers(home, [outside])
    shutil.copy(home / "encoder.pt", home / "encoder.pending.pt")
    (home / "encoder.pt").write_bytes(old_encoder)
    photos[2].unlink()
    _one_line_error(_cli(home, "reindex", "--model", models["r48"], "--workers", 0))
    assert_same_answers(answers(home, [outside]), expected)
    lib = Library(home, device="cpu")
    assert load_checkpoint(lib.paths.encoder, "cpu").identity() == lib.model_info().identity
    problems = [f.code for f in check_library(lib).findings if f.severity == "problem"]
    assert not [c for c in problems if c.startswith(("encoder", "model"))], problems  # only the missing photo
    lib.close()


def test_reindex_with_the_current_model_drops_a_pending_one(library, models, tiny_model):
    home, photos, outside = library
    before = answers(home, [outside])
    photos[1].unlink()
    _one_line_error(_cli(home, "reindex", "--model", models["small"], "--workers", 0))
    assert (home / "encoder.pending.pt").exists()
    result = _cli(home, "reindex", "--model", tiny_model, "--workers", 0, "--allow-missing")
    assert result.exit_code == 0, result.output
    assert "already uses" in result.output and "dropped the vectors staged for" in result.output
    lib = Library(home, device="cpu")
    assert lib.pending_model() is None and len(lib.store.pending_ids()) == 0 and lib.store.count() == 10
    lib.close()
    assert not (home / "encoder.pending.pt").exists()
    assert_same_answers(answers(home, [outside]), before, exact=True)


def test_a_library_written_before_staging_existed_is_read_and_reindexed(library, models):
    home, photos, outside = library
    with sqlite3.connect(home / "library.db") as conn:
        conn.execute("DROP TABLE pending_embeddings")
    before = answers(home, [outside])
    assert_same_answers(answers(home, [outside]), before, exact=True)
    result = _cli(home, "reindex", "--model", models["small"], "--workers", 0)
    assert result.exit_code == 0, result.output
    assert_converged(home, models["small"], _ids(home))


def test_a_bad_index_type_with_a_model_is_refused_before_the_switch(library, models):
    home, photos, outside = library
    state = live_state(home)
    message = _one_line_error(_cli(home, "reindex", "--model", models["small"], "--index-type", "garbage"))
    assert "garbage" in message
    message = _one_line_error(_cli(home, "reindex", "--model", models["small"], "--index-type", "IVF64,Flat",
                                   "--workers", 0))
    assert "needs at least 64 vectors" in message and "10" in message
    assert live_state(home) == state
    result = _cli(home, "reindex", "--model", models["small"], "--index-type", "HNSW32", "--workers", 0, "--json")
    assert result.exit_code == 0, result.output
    assert '"resumed": 10' in result.output
    assert_converged(home, models["small"], _ids(home), factory="HNSW32")


# -- item 6: a refused index type stores nothing ---------------------------------------------------
@pytest.mark.parametrize("factory, reason", [
    ("garbage", "garbage"),
    ("IVF1024,Flat", "needs at least 1024 vectors to train its 1024 lists and the library has 10"),
    ("IVF2,PQ32", "256"),  # a product quantiser's codebooks need 256 vectors each
    ("Flat,IVF2", "Flat,IVF2"),
])
def test_a_refused_index_type_leaves_query_doctor_and_ingest_working(library, factory, reason):
    home, photos, outside = library
    state = live_state(home)
    before = answers(home, [*photos, outside])
    message = _one_line_error(_cli(home, "reindex", "--index-type", factory))
    assert reason in message
    assert live_state(home) == state  # the stored type and the index files stand
    assert_same_answers(answers(home, [*photos, outside]), before, exact=True)
    assert _cli(home, "query", outside).exit_code == 0
    assert _cli(home, "doctor").exit_code == 0
    make_image(photos[0].parent / "new.png", seed=5)
    result = _cli(home, "ingest", photos[0].parent, "--workers", 0)
    assert result.exit_code == 0 and "added 1" in result.output, result.output
    assert _cli(home, "reindex", "--index-type", "IVF2,Flat").exit_code == 0
    lib = Library(home, device="cpu")
    assert lib.index_config().factory == "IVF2,Flat" and lib.read_index().factory == "IVF2,Flat"
    assert sorted(lib.read_index().ids().tolist()) == lib.store.image_ids().tolist()
    lib.close()


def test_a_stored_type_that_cannot_be_built_falls_back_to_flat(library):
    """A library left with an unusable type by an older engine still answers (exact search)."""
    home, photos, outside = library
    before = answers(home, [outside])
    with sqlite3.connect(home / "library.db") as conn:
        conn.execute("UPDATE meta SET value = ? WHERE key = 'index_factory'", ('"IVF1024,Flat"',))
        if conn.total_changes == 0:
            conn.execute("INSERT INTO meta (key, value) VALUES ('index_factory', ?)", ('"IVF1024,Flat"',))
    (home / "index.faiss").unlink()
    assert_same_answers(answers(home, [outside]), before, exact=True)
    assert _cli(home, "doctor").exit_code == 0
    result = _cli(home, "reindex")
    assert result.exit_code == 0 and "built a Flat index instead" in result.output, result.output
