"""The metadata store, on SQLite and on PostgreSQL (``store_url``)."""

import numpy as np
from sqlalchemy import create_engine, text

from db import MetadataStore
from db.store import SCHEMA_VERSION


def _row(i, h=None):
    return {"path": f"/p/{i}.jpg", "content_hash": h or f"{i:064x}", "bytes": 10 + i, "mtime": 1.5 + i,
            "width": 4, "height": 3, "format": "JPEG"}


def test_batch_write_returns_row_ids_and_vectors_round_trip(store_url):
    store = MetadataStore(store_url)
    vecs = np.arange(12, dtype=np.float32).reshape(3, 4)
    ids, gone = store.write_batch([_row(0), _row(1), _row(2)], vecs)
    assert gone == [] and len(ids) == 3
    got_ids, got = store.get_embeddings(ids[::-1], 4)
    order = np.argsort(got_ids)
    np.testing.assert_array_equal(got[order], vecs)
    stored_ids, stored = store.get_stored(ids, 4)  # the same rows, as stored (float16)
    assert stored.dtype == np.float16 and sorted(stored_ids.tolist()) == sorted(ids)
    np.testing.assert_array_equal(stored[np.argsort(stored_ids)].astype(np.float32), vecs)
    recs = store.get_images(ids)
    assert [recs[i].path for i in ids] == ["/p/0.jpg", "/p/1.jpg", "/p/2.jpg"]
    assert store.generation() == 1


def test_ids_never_reused_after_delete(store_url):
    store = MetadataStore(store_url)
    ids, _ = store.write_batch([_row(0), _row(1)], np.zeros((2, 2), np.float32))
    assert store.remove_paths(["/p/1.jpg"]) == [ids[1]]
    new, _ = store.write_batch([_row(5)], np.zeros((1, 2), np.float32))
    assert new[0] > ids[1]


def test_alias_inherits_row_when_canonical_path_removed(store_url):
    store = MetadataStore(store_url)
    ids, _ = store.write_batch([_row(0)], np.ones((1, 2), np.float32),
                               aliases=[{"path": "/p/copy.jpg", "bytes": 10, "mtime": 9.0, "new_row": 0}])
    assert store.lookup_paths(["/p/copy.jpg"])["/p/copy.jpg"].image_id == ids[0]
    assert store.remove_paths(["/p/0.jpg"]) == []  # the alias carries the row on
    assert store.get_images(ids)[ids[0]].path == "/p/copy.jpg"
    assert store.remove_paths(["/p/copy.jpg"]) == ids
    assert store.count() == 0 and store.count_embeddings() == 0


def test_non_utf8_path_round_trips(store_url):
    store = MetadataStore(store_url)
    weird = "/p/caf\udce9.jpg"  # the byte 0xE9 alone, as os.fsdecode gives it
    ids = store.insert_rows([dict(_row(0), path=weird)])
    assert store.get_images(ids)[ids[0]].path == weird
    assert weird in store.lookup_paths([weird])


def test_malformed_vectors_and_file_stats_for_doctor(store_url):
    store = MetadataStore(store_url)
    ids, _ = store.write_batch([_row(0), _row(1), _row(2)], np.zeros((3, 4), np.float32),
                               aliases=[{"path": "/p/copy.jpg", "bytes": 10, "mtime": 9.0, "new_row": 0}])
    assert store.malformed_embedding_ids(4) == []
    assert store.malformed_embedding_ids(3) == ids  # every vector is the wrong size for 3-d
    outside = create_engine(store_url)
    with outside.begin() as conn:  # damage from outside
        conn.execute(text("UPDATE embeddings SET vector = :v WHERE image_id = :i"), {"v": b"\0" * 12, "i": ids[1]})
    outside.dispose()
    assert store.malformed_embedding_ids(4) == [ids[1]]
    assert sorted(store.file_stats()) == sorted([("/p/0.jpg", 10, 1.5), ("/p/1.jpg", 11, 2.5), ("/p/2.jpg", 12, 3.5),
                                                 ("/p/copy.jpg", 10, 9.0)])


