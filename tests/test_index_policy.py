"""The index policy (``engine.index_policy``), the tuning to a recall target
(``engine.index_tuning``) and exact re-ranking (``engine.rerank``), on small synthetic clustered
vectors: the policy's thresholds are scale-free (n x dim, bytes a vector, a memory budget), so a
small budget and Flat limit put a few thousand 32-d vectors on the rungs a million 1280-d photos
reach. Every recall is checked against brute-force exact search."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.synthetic import SyntheticEmbeddings
from db.vectors import as_stored
from engine.index import SearchSettings, VectorIndex
from engine.index_policy import (FLAT_MAX_ELEMENTS, PHOTO_BYTES_TARGET, ROW_BYTES, STORED_BYTES_PER_DIM,
                                 choose_index, list_count, next_plan, parse_bytes, training_size)
from engine.index_tuning import ExactNeighbours, TuningConfig, held_out_ids, recall_at, tune_index
from engine.rerank import rerank, search_exact

G, M = 1 << 30, 1 << 20


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


@pytest.mark.parametrize("rows, dim, budget, factory", [
    (0, 1280, 6 * G, "Flat"),
    (10_000, 1280, 6 * G, "Flat"),
    (FLAT_MAX_ELEMENTS // 1280, 1280, 6 * G, "Flat"),  # the last exact row count at 1280-d
    (FLAT_MAX_ELEMENTS // 1280 + 1, 1280, 6 * G, "IVF512,PQ160np"),
    (1_000_000, 1280, 6 * G, "IVF4096_HNSW32,PQ160np"),  # 168 B a vector: SQ8's 1288 would break 4 KB a photo
    (1_000_000, 1280, 64 * M, "IVF4096_HNSW32,PQ20np"),  # a short budget: smaller codes
    (10_000_000, 1280, 6 * G, "IVF16384_HNSW32,PQ160np"),
    (100_000_000, 1280, 6 * G, "IVF32768_HNSW32,PQ40np"),
    (1_000_000, 768, 6 * G, "IVF4096_HNSW32,SQ8"),  # a byte a dimension fits at 768-d
    (300_000, 96, 6 * G, "Flat"),
    (1_000_000, 96, 6 * G, "IVF4096_HNSW32,Flat"),  # small vectors: an exact copy fits the per-photo target
    (10_000_000, 96, 6 * G, "IVF16384_HNSW32,Flat"),
    (10_000_000, 96, 1 * G, "IVF16384_HNSW32,SQ8"),  # ... unless the budget is short
    (10_000_000, 96, G // 2, "IVF16384_HNSW32,PQ12np"),  # ... or shorter
    (300_000, 96, 64 * M, "IVF2048,SQ8"),  # Flat would not fit 64 MB
])
def test_the_policy_table(rows, dim, budget, factory):
    plan = choose_index(rows, dim, budget)
    assert plan.factory == factory, plan
    assert plan.rerank == ("PQ" in factory or "SQ" in factory)  # compressed scores are re-ranked, exact ones not
    assert plan.reason


def test_every_plan_builds_fits_the_photo_target_and_the_budget():
    for dim in (32, 96, 256, 1280):
        for rows in (10, 5_000, 40_000, 300_000, 1_000_000, 30_000_000):
            for budget in (64 * M, 6 * G):
                plan = choose_index(rows, dim, budget)
                VectorIndex.build(dim, plan.factory)  # FAISS takes the factory string
                if plan.rung != "flat":  # past Flat: the whole photo within the target on disk
                    assert plan.bytes_per_vector + STORED_BYTES_PER_DIM * dim + ROW_BYTES <= PHOTO_BYTES_TARGET, plan
                if "over the" not in plan.reason:
                    assert rows * plan.bytes_per_vector <= budget, plan
    # the issue's target: 1M photos x 1280-d within 4 KB each and a small share of RAM
    plan = choose_index(1_000_000, 1280, 6 * G)
    assert plan.bytes_per_vector + 2 * 1280 + ROW_BYTES <= 4096 and 1_000_000 * plan.bytes_per_vector < G


def test_graphs_only_for_libraries_that_never_remove():
    assert choose_index(1_000_000, 96, 6 * G, allow_graph=True).factory == "HNSW32"
    assert choose_index(1_000_000, 96, 6 * G).factory == "IVF4096_HNSW32,Flat"
    assert choose_index(1_000_000, 1280, 6 * G, allow_graph=True).rung != "hnsw"  # 5.4 KB a vector: too big


def test_list_count_is_a_trainable_power_of_two_near_four_root_n():
    for rows in (1, 50, 1_000, 27_000, 100_000, 1_000_000, 10 ** 9):
        lists = list_count(rows)
        assert lists & (lists - 1) == 0 and 1 <= lists <= 1 << 16
        assert lists == 1 or lists * 39 <= rows
        if rows >= 100_000:
            assert 4 * math.sqrt(rows) / 2 ** 0.5 <= lists <= 4 * math.sqrt(rows) * 2 ** 0.5 or lists == 1 << 16
    assert training_size("IVF4096,PQ160np", 1_000_000) == 40 * 4096
    assert training_size("IVF64,Flat", 3000) == 3000


def test_growth_rebuilds_at_geometric_steps():
    """Growing one vector at a time to 20M rebuilds each vector a bounded number of times: the
    moves come at about x4 steps (a list count doubling), never at every batch."""
    factory, built, rebuilt, moves = "Flat", 0, 0, 0
    rows = 1
    while rows < 20_000_000:
        plan = next_plan(factory, built, rows, 1280, 6 * G)
        if plan is not None:
            factory, built, rebuilt, moves = plan.factory, rows, rebuilt + rows, moves + 1
        rows = int(rows * 1.02) + 1
    assert moves <= 8 and rebuilt <= 2 * rows
    # shrinking a little keeps the index; shrinking far moves it down
    plan = choose_index(1_000_000, 1280, 6 * G)
    assert next_plan(plan.factory, 1_000_000, 900_000, 1280, 6 * G) is None
    assert next_plan(plan.factory, 1_000_000, 1_000_000, 1280, 6 * G) is None
    assert next_plan(plan.factory, 1_000_000, 20_000, 1280, 6 * G).factory == "Flat"


def test_parse_bytes():
    assert parse_bytes("4G") == 4 * G and parse_bytes("512m") == 512 * M and parse_bytes("1.5GiB") == 3 * G // 2
    assert parse_bytes("1000") == 1000 and parse_bytes(" 2 KB ") == 2048
    for bad in ("", "G", "-1G", "4 gigs", "0"):
        with pytest.raises(ValueError):
            parse_bytes(bad)


# -- tuning -------------------------------------------------------------------------------------
class ArrayStore:
    """The one method of MetadataStore re-ranking and tuning use, over arrays: ids int64 [N], vectors [N, D]."""

    def __init__(self, ids: np.ndarray, vectors: np.ndarray):
        self.rows = dict(zip(ids.tolist(), vectors))
        self.calls = 0

    def get_stored(self, ids, dim):
        self.calls += 1
        held = [i for i in ids if int(i) in self.rows]
        return (np.asarray(held, np.int64),
                np.stack([self.rows[int(i)] for i in held]) if held else np.zeros((0, dim), np.float32))


def _data(n: int = 12_000, dim: int = 32, seed: int = 0):
    gen = SyntheticEmbeddings(dim, seed=seed, clusters=48, intrinsic=12)
    x = gen.sample(n, seed=1)
    ids = np.arange(n, dtype=np.int64) * 3 + 7
    return gen, x, ids


def _built(factory: str, x: np.ndarray, ids: np.ndarray) -> VectorIndex:
    index = VectorIndex.build(x.shape[1], factory)
    index.train(x[np.random.default_rng(0).choice(len(x), min(len(x), 8000), replace=False)])
    index.add(x, ids)
    return index


def _tuned(index: VectorIndex, x: np.ndarray, ids: np.ndarray, target: float, queries: int = 300) -> SearchSettings:
    store = ArrayStore(ids, x)
    query_ids = held_out_ids(ids, queries, seed=2)
    q = x[(query_ids - 7) // 3]
    truth = ExactNeighbours(q, query_ids, 10)
    for start in range(0, len(ids), 5000):
        truth.add(ids[start:start + 5000], x[start:start + 5000])
    return tune_index(index, lambda wanted: store.get_stored(wanted, x.shape[1]), q, query_ids, truth,
                      TuningConfig(target=target))


def _fresh_recall(index: VectorIndex, gen: SyntheticEmbeddings, x: np.ndarray, ids: np.ndarray, k: int = 10) -> float:
    """Recall@k of the whole search (re-ranking included) for 300 new photos, against brute force."""
    q = gen.sample(300, seed=77)
    exact = np.sort(q @ x.T, axis=1)[:, -k]
    scores, found = search_exact(ArrayStore(ids, x), index, q, k)
    assert set(found[found >= 0].tolist()) <= set(ids.tolist())
    return float(np.mean(scores >= exact[:, None] - 1e-5))


def test_exact_neighbours_match_brute_force_and_leave_each_query_out():
    _, x, ids = _data(3000, 16)
    query_ids = ids[[5, 40, 2999]]
    q = x[[5, 40, 2999]]
    truth = ExactNeighbours(q, query_ids, 7)
    for start in range(0, 3000, 700):  # chunks that do not divide evenly
        truth.add(ids[start:start + 700], x[start:start + 700])
    scores = q @ x.T
    scores[[0, 1, 2], [5, 40, 2999]] = -np.inf
    order = np.argsort(-scores, axis=1)[:, :7]
    assert [sorted(r) for r in truth.ids.tolist()] == [sorted(r) for r in ids[order].tolist()]
    np.testing.assert_allclose(truth.kth_scores(), np.take_along_axis(scores, order, 1)[:, -1], rtol=1e-6)


@pytest.mark.parametrize("factory", ["IVF64,Flat", "IVF64,SQ8", "IVF64,SQ4", "IVF64,PQ4np", "IVF64,PQ16x4fs",
                                     "HNSW16"])
def test_tuning_reaches_the_target_against_exact_search(factory):
    gen, x, ids = _data()
    index = _built(factory, x, ids)
    settings = _tuned(index, x, ids, 0.95)
    assert settings.recall >= 0.95 and settings.target == 0.95 and settings.queries == 300
    assert index.settings == settings and (settings.rerank > 0) == (not index.exact_scores)
    assert _fresh_recall(index, gen, x, ids) >= 0.93  # new photos, measured independently


def test_a_lower_target_buys_a_cheaper_search_and_settings_survive_a_save(tmp_path):
    _, x, ids = _data()
    index = _built("IVF64,PQ4np", x, ids)
    high = _tuned(index, x, ids, 0.99)
    low = _tuned(index, x, ids, 0.6)
    nprobe = lambda s: int(s.params.split(",")[0].split("=")[1])  # noqa: E731
    assert low.recall >= 0.6 and high.recall >= 0.99
    assert (nprobe(low), low.rerank) != (nprobe(high), high.rerank)
    assert nprobe(low) <= nprobe(high) and low.rerank <= high.rerank
    assert SearchSettings.from_dict(high.to_dict()) == high
    for bad in (None, [], {"params": "nprobe=4;rm -rf"}, {"rerank": "lots"}, {"recall": [1]}):
        assert SearchSettings.from_dict(bad) is None


def test_rerank_scores_exactly_and_drops_ids_no_longer_stored():
    _, x, ids = _data(500, 16)
    store = ArrayStore(ids[:-50], x[:-50])  # the last 50 were removed since the index was read
    q = x[:3]
    candidates = np.stack([ids[[0, 499, 1, 2]], ids[[3, 1, 480, 0]], np.array([-1, ids[2], -1, ids[7]])])
    scores, got = rerank(store, q, candidates, 16)
    for row in range(3):
        kept = [i for i in candidates[row].tolist() if i >= 0 and i in store.rows]
        expected = sorted(kept, key=lambda i: -float(x[(i - 7) // 3] @ q[row]))
        assert got[row, :len(kept)].tolist() == expected and (got[row, len(kept):] == -1).all()
        np.testing.assert_allclose(scores[row, :len(kept)], [x[(i - 7) // 3] @ q[row] for i in expected], rtol=1e-6)
    assert store.calls == 1  # one fetch for all queries


def test_rerank_widens_float16_stored_vectors_as_the_store_reads_them():
    _, x, ids = _data(300, 16)
    store = ArrayStore(ids, x.astype(np.float16))  # what MetadataStore.get_stored returns
    q = x[:4]
    candidates = np.stack([ids[[5, 0, 9]], ids[[1, 2, 3]], ids[[7, 4, 8]], ids[[6, 3, 0]]])
    scores, got = rerank(store, q, candidates, 16)
    for row in range(4):
        expected = as_stored(x[(got[row] - 7) // 3]) @ q[row]  # decode_vectors' values: unit rows kept unit
        np.testing.assert_allclose(scores[row], expected, rtol=1e-6)
        assert list(scores[row]) == sorted(scores[row], reverse=True)


def test_recall_counts_ties_as_found():
    kth = np.array([0.5, 0.9], np.float32)
    scores = np.array([[0.9, 0.5, 0.1], [0.95, 0.8, 0.85]], np.float32)  # 0.5 ties the k-th: found
    assert recall_at(np.zeros((2, 3), np.int64), scores, kth, 2, 3) == 0.75
    assert recall_at(np.zeros((2, 3), np.int64), scores, kth, 2, 1) == 0.5  # only the first candidate re-ranked


def test_a_setting_reaches_the_target_only_beyond_the_samples_margin_of_error():
    from engine.index_tuning import reaches

    assert not reaches(0.95, 4000, 0.95)  # exactly the target on a sample: as likely short as not
    assert reaches(0.96, 4000, 0.95)  # 0.96 - 1.645 * 0.0031 = 0.9549
    assert not reaches(0.96, 400, 0.95)  # the same recall on a tenth of the hits is not enough
    assert reaches(1.0, 10, 1.0) and reaches(1.0, 1, 0.99)  # perfect recall has no error to allow for
    assert not reaches(0.999, 10**6, 1.0)
