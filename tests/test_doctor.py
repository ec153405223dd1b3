"""`engine doctor [--repair]`: database against index against disk, and damaged files on open."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3

import numpy as np
import pytest
from click.testing import CliRunner

from db.vectors import TOLERANCE
from engine.cli import main
from engine.embedding import embed_files
from engine.index import VectorIndex
from engine.library import Library
from engine.query import search_library
from ingest.doctor import check_library
from ingest.pipeline import IngestConfig, ingest_paths
from tests.util import make_image, tiny_checkpoint

CFG = IngestConfig(batch_size=4, workers=0)


@pytest.fixture()
def library(tmp_path, tiny_model):
    photos = tmp_path / "photos"
    paths = [make_image(photos / f"img_{i}.png", seed=500 + i) for i in range(8)]
    lib = Library(tmp_path / "home", device="cpu")
    ingest_paths(lib, [photos], CFG, model=tiny_model)
    yield lib, paths
    lib.close()


def _cli(home, *args):
    return CliRunner().invoke(main, ["--home", str(home), "--device", "cpu", *map(str, args)])


def _codes(findings, severity="problem"):
    return {f.code for f in findings if f.severity == severity}


def _agree(lib):
    lib.close()
    index = VectorIndex.load(lib.paths.index)
    assert sorted(index.ids().tolist()) == lib.store.embedding_ids().tolist() == lib.store.image_ids().tolist()


def test_healthy_library_and_empty_home(library, tmp_path):
    lib, _ = library
    report = check_library(lib)
    assert report.ok and report.findings == [] and report.lines()[-1] == "ok: database, index and files agree"
    r = _cli(lib.paths.home, "doctor", "--json")
    assert r.exit_code == 0, r.output
    facts = json.loads(r.stdout)["facts"]
    assert (facts["images"], facts["embeddings"], facts["vectors"]) == (8, 8, 8)
    nothing = Library(tmp_path / "nowhere")
    assert check_library(nothing).ok and not (tmp_path / "nowhere" / "library.db").exists()


def test_corrupt_index_is_reported_set_aside_and_rebuilt(library, tmp_path):
    """The index is derived data: doctor names a damaged one, and any command that opens it (a
    query included) sets it aside and rebuilds it rather than failing. tests/test_damaged_files.py
    covers the kinds of damage."""
    lib, paths = library
    [before] = search_library(lib, [str(paths[3])], k=3)
    lib.close()
    damaged = lib.paths.index.read_bytes()[:200]
    lib.paths.index.write_bytes(damaged)
    r = _cli(lib.paths.home, "doctor")
    assert r.exit_code == 1 and f"problem: index file {lib.paths.index} is damaged" in r.output
    assert lib.paths.index.read_bytes() == damaged  # a check changes nothing
    r = _cli(lib.paths.home, "doctor", "--repair")
    assert r.exit_code == 0, r.output
    assert "set the unusable index file aside" in r.output and "rebuilt the index from 8 stored embeddings" in r.output
    [aside] = list(lib.paths.home.glob("index.faiss.damaged-*"))
    assert aside.read_bytes() == damaged
    [after] = search_library(Library(lib.paths.home, device="cpu"), [str(paths[3])], k=3)
    assert [h.path for h in after.hits] == [h.path for h in before.hits]
    for args in (("query", paths[3]), ("ingest", paths[0].parent, "--workers", 0), ("remove", paths[1])):
        lib.paths.index.write_bytes(damaged)
        r = _cli(lib.paths.home, *args)
        assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    assert len(list(lib.paths.home.glob("index.faiss.damaged-*"))) >= 2  # never overwritten, kept aside
    _agree(Library(lib.paths.home, device="cpu"))


def test_corrupt_database_is_named_with_its_journal_and_kept(library):
    lib, paths = library
    lib.close()
    db = lib.paths.database
    garbage = np.random.default_rng(0).bytes(db.stat().st_size)
    db.write_bytes(garbage)
    for args in (("query", paths[0]), ("ingest", paths[0].parent, "--workers", 0), ("info",)):
        r = _cli(lib.paths.home, *args)
        assert r.exit_code == 1 and "Traceback" not in r.output, r.output
        assert str(db) in r.output and "library.db-wal" in r.output and "library.db-shm" in r.output
        assert len(r.output.strip().splitlines()) == 1
    report = check_library(Library(lib.paths.home, device="cpu"))
    assert not report.ok and _codes(report.findings) == {"database-damaged"}
    assert str(db) in report.findings[0].message and report.actions == []
    assert db.read_bytes() == garbage
    # nothing is readable in random bytes: the damaged file is kept aside as it was, and said so
    report = check_library(Library(lib.paths.home, device="cpu"), repair=True)
    assert not report.ok and _codes(report.remaining) == {"database-missing"}
    assert "nothing could be read back" in " ".join(report.actions)
    [aside] = list(lib.paths.home.glob("library.db.damaged-*"))
    assert aside.read_bytes() == garbage and not db.exists()


def test_damaged_page_inside_the_database_is_found_and_rebuilt(library):
    lib, _ = library
    lib.close()
    db = lib.paths.database
    data = bytearray(db.read_bytes())
    size = int.from_bytes(data[16:18], "big")  # the page size, from the file's header
    page = size * (len(data) // size - 1)  # the last page: the header and schema still read fine
    data[page:page + size] = np.random.default_rng(1).bytes(size)
    db.write_bytes(bytes(data))
    report = check_library(Library(lib.paths.home, device="cpu"))
    assert not report.ok and _codes(report.findings) == {"database-damaged"}
    assert "library.db-wal" in report.findings[0].message and bytes(data) == db.read_bytes()
    report = check_library(Library(lib.paths.home, device="cpu"), repair=True)
    assert report.ok, report.lines()
    assert any("moved the damaged database aside" in a for a in report.actions)
    [aside] = list(lib.paths.home.glob("library.db.damaged-*"))
    assert aside.read_bytes() == bytes(data)  # kept exactly as it was found
    lib = Library(lib.paths.home, device="cpu")
    assert lib.store.count() == 8 and lib.store.integrity_errors() == []
    _agree(lib)


def test_every_inconsistency_is_found_and_repaired(library, tmp_path, tiny_model):
    lib, paths = library
    store = lib.store
    ids = {rec.path: rec.id for rec in store.get_images(store.image_ids()).values()}
    # rows without vectors: two lost their stored embedding
    store.delete_embeddings([ids[str(paths[0])], ids[str(paths[1])]])
    # a malformed stored vector, written behind the store's back as outside damage would be
    with contextlib.closing(sqlite3.connect(lib.paths.database)) as conn, conn:
        conn.execute("UPDATE embeddings SET vector = ? WHERE image_id = ?", (b"\0" * 12, ids[str(paths[2])]))
    # a vector in the index with no row, recorded as up to date
    index = VectorIndex.load(lib.paths.index)
    index.add(np.eye(1, index.dim, dtype=np.float32), np.asarray([9999]))
    lib.save_index(index)
    # a file gone, a file changed (different picture), a file touched (same bytes, new mtime)
    paths[3].unlink()
    make_image(paths[4], seed=999)
    os.utime(paths[5], (1_000_000, 1_000_000))
    # a temporary file left by a writer that died mid-save
    (lib.paths.home / ".index.faiss.99999999.tmp").write_bytes(b"half an index")

    report = check_library(lib)
    assert not report.ok
    assert _codes(report.findings) == {"rows-without-vectors", "malformed-vectors", "index-extra",
                                       "files-missing", "files-changed"}
    extra = next(f for f in report.findings if f.code == "index-extra")
    assert extra.count == 4  # two whose embeddings went, one whose embedding is malformed, one bogus
    assert _codes(report.findings, "note") == {"temp-files"}
    r = _cli(lib.paths.home, "doctor")
    assert r.exit_code == 1 and "run `engine doctor --repair`" in r.output

    repaired = check_library(Library(lib.paths.home, device="cpu"), repair=True)
    assert repaired.ok, repaired.lines()
    text = "\n".join(repaired.lines())
    for phrase in ("deleted 1 malformed stored vector", "dropped 1 file gone from disk",
                   "re-embedded 3 images", "re-ingested 2 changed files", "deleted 1 temporary index file"):
        assert phrase in text, text
    assert repaired.remaining == []
    lib = Library(lib.paths.home, device="cpu")
    _agree(lib)
    assert check_library(lib).findings == []
    assert not list(lib.paths.home.glob(".*.tmp"))
    # every stored vector is the embedding of the file as it is now
    records = sorted(lib.store.get_images(lib.store.image_ids()).values(), key=lambda r: r.id)
    assert str(paths[3]) not in {r.path for r in records} and len(records) == 7
    fresh = embed_files(lib.encoder(), [r.path for r in records], workers=0)
    got_ids, stored = lib.store.get_embeddings([r.id for r in records], fresh.embeddings.shape[1])
    np.testing.assert_allclose(stored, fresh.embeddings, atol=TOLERANCE)  # stored as float16


def test_index_with_wrong_vectors_is_rebuilt(library):
    lib, _ = library
    index = VectorIndex.load(lib.paths.index)
    held = index.ids()
    wrong = VectorIndex.build(index.dim)
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(len(held), index.dim)).astype(np.float32)
    wrong.add(vectors / np.linalg.norm(vectors, axis=1, keepdims=True), held)
    lib.save_index(wrong)
    report = check_library(lib, repair=True)
    assert _codes(report.findings) == {"index-vectors"} and report.ok
    assert check_library(lib).findings == []


def test_model_mismatch_is_found_and_restored_when_the_model_still_exists(library, tmp_path, tiny_model):
    lib, _ = library
    lib.close()
    other = tiny_checkpoint(tmp_path / "other.pt", backbone="test_efficientnet")
    shutil.copy(other, lib.paths.encoder)
    report = check_library(Library(lib.paths.home, device="cpu"))
    assert _codes(report.findings) == {"model-mismatch"} and not report.ok
    # queries refuse rather than compare with another model's vectors
    r = _cli(lib.paths.home, "query", make_image(tmp_path / "new.png", seed=1))
    assert r.exit_code == 1 and str(lib.paths.encoder) in r.output and "engine doctor --repair" in r.output
    repaired = check_library(Library(lib.paths.home, device="cpu"), repair=True)
    assert repaired.ok and "restored the encoder file" in repaired.actions[0]
    assert len(list(lib.paths.home.glob("encoder.pt.mismatch-*"))) == 1
    # when the model it was built with is gone too, doctor says what to run instead
    lib.paths.encoder.unlink()
    moved = tmp_path / "moved.pt"
    os.replace(tiny_model, moved)
    try:
        report = check_library(Library(lib.paths.home, device="cpu"), repair=True)
    finally:
        os.replace(moved, tiny_model)
    assert not report.ok and _codes(report.remaining) == {"encoder-missing"}
    assert "engine reindex --model" in report.findings[0].message


def test_repair_keeps_everything_when_every_file_is_missing(library, tmp_path):
    """All files gone at once looks like an unmounted drive: repair must not empty the library."""
    lib, paths = library
    shutil.move(str(tmp_path / "photos"), str(tmp_path / "unplugged"))
    report = check_library(lib, repair=True)
    assert "files-missing" in _codes(report.findings)
    assert any("unmounted drive" in a for a in report.actions)
    assert lib.store.count() == 8 and lib.open_index().ntotal == 8
