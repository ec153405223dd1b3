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
