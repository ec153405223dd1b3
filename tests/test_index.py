import numpy as np
import pytest

from engine.errors import CorruptFileError, EngineError
from engine.index import VectorIndex


def _unit(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_flat_search_matches_brute_force_with_row_ids():
    rng = np.random.default_rng(0)
    x = _unit(rng, 200, 16)
    ids = np.arange(1000, 1200, dtype=np.int64) * 7
    index = VectorIndex.build(16)
    index.add(x, ids)
    q = _unit(rng, 5, 16)
    scores, got = index.search(q, 10)
    ref = q @ x.T
    order = np.argsort(-ref, axis=1)[:, :10]
    np.testing.assert_array_equal(got, ids[order])
    np.testing.assert_allclose(scores, np.take_along_axis(ref, order, 1), rtol=1e-5, atol=1e-5)


def test_k_beyond_ntotal_pads_with_minus_one():
    rng = np.random.default_rng(1)
    index = VectorIndex.build(8)
    index.add(_unit(rng, 3, 8), np.array([5, 6, 7]))
    scores, ids = index.search(_unit(rng, 2, 8), 5)
    assert (ids[:, 3:] == -1).all() and np.isneginf(scores[:, 3:]).all()
    assert sorted(ids[0, :3]) == [5, 6, 7]


def test_remove_and_ids_and_atomic_save_roundtrip(tmp_path):
    rng = np.random.default_rng(2)
    x = _unit(rng, 10, 8)
    index = VectorIndex.build(8)
    index.add(x, np.arange(10))
    assert index.remove([3, 4, 99]) == 2
    assert sorted(index.ids().tolist()) == [0, 1, 2, 5, 6, 7, 8, 9]
    path = index.save(tmp_path / "i.faiss")
    assert [p.name for p in tmp_path.iterdir()] == ["i.faiss"]  # no temp file left behind
    loaded = VectorIndex.load(path)
    np.testing.assert_array_equal(loaded.search(x[:2], 3)[1], index.search(x[:2], 3)[1])


def test_corrupt_file_and_bad_input_raise_project_errors(tmp_path):
    bad = tmp_path / "i.faiss"
    bad.write_bytes(b"not an index")
    with pytest.raises(CorruptFileError, match="doctor --repair"):
        VectorIndex.load(bad)
    with pytest.raises(EngineError):
        VectorIndex.build(8, "NoSuchIndex")
    with pytest.raises(EngineError):
        VectorIndex.build(8).add(np.zeros((2, 4), np.float32), np.arange(2))


def _with_ids(factory: str, n: int = 60, d: int = 8, seed: int = 3) -> tuple[VectorIndex, np.ndarray, np.ndarray]:
    x = _unit(np.random.default_rng(seed), n, d)
    ids = np.arange(100, 100 + n, dtype=np.int64) * 3
    index = VectorIndex.build(d, factory)
    index.train(x)
    index.add(x, ids)
    return index, x, ids


def test_removal_capability_is_the_index_types_own_fact():
    """Flat, IVF and PQ remove by id; HNSW cannot, and says so with the project's error, before
    touching anything."""
    for factory in ("Flat", "IVF4,Flat", "PQ4x4"):
        index, _, ids = _with_ids(factory)
        assert index.supports_removal, factory
        assert index.remove(ids[:5]) == 5 and index.ntotal == len(ids) - 5, factory
    hnsw, _, ids = _with_ids("HNSW8")
    assert not hnsw.supports_removal
    with pytest.raises(EngineError, match="cannot remove"):
        hnsw.remove(ids[:2])
    assert hnsw.ntotal == len(ids) and sorted(hnsw.ids().tolist()) == ids.tolist()
    assert hnsw.remove([]) == 0  # nothing to remove is never an error


def test_replace_with_takes_over_vectors_type_and_capability():
    hnsw, x, ids = _with_ids("HNSW8")
    holder = hnsw  # another reference to the same object sees the replacement too
    flat = VectorIndex.build(8)
    flat.add(x[10:], ids[10:])
    hnsw.replace_with(flat)
    assert holder.factory == "Flat" and holder.supports_removal and holder.ntotal == len(ids) - 10
    q = _unit(np.random.default_rng(4), 3, 8)
    ref = q @ x[10:].T
    np.testing.assert_array_equal(holder.search(q, 5)[1], ids[10:][np.argsort(-ref, axis=1)[:, :5]])


def test_reconstruct_is_exact_on_flat_only():
    flat, x, ids = _with_ids("Flat")
    assert flat.is_exact
    picked = np.array([5, 0, 17])
    np.testing.assert_array_equal(flat.reconstruct(ids[picked]), x[picked])
    assert flat.reconstruct([]).shape == (0, 8)
    with pytest.raises(EngineError):
        flat.reconstruct([7])  # an id the index does not hold
    pq, _, _ = _with_ids("PQ4x4")
    assert not pq.is_exact


def test_search_parameters_apply_or_raise_the_projects_error():
    ivf, x, ids = _with_ids("IVF4,Flat", n=200)
    ivf.set_search_parameters("nprobe=4")  # every list searched: exact
    q = _unit(np.random.default_rng(5), 4, 8)
    np.testing.assert_array_equal(ivf.search(q, 3)[1], ids[np.argsort(-(q @ x.T), axis=1)[:, :3]])
    with pytest.raises(EngineError):
        _with_ids("Flat")[0].set_search_parameters("efSearch=64")


def test_untrainable_index_and_foreign_file_raise_project_errors(tmp_path):
    import faiss

    with pytest.raises(EngineError, match="cannot train"):
        VectorIndex.build(8, "IVF64,Flat").train(_unit(np.random.default_rng(6), 10, 8))
    plain = tmp_path / "plain.faiss"
    faiss.write_index(faiss.IndexFlatIP(8), str(plain))  # a FAISS file without row ids
    with pytest.raises(CorruptFileError, match="no row ids"):
        VectorIndex.load(plain)


def test_library_reconcile_rebuilds_an_index_that_cannot_remove(tmp_path):
    """Stale ids in an HNSW index: reconcile cannot remove them, so the caller's index object is
    replaced in place by one rebuilt from the stored embeddings."""
    from engine.library import Library

    x = _unit(np.random.default_rng(7), 12, 8)
    lib = Library(tmp_path / "home", device="cpu")
    lib.store.set_meta("model", {"spec": "pretrained", "identity": "x", "backbone": "none", "dim": 8,
                                 "input_size": [3, 8, 8]})
    lib.store.set_meta("index_factory", "HNSW8")
    rows = [{"path": f"/p/{i}.jpg", "content_hash": f"{i:064x}", "bytes": 1, "mtime": 1.0} for i in range(12)]
    ids = np.asarray(lib.store.write_batch(rows, x)[0], np.int64)
    index = lib.rebuild_index()
    assert index.factory == "HNSW8" and not index.supports_removal
    lib.store.remove_paths(["/p/0.jpg", "/p/1.jpg"])
    assert lib.reconcile(index) == (10, 2)
    assert sorted(index.ids().tolist()) == ids[2:].tolist() == lib.store.embedding_ids().tolist()
    q = x[2:5]
    assert index.search(q, 1)[1][:, 0].tolist() == ids[2:5].tolist()
    lib.close()
