"""Damaged, foreign and half-written library files (issue 9, items 7 and 8).

The index is derived data: whatever is wrong with the file (a flipped byte anywhere, a truncation,
random bytes, an empty file, a valid FAISS index of another kind) the library answers every query
exactly as a brute-force search over the stored embeddings does, sets the file aside and rebuilds
it; doctor names it and --repair fixes it; FAISS never parses a file whose size fields are damaged.

A damaged database is kept with its -wal/-shm journal files (which hold the latest committed rows
after a crash) and a new one is rebuilt from what is readable.
"""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from db.salvage import salvage_database
from db.vectors import decode_vectors
from engine.cli import main
from engine.index import IndexFileError, VectorIndex
from engine.library import Library
from engine.query import search_library
from ingest.doctor import check_library
from ingest.pipeline import IngestConfig, ingest_paths
from tests.util import make_image

CFG = IngestConfig(batch_size=4, workers=0)
SEED = 9
N = 12


def _cli(home: Path, *args):
    return CliRunner().invoke(main, ["--home", str(home), "--device", "cpu", *map(str, args)])


def _text(path: str | bytes) -> str:
    return path if isinstance(path, str) else bytes(path).decode()


def _brute_force(home: Path, query: Path) -> list[tuple[str, float]]:
    """Every stored image ranked by inner product with the query's stored vector."""
    with sqlite3.connect(home / "library.db") as conn:
        rows = conn.execute("SELECT images.id, images.path, embeddings.vector FROM images "
                            "JOIN embeddings ON embeddings.image_id = images.id").fetchall()
    vectors = decode_vectors([bytes(v) for _, _, v in rows], len(rows[0][2]) // 2)  # float16 blobs
    paths = [_text(p) for _, p, _ in rows]
    scores = vectors @ vectors[paths.index(str(query))]
    return [(paths[i], float(scores[i])) for i in np.argsort(-scores, kind="stable")]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, tiny_model):
    """A 12-image library, closed cleanly; (home, photo paths, expected hits for photo 3)."""
    root = tmp_path_factory.mktemp("damaged")
    paths = [make_image(root / "photos" / f"img_{i:02d}.png", seed=900 + i) for i in range(N)]
    lib = Library(root / "home", device="cpu")
    ingest_paths(lib, [root / "photos"], CFG, model=tiny_model)
    lib.close()
    return root / "home", paths, _brute_force(root / "home", paths[3])


@pytest.fixture()
def home(pristine, tmp_path):
    src, paths, expected = pristine
    dst = tmp_path / "home"
    shutil.copytree(src, dst)  # copy2: sizes and mtimes as recorded in index.json
    return dst, paths, expected


def _assert_answers(home: Path, query: Path, expected: list[tuple[str, float]]) -> None:
    r = _cli(home, "query", query, "-k", N, "--json", "--no-server")
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    hits = json.loads(r.stdout.splitlines()[0])["hits"]
    assert [h["path"] for h in hits] == [p for p, _ in expected]
    np.testing.assert_allclose([h["score"] for h in hits], [s for _, s in expected], atol=1e-5)


# -- kinds of damage -----------------------------------------------------------------------------
def _flip(position):
    """Flip every bit of one byte; position(size, ntotal, dim) -> offset."""
    def damage(index: Path, lib: Library) -> None:
        data = bytearray(index.read_bytes())
        data[position(len(data), N, lib.model_info().dim)] ^= 0xFF
        index.write_bytes(bytes(data))
    return damage


def _seeded_offset(k: int):
    return lambda size, n, d: int(np.random.default_rng(SEED).choice(size, 8, replace=False)[k])


def _replace_with(build, bless: bool):
    """Put a FAISS index of another kind in place: with bless, saved through the library (its
    checksum recorded, so only the kind checks can refuse it); else written over the file."""
    import faiss

    def damage(index: Path, lib: Library) -> None:
        ids, vectors = next(lib.store.iter_embeddings(lib.model_info().dim, batch=10 ** 6))
        raw = build(faiss, ids, vectors)
        if bless:
            lib.save_index(VectorIndex(raw, "Flat"))
        else:
            faiss.write_index(raw, str(index))
    return damage


def _no_ids(faiss, ids, vectors):
    raw = faiss.IndexFlatIP(vectors.shape[1])
    raw.add(vectors)
    return raw


