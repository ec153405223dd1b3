"""Stored vectors as float16 (schema 3): the round trip, the batched upgrade of a schema-2 library
(float32 vectors), a read-only open of one, ``kill -9`` in the middle of the upgrade, and what the
database weighs per vector. Each runs on SQLite and on PostgreSQL (``store_url``)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from sqlalchemy import create_engine, text

from db import MetadataStore
from db.common import StoreError
from db.vectors import TOLERANCE, as_stored, decode_vectors, encode_vectors, halve_blob, stack_vectors, widen

DIM = 16


def _row(i: int) -> dict:
    return {"path": f"/p/{i:04d}.jpg", "content_hash": f"{i:064x}", "bytes": 10 + i, "mtime": 1.5 + i}


def _unit(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _filled(url: str, n: int = 50, pending: int = 7) -> tuple[MetadataStore, list[int], np.ndarray, np.ndarray]:
    """A store with ``n`` rows and vectors, ``pending`` of them with a staged vector too."""
    store = MetadataStore(url)
    vectors = _unit(n)
    ids, _ = store.write_batch([_row(i) for i in range(n)], vectors)
    staged = _unit(pending, seed=1)
    store.start_pending({"model": "next"})
    store.put_pending(ids[:pending], staged)
    return store, ids, vectors, staged


def _as_schema_2(url: str, ids: list[int], vectors: np.ndarray, staged: np.ndarray) -> None:
    """Rewrite the database as the previous engine left it: float32 vectors, schema version 2
    (the tables themselves did not change)."""
    engine = create_engine(url)
    with engine.begin() as conn:
        for table, values in (("embeddings", vectors), ("pending_embeddings", staged)):
            if not len(values):
                continue
            conn.execute(text(f"UPDATE {table} SET vector = :v WHERE image_id = :i"),
                         [{"i": i, "v": v.astype("<f4").tobytes()} for i, v in zip(ids, values)])
        conn.execute(text("UPDATE meta SET value = '2' WHERE key = 'schema_version'"))
    engine.dispose()


def _blob_sizes(url: str, table: str = "embeddings") -> dict[int, int]:
    engine = create_engine(url)
    with engine.connect() as conn:
        sizes = {int(i): int(n) for i, n in conn.execute(text(f"SELECT image_id, length(vector) FROM {table}"))}
    engine.dispose()
    return sizes


# -- the round trip ---------------------------------------------------------------------------------
def test_float16_round_trip_is_within_half_precision(store_url):
    store = MetadataStore(store_url)
    vectors = _unit(40, dim=64)
    ids, _ = store.write_batch([_row(i) for i in range(40)], vectors)
    got_ids, got = store.get_embeddings(ids[::-1], 64)
    assert got.dtype == np.float32 and got.shape == (40, 64)
    got = got[np.argsort(got_ids)]
    np.testing.assert_array_equal(got, as_stored(vectors))  # exactly what float16 holds
    assert np.abs(got - vectors).max() < TOLERANCE
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)  # unit vectors come back unit
    cosine = np.sum(got * vectors, axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(vectors, axis=1)
    assert np.min(cosine) > 1 - 1e-6
    assert set(_blob_sizes(store_url).values()) == {64 * 2}
    assert store.malformed_embedding_ids(64) == []
    [(streamed_ids, streamed)] = list(store.iter_embeddings(64))
    np.testing.assert_array_equal(streamed, got)
    store.put_embeddings(ids[:3], vectors[3:6])  # replaced vectors go through the same conversion
    np.testing.assert_array_equal(store.get_embeddings(ids[:3], 64)[1], as_stored(vectors[3:6]))
    store.start_pending({"model": "x"})
    store.put_pending(ids[:2], vectors[:2] * -1)
    np.testing.assert_array_equal(store.get_pending(ids[:2], 64)[1], as_stored(-vectors[:2]))


def test_a_value_float16_cannot_hold_is_refused_and_nothing_is_written(store_url):
    store = MetadataStore(store_url)
    for bad in (np.float32(1e6), np.float32(np.nan), np.float32(np.inf)):
        vectors = _unit(2)
        vectors[1, 3] = bad
        with pytest.raises(StoreError, match="float16"):
            store.write_batch([_row(0), _row(1)], vectors)
        assert store.count() == 0 and store.generation() == 0


def test_codec_helpers_agree():
    vectors = _unit(5, dim=8) * 3
    blobs = encode_vectors(vectors)
    assert [len(b) for b in blobs] == [16] * 5
    np.testing.assert_array_equal(decode_vectors(blobs, 8), as_stored(vectors))
    np.testing.assert_array_equal(as_stored(vectors), vectors.astype(np.float16).astype(np.float32))  # not unit: as rounded
    legacy = [v.astype("<f4").tobytes() for v in vectors]
    with pytest.raises(StoreError, match="not all 8-d"):
        decode_vectors(legacy, 8)  # float32 blobs are read only from a database not yet upgraded
    np.testing.assert_array_equal(decode_vectors(legacy[:2] + blobs[2:], 8, legacy=True),
                                  np.concatenate([vectors[:2], as_stored(vectors[2:])]))
    stacked = stack_vectors(blobs, 8)  # as stored: float16, nothing converted until widened
    assert stacked.dtype == np.float16
    np.testing.assert_array_equal(widen(stacked[1:3]), decode_vectors(blobs, 8)[1:3])
    mixed = stack_vectors(legacy[:2] + blobs[2:], 8, legacy=True)
    assert mixed.dtype == np.float32 and widen(mixed) is mixed
    np.testing.assert_array_equal(mixed, decode_vectors(legacy[:2] + blobs[2:], 8, legacy=True))
    assert halve_blob(legacy[0]) == blobs[0]
    assert halve_blob(b"\0" * 6) is None and halve_blob(np.float32([1e6]).tobytes()) is None


# -- the upgrade ------------------------------------------------------------------------------------
def test_schema_2_library_is_upgraded_batch_by_batch(store_url, monkeypatch):
    from sqlalchemy import Engine, event

    import db.migrations as migrations

    store, ids, vectors, staged = _filled(store_url)
    store.close()
    _as_schema_2(store_url, ids, vectors, staged)
    engine = create_engine(store_url)
    with engine.begin() as conn:  # a vector the previous engine had damaged stays damaged, and found
        conn.execute(text("UPDATE embeddings SET vector = :v WHERE image_id = :i"), {"v": b"\1" * 10, "i": ids[5]})
    engine.dispose()
    assert set(_blob_sizes(store_url).values()) == {DIM * 4, 10}
    monkeypatch.setattr(migrations, "BATCH", 7)
    commits: list[int] = []
    listener = lambda _conn: commits.append(1)  # noqa: E731
    event.listen(Engine, "commit", listener)
    try:
        store = MetadataStore(store_url)
    finally:
        event.remove(Engine, "commit", listener)
    assert len(commits) >= 50 // 7 + 1 + 1  # one transaction per batch of 7, not one for the whole table
    assert store.get_meta("schema_version") == 3 and store.get_meta("upgrade_vectors") is None
    assert store.malformed_embedding_ids(DIM) == [ids[5]]
    keep = [i for i in ids if i != ids[5]]
    got_ids, got = store.get_embeddings(keep, DIM)
    np.testing.assert_array_equal(got_ids, keep)
    np.testing.assert_array_equal(got, as_stored(np.delete(vectors, 5, axis=0)))
    np.testing.assert_array_equal(store.get_pending(ids[:7], DIM)[1], as_stored(staged))
    assert store.count() == 50 and store.generation() == 1  # the upgrade changes no row
    store.close()
    assert MetadataStore(store_url).get_meta("schema_version") == 3  # a second open has nothing to do


def test_read_only_open_of_a_schema_2_library_reads_its_float32_vectors(store_url):
    store, ids, vectors, staged = _filled(store_url)
    store.close()
    _as_schema_2(store_url, ids, vectors, staged)
    reader = MetadataStore(store_url, read_only=True)
    np.testing.assert_array_equal(reader.get_embeddings(ids, DIM)[1], vectors)  # float32, as written
    assert reader.malformed_embedding_ids(DIM) == [] and reader.malformed_embedding_ids(DIM * 3) == ids
    reader.close()
    assert set(_blob_sizes(store_url).values()) == {DIM * 4}  # nothing was converted by reading
    writer = MetadataStore(store_url)
    assert set(_blob_sizes(store_url).values()) == {DIM * 2}
    assert writer.malformed_embedding_ids(DIM) == []
    assert writer.malformed_embedding_ids(DIM * 2) == ids  # upgraded: a float32-sized blob is malformed now
    writer.close()


_KILLED_UPGRADE = textwrap.dedent("""
    import os, signal, sys
    from sqlalchemy import Engine, event
    import db.migrations as migrations
    from db.store import MetadataStore

    url, event_name, fatal = sys.argv[1], sys.argv[2], int(sys.argv[3])
    migrations.BATCH = 7
    seen = [0]

    def maybe_die(*_args):
        seen[0] += 1
        if seen[0] == fatal:
            os.kill(os.getpid(), signal.SIGKILL)

    event.listen(Engine, event_name, maybe_die)
    MetadataStore(url).close()
