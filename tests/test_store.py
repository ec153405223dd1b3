import numpy as np

from db import MetadataStore
from db.store import SCHEMA_VERSION


def _row(i, h=None):
    return {"path": f"/p/{i}.jpg", "content_hash": h or f"{i:064x}", "bytes": 10 + i, "mtime": 1.5 + i,
            "width": 4, "height": 3, "format": "JPEG"}


def test_batch_write_returns_row_ids_and_vectors_round_trip(tmp_path):
    store = MetadataStore.for_file(tmp_path / "l.db")
    vecs = np.arange(12, dtype=np.float32).reshape(3, 4)
    ids, gone = store.write_batch([_row(0), _row(1), _row(2)], vecs)
    assert gone == [] and len(ids) == 3
    got_ids, got = store.get_embeddings(ids[::-1], 4)
    order = np.argsort(got_ids)
    np.testing.assert_array_equal(got[order], vecs)
    recs = store.get_images(ids)
    assert [recs[i].path for i in ids] == ["/p/0.jpg", "/p/1.jpg", "/p/2.jpg"]
    assert store.generation() == 1


def test_ids_never_reused_after_delete(tmp_path):
    store = MetadataStore.for_file(tmp_path / "l.db")
    ids, _ = store.write_batch([_row(0), _row(1)], np.zeros((2, 2), np.float32))
    assert store.remove_paths(["/p/1.jpg"]) == [ids[1]]
    new, _ = store.write_batch([_row(5)], np.zeros((1, 2), np.float32))
    assert new[0] > ids[1]


def test_alias_inherits_row_when_canonical_path_removed(tmp_path):
    store = MetadataStore.for_file(tmp_path / "l.db")
    ids, _ = store.write_batch([_row(0)], np.ones((1, 2), np.float32),
                               aliases=[{"path": "/p/copy.jpg", "bytes": 10, "mtime": 9.0, "new_row": 0}])
    assert store.lookup_paths(["/p/copy.jpg"])["/p/copy.jpg"].image_id == ids[0]
    assert store.remove_paths(["/p/0.jpg"]) == []  # the alias carries the row on
    assert store.get_images(ids)[ids[0]].path == "/p/copy.jpg"
    assert store.remove_paths(["/p/copy.jpg"]) == ids
    assert store.count() == 0 and store.count_embeddings() == 0


def test_non_utf8_path_round_trips(tmp_path):
    store = MetadataStore.for_file(tmp_path / "l.db")
    weird = "/p/caf\udce9.jpg"  # the byte 0xE9 alone, as os.fsdecode gives it
    ids = store.insert_rows([dict(_row(0), path=weird)])
    assert store.get_images(ids)[ids[0]].path == weird
    assert weird in store.lookup_paths([weird])


def test_malformed_vectors_and_file_stats_for_doctor(tmp_path):
    import contextlib
    import sqlite3

    store = MetadataStore.for_file(tmp_path / "l.db")
    ids, _ = store.write_batch([_row(0), _row(1), _row(2)], np.zeros((3, 4), np.float32),
                               aliases=[{"path": "/p/copy.jpg", "bytes": 10, "mtime": 9.0, "new_row": 0}])
    assert store.malformed_embedding_ids(4) == []
    assert store.malformed_embedding_ids(3) == ids  # every vector is the wrong size for 3-d
    with contextlib.closing(sqlite3.connect(tmp_path / "l.db")) as conn, conn:  # damage from outside
        conn.execute("UPDATE embeddings SET vector = ? WHERE image_id = ?", (b"\0" * 12, ids[1]))
    assert store.malformed_embedding_ids(4) == [ids[1]]
    assert sorted(store.file_stats()) == sorted([("/p/0.jpg", 10, 1.5), ("/p/1.jpg", 11, 2.5), ("/p/2.jpg", 12, 3.5),
                                                 ("/p/copy.jpg", 10, 9.0)])


def test_on_commit_runs_at_every_write_transaction(tmp_path):
    store = MetadataStore.for_file(tmp_path / "l.db")
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


def test_opening_a_new_database_while_another_process_creates_it(tmp_path, monkeypatch):
    """The race of two processes opening one new library: this one checked for the tables before
    the other created them, so its CREATE TABLE fails; it must open the database all the same."""
    from sqlalchemy.dialects.sqlite.base import SQLiteDialect

    winner = MetadataStore.for_file(tmp_path / "l.db")
    winner.write_batch([_row(0)], np.zeros((1, 2), np.float32))
    real_has_table = SQLiteDialect.has_table
    lied: set[str] = set()

    def stale_has_table(self, connection, table_name, schema=None, **kw):
        if table_name not in lied:  # the answer from before the winner's CREATE TABLE
            lied.add(table_name)
            return False
        return real_has_table(self, connection, table_name, schema=schema, **kw)

    monkeypatch.setattr(SQLiteDialect, "has_table", stale_has_table)
    loser = MetadataStore.for_file(tmp_path / "l.db")
    assert lied and loser.count() == 1 and loser.get_meta("schema_version") == SCHEMA_VERSION