def _with_ids(inner):
    def build(faiss, ids, vectors):
        raw = faiss.IndexIDMap2(inner(faiss, vectors.shape[1]))
        raw.add_with_ids(vectors, ids)
        return raw
    return build


def _wrong_dim(faiss, ids, vectors):
    raw = faiss.IndexIDMap2(faiss.IndexFlatIP(8))
    raw.add_with_ids(np.ascontiguousarray(vectors[:, :8]), ids)
    return raw


def _duplicate_ids(faiss, ids, vectors):
    raw = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
    raw.add_with_ids(vectors, np.where(ids == ids[1], ids[0], ids))
    return raw


def _bytes(make):
    def damage(index: Path, lib: Library) -> None:
        index.write_bytes(make(index.read_bytes()))
    return damage


DAMAGE = {
    **{f"flip-seeded-{k}": _flip(_seeded_offset(k)) for k in range(8)},
    "flip-magic": _flip(lambda size, n, d: 1),
    "flip-ntotal": _flip(lambda size, n, d: 12),  # claims 2**32 more vectors
    "flip-vector-count": _flip(lambda size, n, d: 74 + 4),  # the vectors' size field: a 4 TB allocation
    "flip-id-count": _flip(lambda size, n, d: size - 8 * n - 8 + 5),
    "flip-last-id": _flip(lambda size, n, d: size - 2),
    "flip-first-vector": _flip(lambda size, n, d: 74 + 8 + 3),
    "truncated-half": _bytes(lambda b: b[: len(b) // 2]),
    "truncated-last-byte": _bytes(lambda b: b[:-1]),
    "empty": _bytes(lambda b: b""),
    "random-bytes": _bytes(lambda b: np.random.default_rng(SEED).bytes(len(b))),
    "flat-ip-without-ids": _replace_with(_no_ids, bless=False),
    "flat-l2": _replace_with(_with_ids(lambda faiss, d: faiss.IndexFlatL2(d)), bless=False),
    "wrong-dim": _replace_with(_wrong_dim, bless=False),
    "saved-without-ids": _replace_with(_no_ids, bless=True),
    "saved-flat-l2": _replace_with(_with_ids(lambda faiss, d: faiss.IndexFlatL2(d)), bless=True),
    "saved-wrong-dim": _replace_with(_wrong_dim, bless=True),
    "saved-hnsw-not-flat": _replace_with(_with_ids(lambda faiss, d: faiss.IndexHNSWFlat(d, 16,
                                                                                       faiss.METRIC_INNER_PRODUCT)),
                                         bless=True),
    "saved-duplicate-ids": _replace_with(_duplicate_ids, bless=True),
}


def _damage(home: Path, name: str) -> bytes:
    lib = Library(home, device="cpu")
    DAMAGE[name](lib.paths.index, lib)
    lib.close()
    return lib.paths.index.read_bytes()


@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_damaged_or_foreign_index_is_set_aside_rebuilt_and_reported(home, name):
    home, paths, expected = home
    index_path = home / "index.faiss"
    damaged = _damage(home, name)

    r = _cli(home, "doctor", "--json")  # the check names it and changes nothing
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    report = json.loads(r.stdout)
    problems = [f for f in report["findings"] if f["severity"] == "problem"]
    assert [f["code"] for f in problems] in (["index-unreadable"], ["index-foreign"], ["index-dimension"],
                                             ["index-duplicates"]), problems
    assert str(index_path) in problems[0]["message"] and problems[0]["repairable"]
    assert index_path.read_bytes() == damaged

    _assert_answers(home, paths[3], expected)  # a query rebuilds it: same answers as before the damage
    [aside] = home.glob("index.faiss.damaged-*")
    assert aside.read_bytes() == damaged  # kept for inspection, never read again
    lib = Library(home, device="cpu")
    assert sorted(lib.read_index().ids().tolist()) == lib.store.embedding_ids().tolist()  # saved, checked
    lib.close()

    index_path.write_bytes(damaged)  # the same damage, mended by doctor this time
    r = _cli(home, "doctor", "--repair")
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    assert "set the unusable index file aside" in r.output and f"rebuilt the index from {N} stored" in r.output
    assert len(list(home.glob("index.faiss.damaged-*"))) == 2
    r = _cli(home, "doctor")
    assert r.exit_code == 0 and r.output.strip().endswith("ok: database, index and files agree"), r.output
    _assert_answers(home, paths[3], expected)


HEADER_DAMAGE = {"magic": 1, "dimension": 5, "ntotal": 12, "dummy": 20, "is-trained": 32, "metric": 33,
                 "inner-dimension": 41 + 1, "vector-count": 74 + 4, "vector-count-top": 74 + 7}


@pytest.mark.parametrize("where", sorted(HEADER_DAMAGE) + ["id-count", "truncated", "short", "empty"])
def test_damaged_sizes_are_refused_before_faiss_reads_them(pristine, tmp_path, monkeypatch, where):
    """Without any checksum to go by, the sizes and headers are checked first: FAISS is never asked
    to read a file whose sizes would make it allocate what the file does not hold."""
    import faiss

    src, _, _ = pristine
    data = bytearray((src / "index.faiss").read_bytes())
    if where in HEADER_DAMAGE:
        data[HEADER_DAMAGE[where]] ^= 0xFF
    elif where == "id-count":
        data[len(data) - 8 * N - 8 + 4] ^= 0xFF
    else:
        data = data[: {"truncated": len(data) - 1, "short": 40, "empty": 0}[where]]
    path = tmp_path / "index.faiss"
    path.write_bytes(bytes(data))
    calls: list[str] = []
    real = faiss.read_index
    monkeypatch.setattr(faiss, "read_index", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    with pytest.raises(IndexFileError) as caught:
        VectorIndex.load(path)
    assert calls == [] and str(path) in str(caught.value)


def test_memory_error_from_faiss_is_damage_not_a_crash(home, monkeypatch):
    """``std::bad_alloc`` reaches Python as MemoryError: the file is set aside and rebuilt."""
    import faiss

    home, paths, expected = home

    def refuse(*args, **kwargs):
        raise MemoryError("std::bad_alloc")

    monkeypatch.setattr(faiss, "read_index", refuse)
    with pytest.raises(IndexFileError, match="std::bad_alloc"):
        VectorIndex.load(home / "index.faiss")
    lib = Library(home, device="cpu")
    [result] = search_library(lib, [str(paths[3])], k=N)
    assert [(h.path, round(h.score, 4)) for h in result.hits] == [(p, round(s, 4)) for p, s in expected]
    assert len(list(home.glob("index.faiss.damaged-*"))) == 1
    lib.close()


def test_index_without_a_recorded_checksum_is_rebuilt_not_trusted(home):
    """An index.json from before checksums (or lost): the index is rebuilt once and recorded."""
    home, paths, expected = home
    state = json.loads((home / "index.json").read_text())
    (home / "index.json").write_text(json.dumps({k: v for k, v in state.items() if k not in ("file", "previous")}))
    report = check_library(Library(home, device="cpu"))
    assert report.ok and [f.code for f in report.findings] == ["index-unverified"]
    _assert_answers(home, paths[3], expected)
    assert not list(home.glob("index.faiss.damaged-*"))  # replaced, not called damaged
    assert "file" in json.loads((home / "index.json").read_text())
    assert check_library(Library(home, device="cpu")).findings == []


def test_kill_between_recording_and_replacing_the_index_leaves_it_consistent(home, tmp_path, engine_command,
                                                                             subprocess_env):
    """A save records the new file's checksum before the file replaces the old one, keeping the
    old one's record: a kill in between leaves the old file, still trusted, and nothing damaged."""
    home, paths, _ = home
    more = [make_image(tmp_path / "more" / f"new_{i}.png", seed=950 + i) for i in range(3)]
    env = dict(subprocess_env, ENGINE_FAULT="index-state-written")
    proc = subprocess.run([*engine_command, "--home", str(home), "--device", "cpu", "ingest", str(tmp_path / "more"),
                           "--workers", "0"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert list(home.glob(".index.faiss.*.tmp"))  # the new file never replaced the old one
    lib = Library(home, device="cpu")
    report = check_library(lib)
    assert report.ok, report.lines()
    assert lib.read_index().ntotal == N  # the old file, trusted by the record of it that was kept
    [result] = search_library(lib, [str(more[0])], k=N + 3)
    assert result.hits[0].path == str(more[0]) and len(result.hits) == N + 3
    assert not list(home.glob("index.faiss.damaged-*"))
    lib.close()


# -- the database ------------------------------------------------------------------------------
def _wal_pages(wal: Path) -> set[int]:
    """Page numbers that have a frame in a SQLite WAL file."""
    data = wal.read_bytes()
    size = struct.unpack(">I", data[8:12])[0]
    return {struct.unpack(">I", data[32 + i * (24 + size):36 + i * (24 + size)])[0]
            for i in range((len(data) - 32) // (24 + size))}


def _quick_check(db: Path) -> list:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            return [r[0] for r in conn.execute("PRAGMA quick_check").fetchall() if r[0] != "ok"]
    except sqlite3.DatabaseError as exc:
        return [str(exc)]


def test_damaged_database_keeps_the_rows_committed_in_its_wal(home, tmp_path, engine_command, subprocess_env):
    """Committed rows that only the -wal holds (an ingest killed before any checkpoint) survive a
    damaged main file: the advice names the journal files, and --repair sets all three aside
    together and rebuilds a database that holds those rows."""
    home, paths, _ = home
    db = home / "library.db"
    more = [make_image(tmp_path / "more" / f"new_{i}.png", seed=970 + i) for i in range(5)]
    env = dict(subprocess_env, ENGINE_FAULT="index-replaced")  # after every commit, before a clean close
    proc = subprocess.run([*engine_command, "--home", str(home), "--device", "cpu", "ingest", str(tmp_path / "more"),
                           "--workers", "0"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    wal = home / "library.db-wal"
    new_names = [str(p).encode() for p in more]
    assert all(name in wal.read_bytes() and name not in db.read_bytes() for name in new_names)  # only in the WAL
    # damage a page of the main file that the WAL does not supersede, until SQLite notices
    in_wal, pristine_db = _wal_pages(wal), db.read_bytes()
    size = int.from_bytes(pristine_db[16:18], "big")  # the page size, from the file's header
    for page in range(2, len(pristine_db) // size + 1):
        if page in in_wal:
            continue
        data = bytearray(pristine_db)
        data[(page - 1) * size:page * size] = np.random.default_rng(page).bytes(size)
        db.write_bytes(bytes(data))
        if _quick_check(db):
            break
    else:
        pytest.fail("no page damage that SQLite notices")
    damaged, wal_bytes = db.read_bytes(), wal.read_bytes()

    r = _cli(home, "doctor")
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert "is damaged" in r.output and "library.db-wal" in r.output and "library.db-shm" in r.output
    r = _cli(home, "doctor", "--repair")
    assert "Traceback" not in r.output and "moved the damaged database aside" in r.output, r.output
    [kept] = [p for p in home.glob("library.db.damaged-*") if not p.name.endswith(("-wal", "-shm"))]
    assert kept.read_bytes() == damaged
    kept_wal = Path(f"{kept}-wal")
    assert kept_wal.read_bytes() == wal_bytes and Path(f"{kept}-shm").exists()  # the three kept together
    # the kept set is still a database with its journal: what it holds can be read back from it
    out = tmp_path / "again.db"
    assert salvage_database(kept, out, wal=kept_wal).ok
    with sqlite3.connect(out) as conn:
        again = {_text(p) for (p,) in conn.execute("SELECT path FROM images")}
    assert {str(p) for p in more} <= again
    # and the rebuilt library holds the rows that only the WAL had
    lib = Library(home, device="cpu")
    known = set(lib.store.lookup_paths([str(p) for p in more + paths]))
    assert {str(p) for p in more} <= known
    assert lib.store.integrity_errors() == []
    [result] = search_library(lib, [str(more[0])], k=3)
    assert result.hits[0].path == str(more[0])
    lib.close()


def test_damaged_database_header_is_restored_by_repair(home):
    """A damaged file header ("file is not a database"): one-line advice naming the journal files;
    --repair keeps the damaged file and rebuilds every row."""
    home, paths, expected = home
    db = home / "library.db"
    data = bytearray(db.read_bytes())
    data[:100] = np.random.default_rng(SEED).bytes(100)
    db.write_bytes(bytes(data))
    for args in (("query", paths[3]), ("info",)):
        r = _cli(home, *args)
        assert r.exit_code == 1 and "Traceback" not in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1
        assert str(db) in r.output and "library.db-wal" in r.output and "library.db-shm" in r.output
    r = _cli(home, "doctor", "--repair")
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    assert "damaged file header was rewritten" in r.output and f"{N} images" in r.output
    [kept] = home.glob("library.db.damaged-*")
    assert kept.read_bytes() == bytes(data)
    _assert_answers(home, paths[3], expected)