def test_on_commit_runs_at_every_write_transaction(store_url):
    store = MetadataStore(store_url)
    seen: list[str] = []
    store.on_commit(lambda: seen.append("commit"))
    store.write_batch([_row(0)], np.zeros((1, 2), np.float32))
    store.set_meta("k", 1)
    store.count()  # reads commit nothing
    assert seen == ["commit", "commit"]


def test_library_honours_engine_database_url_without_the_cli(tmp_path, monkeypatch):
    from engine.library import Library

    elsewhere = tmp_path / "elsewhere.db"
    monkeypatch.setenv("ENGINE_DATABASE_URL", f"sqlite:///{elsewhere}")
    lib = Library(tmp_path / "home")
    lib.store.set_meta("k", 1)
    assert elsewhere.exists() and not lib.paths.database.exists()
    lib.close()
    explicit = Library(tmp_path / "home", database_url=f"sqlite:///{tmp_path / 'explicit.db'}")
    assert explicit.store.where == str(tmp_path / "explicit.db")  # an explicit URL wins over the variable
    explicit.close()


def test_opening_a_new_database_while_another_process_creates_it(store_url, monkeypatch):
    """The race of two processes opening one new library: this one checked for the tables before
    the other created them, so its CREATE TABLE fails; it must open the database all the same."""
    from sqlalchemy.sql.ddl import SchemaGenerator

    winner = MetadataStore(store_url)
    winner.write_batch([_row(0)], np.zeros((1, 2), np.float32))
    real_check = SchemaGenerator._can_create_table
    lied: set[str] = set()

    def stale_check(self, table):
        if table.name not in lied:  # the answer from before the winner's CREATE TABLE
            lied.add(table.name)
            return True
        return real_check(self, table)

    monkeypatch.setattr(SchemaGenerator, "_can_create_table", stale_check)
    loser = MetadataStore(store_url)
    assert lied and loser.count() == 1 and loser.get_meta("schema_version") == SCHEMA_VERSION
    winner.close()
    loser.close()


def test_a_damaged_vector_page_is_a_store_error_not_a_driver_error(tmp_path):
    # Stored vectors are read through the driver's own cursor (the re-ranking fast path), past
    # SQLAlchemy's error hook: its errors must still come out as the store's.
    import pytest

    from db.sqlite_files import DatabaseDamagedError

    path = tmp_path / "library.db"
    store = MetadataStore(f"sqlite:///{path}")
    vecs = np.random.default_rng(0).standard_normal((300, 1280)).astype(np.float32)
    ids, _ = store.write_batch([_row(i) for i in range(300)], vecs)
    store.close()
    data = bytearray(path.read_bytes())
    page = 8192 if len(data) % 8192 == 0 else 4096
    pages = len(data) // page
    for p in range(pages // 3, pages - 1):  # the later pages hold vector rows; scramble their headers
        data[p * page:p * page + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))
    store = MetadataStore(f"sqlite:///{path}", read_only=True)
    with pytest.raises(DatabaseDamagedError):
        store.get_embeddings(ids, 1280)


def test_sqlite_lists_and_counts_ids_without_reading_vectors(tmp_path):
    # An index of the ids alone: listing or counting them must not walk the vectors' pages, in a
    # new file and in a file an earlier engine made without it.
    import sqlite3

    from db.store import ID_SCAN_INDEX

    path = tmp_path / "library.db"
    store = MetadataStore(f"sqlite:///{path}")
    ids, _ = store.write_batch([_row(i) for i in range(5)], np.ones((5, 8), np.float32))
    store.close()
    for made_by_earlier_engine in (False, True):
        if made_by_earlier_engine:
            with sqlite3.connect(path) as conn:
                conn.execute(f"DROP INDEX {ID_SCAN_INDEX}")
            store = MetadataStore(f"sqlite:///{path}")  # a writable open adds it again
            store.close()
        with sqlite3.connect(path) as conn:
            for sql in ("SELECT image_id FROM embeddings ORDER BY image_id", "SELECT count(*) FROM embeddings"):
                plan = " ".join(str(row[-1]) for row in conn.execute("EXPLAIN QUERY PLAN " + sql))
                assert f"COVERING INDEX {ID_SCAN_INDEX}" in plan, plan
    store = MetadataStore(f"sqlite:///{path}", read_only=True)
    assert store.embedding_ids().tolist() == ids and store.count_embeddings() == 5
