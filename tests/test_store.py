import numpy as np

from db import MetadataStore


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