""")


def test_upgrade_killed_at_any_batch_converges_on_rerun(store_url, tmp_path):
    """kill -9 inside a batch's COMMIT and between two batches, at several batches: the rerun
    finishes the upgrade, every vector converted exactly once (a vector converted twice would be
    read as garbage, one left out would be malformed)."""
    store, ids, vectors, staged = _filled(store_url)
    store.close()
    script = tmp_path / "upgrade.py"
    script.write_text(_KILLED_UPGRADE)
    partial = 0
    # a run is 12 transactions: 2 to open, then 8 batches of vectors, 1 of staged ones, and the last
    for event_name, fatal in (("commit", 4), ("begin", 6), ("commit", 9), ("begin", 12)):
        _as_schema_2(store_url, ids, vectors, staged)
        proc = subprocess.run([sys.executable, str(script), store_url, event_name, str(fatal)],
                              capture_output=True, text=True, timeout=120, cwd=str(tmp_path.parent), env=_env())
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        reader = MetadataStore(store_url, read_only=True)
        if reader.get_meta("schema_version") == 2 and reader.get_meta("upgrade_vectors"):
            partial += 1  # killed in the middle: the record says how far it got
            sizes = _blob_sizes(store_url)
            assert len(set(sizes.values())) == 2 or fatal == 12  # some vectors converted, others not
            expected = [as_stored(v[None])[0] if sizes[i] == DIM * 2 else v for i, v in zip(ids, vectors)]
            np.testing.assert_array_equal(reader.get_embeddings(ids, DIM)[1], expected)  # readable all the same
        reader.close()
        store = MetadataStore(store_url)  # the rerun
        assert store.get_meta("schema_version") == 3 and store.get_meta("upgrade_vectors") is None
        assert store.malformed_embedding_ids(DIM) == []
        np.testing.assert_array_equal(store.get_embeddings(ids, DIM)[1], as_stored(vectors))
        np.testing.assert_array_equal(store.get_pending(ids[:7], DIM)[1], as_stored(staged))
        assert store.count() == 50
        store.close()
    assert partial == 4  # every kill really landed in the middle of the upgrade


def _env() -> dict[str, str]:
    import os

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return dict(os.environ, PYTHONPATH=here, OMP_NUM_THREADS="1")


# -- what it weighs ---------------------------------------------------------------------------------
def test_a_sqlite_library_stores_a_1280_d_vector_in_about_its_2560_bytes(tmp_path):
    """float16 blobs, packed three to a page: float32 (5,120 bytes) or one vector per 4 KB page
    would both fail this."""
    store = MetadataStore.for_file(tmp_path / "l.db")
    n = 1500
    for start in range(0, n, 500):
        store.write_batch([_row(i) for i in range(start, start + 500)], _unit(500, dim=1280, seed=start))
    store.close()
    import sqlite3

    with sqlite3.connect(tmp_path / "l.db") as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        pages, size = conn.execute("PRAGMA page_count").fetchone()[0], conn.execute("PRAGMA page_size").fetchone()[0]
    per_row = pages * size / n
    assert per_row < 3200, per_row  # the vector (2,730 bytes of a page) + its row, path and hash indexes


# -- a whole library written by the previous engine -------------------------------------------------
def test_library_written_by_the_previous_engine_is_searched_then_upgraded(store_url, tmp_path, tiny_model):
    """A schema-2 library (float32 vectors): a read-only query answers from it as it is; the next
    writable open upgrades it, after which queries, doctor and a further ingest all agree."""
    from engine.library import Library
    from engine.query import search_library
    from ingest.doctor import check_library
    from ingest.pipeline import IngestConfig, ingest_paths
    from tests.util import make_image

    config = IngestConfig(batch_size=4, workers=0)
    photos = [make_image(tmp_path / "photos" / f"img_{i}.png", 300 + i) for i in range(6)]
    lib = Library(tmp_path / "home", device="cpu", database_url=store_url)
    ingest_paths(lib, [tmp_path / "photos"], config, model=tiny_model)
    ids = lib.store.image_ids().tolist()
    dim = lib.model_info().dim
    # the previous engine stored the encoder's float32 output: embed again to have it
    from engine.embedding import embed_files

    records = lib.store.get_images(ids)
    exact = embed_files(lib.encoder(), [records[i].path for i in ids], workers=0).embeddings
    staged = np.zeros((0, dim), np.float32)
    lib.close()
    _as_schema_2(store_url, ids, exact, staged)

    reader = Library(tmp_path / "home", device="cpu", database_url=store_url, read_only=True)
    np.testing.assert_array_equal(reader.store.get_embeddings(ids, dim)[1], exact)
    [result] = search_library(reader, [photos[2]], k=3)
    assert result.hits[0].path == str(photos[2]) and result.hits[0].distance < 1e-3
    reader.close()

    lib = Library(tmp_path / "home", device="cpu", database_url=store_url)
    assert lib.store.get_meta("schema_version") == 3
    np.testing.assert_array_equal(lib.store.get_embeddings(ids, dim)[1], as_stored(exact))
    [result] = search_library(lib, [photos[4]], k=3)
    assert result.hits[0].path == str(photos[4]) and result.hits[0].distance < 1e-3
    report = check_library(lib)
    assert report.ok and report.findings == [], report.lines()
    make_image(tmp_path / "photos" / "img_new.png", 399)
    done = ingest_paths(lib, [tmp_path / "photos"], config)
    assert done.added == 1 and lib.store.count() == 7 and lib.store.malformed_embedding_ids(dim) == []
    assert check_library(lib).findings == []
    lib.close()


def test_an_upgraded_sqlite_file_is_compacted_once_no_one_else_has_it_open(tmp_path, monkeypatch):
    import contextlib
    import sqlite3

    import db.store as store_module

    path = tmp_path / "l.db"
    monkeypatch.setattr(store_module, "SQLITE_PAGE_SIZE", 4096)  # the previous engine's page size
    store, ids, vectors, staged = _filled(f"sqlite:///{path}", n=400)
    store.close()
    monkeypatch.undo()
    vectors = np.repeat(vectors, 16, axis=1) / 4  # 256-d unit vectors: a float32 blob overflows a 4 KB page
    staged = np.repeat(staged, 16, axis=1) / 4
    _as_schema_2(f"sqlite:///{path}", ids, vectors, staged)

    def page_size() -> int:
        with contextlib.closing(sqlite3.connect(path)) as conn:
            return conn.execute("PRAGMA page_size").fetchone()[0]

    with contextlib.closing(sqlite3.connect(path)) as other:  # another process has the library open
        other.execute("SELECT count(*) FROM images").fetchone()
        store = MetadataStore.for_file(path)
        assert store.get_meta("schema_version") == 3 and store.get_meta("upgrade_compact") is True
        store.close()
    assert page_size() == 4096
    size_before = path.stat().st_size
    store = MetadataStore.for_file(path)  # now alone with it
    assert store.get_meta("upgrade_compact") is None and page_size() == 8192
    assert path.stat().st_size < size_before * 0.7
    np.testing.assert_array_equal(store.get_embeddings(ids, DIM * 16)[1], as_stored(vectors))
    np.testing.assert_array_equal(store.get_pending(ids[:7], DIM * 16)[1], as_stored(staged))
    new, _ = store.write_batch([_row(999)], _unit(1, DIM * 16))
    assert new[0] > max(ids)  # ids are still never reused
    store.close()
