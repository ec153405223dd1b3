"""engine.metrics against hand-worked cases and brute-force references written the slow, obvious way."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine.errors import DataError
from engine.metrics import (
    calibrate_threshold,
    equal_error_rate,
    knn,
    oneshot_accuracy,
    pair_distances,
    per_class_metrics,
    per_class_metrics_split,
    precision_recall_curve,
    retrieval_metrics,
    retrieval_metrics_split,
    roc_auc,
    roc_curve,
    sample_pairs,
    verification_metrics,
)


def unit(rng, n, d=8):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def angles(*degrees):
    return np.array([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in degrees], np.float32)


# ---------------------------------------------------------------- brute-force references


def ref_average_precision(rel, scores):
    """AP over distinct thresholds, highest first: sum of (recall step) * precision (ties grouped)."""
    total = sum(rel)
    ap, seen_rel, seen = 0.0, 0, 0
    for s in sorted(set(scores), reverse=True):
        group = [r for r, t in zip(rel, scores) if t == s]
        seen += len(group)
        seen_rel += sum(group)
        ap += sum(group) / total * seen_rel / seen
    return ap


def ref_rank(query, q_label, gallery, g_labels, skip=None):
    sims = [(float(np.dot(query.astype(np.float64), g.astype(np.float64))), n) for n, g in enumerate(gallery) if n != skip]
    ranked = sorted(sims, key=lambda t: (-t[0], t[1]))
    return [int(g_labels[n] == q_label) for _, n in ranked], [s for s, _ in ranked]


def ref_scores(rel, scores, ks):
    r = sum(rel)
    out = {}
    for k in ks:
        out[f"recall@{k}"] = float(any(rel[:k]))
        out[f"precision@{k}"] = sum(rel[:k]) / k
    out["r_precision"] = sum(rel[:r]) / r
    out["map@r"] = sum(sum(rel[: i + 1]) / (i + 1) for i in range(r) if rel[i]) / r
    out["map"] = ref_average_precision(rel, scores)
    return out


def ref_mean(rows, ks):
    keys = [f"recall@{k}" for k in ks] + [f"precision@{k}" for k in ks] + ["map@r", "map", "r_precision"]
    out = {key: sum(row[key] for row in rows) / len(rows) for key in keys}
    out["queries"] = len(rows)
    return out


def ref_loo(emb, labels, ks):
    rows = []
    for q in range(len(emb)):
        rel, scores = ref_rank(emb[q], labels[q], emb, labels, skip=q)
        if sum(rel):
            rows.append(ref_scores(rel, scores, ks))
    return ref_mean(rows, ks)


def ref_split(q_emb, q_labels, g_emb, g_labels, ks):
    rows = []
    for q in range(len(q_emb)):
        rel, scores = ref_rank(q_emb[q], q_labels[q], g_emb, g_labels)
        if sum(rel):
            rows.append(ref_scores(rel, scores, ks))
    return ref_mean(rows, ks)


def ref_auc(d, y):
    pos = [a for a, l in zip(d, y) if l == 1]
    neg = [a for a, l in zip(d, y) if l == 0]
    wins = sum(1.0 if p < n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def assert_metrics(got, want):
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-9), key


# ---------------------------------------------------------------- knn


def test_knn_matches_brute_force_in_chunks():
    rng = np.random.default_rng(0)
    q, g = unit(rng, 37), unit(rng, 50)
    scores, ids = knn(q, g, 7, chunk=5)
    sims = q.astype(np.float64) @ g.T.astype(np.float64)
    want = np.argsort(-sims, axis=1)[:, :7]
    assert ids.dtype == np.int64 and scores.dtype == np.float32 and ids.shape == (37, 7)
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_allclose(scores, np.take_along_axis(sims, want, 1), atol=1e-5)
    np.testing.assert_array_equal(knn(q, g, 7)[1], ids)


def test_knn_pads_when_k_exceeds_gallery():
    g = angles(0, 90, 180)
    scores, ids = knn(angles(10), g, 5)
    np.testing.assert_array_equal(ids, [[0, 1, 2, -1, -1]])
    assert np.isneginf(scores[0, 3:]).all() and np.isfinite(scores[0, :3]).all()


def test_knn_exclude_self():
    emb = angles(0, 10, 30, 100)
    scores, ids = knn(emb, emb, 2, exclude_self=True)
    np.testing.assert_array_equal(ids, [[1, 2], [0, 2], [1, 0], [2, 1]])
    scores, ids = knn(emb, emb, 6, exclude_self=True)
    assert (ids[:, 3:] == -1).all() and not (ids[:, :3] == np.arange(4)[:, None]).any()


def test_knn_exclude_self_with_duplicates_never_returns_self():
    # Six identical vectors: faiss may rank any of them first, and the query may fall outside k+1.
    emb = np.vstack([np.tile(angles(0), (6, 1)), angles(90)])
    for k in (1, 3, 6):
        _, ids = knn(emb, emb, k, exclude_self=True)
        assert ids.shape == (7, k)
        assert not (ids == np.arange(7)[:, None]).any()
        assert (ids >= 0).all()
        assert all(len(set(row)) == k for row in ids.tolist())


def test_knn_rejects_bad_input():
    with pytest.raises(DataError):
        knn(np.zeros((0, 4), np.float32), unit(np.random.default_rng(0), 3, 4), 1)
    with pytest.raises(DataError):
        knn(unit(np.random.default_rng(0), 3, 4), np.zeros((0, 4), np.float32), 1)
    with pytest.raises(DataError):
        knn(unit(np.random.default_rng(0), 3, 4), unit(np.random.default_rng(0), 3, 5), 1)
    with pytest.raises(DataError):
        knn(unit(np.random.default_rng(0), 3, 4), unit(np.random.default_rng(0), 4, 4), 1, exclude_self=True)
    with pytest.raises(DataError):
        knn(unit(np.random.default_rng(0), 3, 4), unit(np.random.default_rng(0), 3, 4), 0)


# ---------------------------------------------------------------- retrieval


# A: 0 and 10 degrees; B: 25 and 90 degrees; C: one image at 180 degrees.
HAND = angles(0, 10, 25, 90)
HAND = np.vstack([HAND[:1], HAND[1:3], np.array([[0, 1]], np.float32), np.array([[-1, 0]], np.float32)])
HAND_LABELS = np.array([0, 0, 1, 1, 2])


def test_retrieval_metrics_hand_worked():
    # Rankings: q0 -> 1,2,3,4 (hit first); q1 -> 0,2,3,4 (hit first); q2 -> 1,0,3,4 (hit third);
    # q3 -> 2,1,{0,4} (hit first); q4 has no classmate and is left out.
    got = retrieval_metrics(HAND, HAND_LABELS, ks=(1, 5))
    want = {"recall@1": 0.75, "recall@5": 1.0, "precision@1": 0.75, "precision@5": 0.2,
            "map@r": 0.75, "r_precision": 0.75, "map": (1 + 1 + 1 / 3 + 1) / 4, "queries": 4}
    assert_metrics(got, want)
    assert_metrics(got, ref_loo(HAND, HAND_LABELS, (1, 5)))


def test_retrieval_metrics_ties_break_by_position_and_group_for_ap():
    emb = np.array([[1, 0], [1, 0], [1, 0], [0, 1]], np.float32)
    labels = np.array([0, 1, 0, 1])
    got = retrieval_metrics(emb, labels, ks=(1,))
    # q0 ranks 1,2,3 (tie 1/2 broken by position): miss first; AP credits the tie group {1,2}: 1/2.
    # q1 ranks 0,2,3: AP 1/3. q2 ranks 0,1,3: hit first, AP 1/2. q3 ties all three: AP 1/3.
    assert got["recall@1"] == 0.25
    assert got["map@r"] == 0.25
    assert got["map"] == pytest.approx((0.5 + 1 / 3 + 0.5 + 1 / 3) / 4)
    assert_metrics(got, ref_loo(emb, labels, (1,)))


def test_retrieval_metrics_random_against_brute_force():
    rng = np.random.default_rng(1)
    emb = unit(rng, 60, 6)
    labels = rng.integers(0, 7, 60)
    labels[0] = 99  # one singleton class
    ks = (1, 3, 10, 100)
    assert_metrics(retrieval_metrics(emb, labels, ks), ref_loo(emb, labels, ks))


def test_retrieval_metrics_blocks_do_not_change_results(monkeypatch):
    import engine.metrics as m

    rng = np.random.default_rng(2)
    emb, labels = unit(rng, 40), rng.integers(0, 4, 40)
    whole = retrieval_metrics(emb, labels)
    monkeypatch.setattr(m, "_BLOCK_ELEMENTS", 90)  # two queries per block
    assert retrieval_metrics(emb, labels) == whole


def test_map_matches_sklearn():
    sklearn = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    emb, labels = unit(rng, 30), rng.integers(0, 3, 30)
    sims = emb @ emb.T
    aps = [sklearn.average_precision_score(labels[np.arange(30) != q] == labels[q], sims[q][np.arange(30) != q])
           for q in range(30)]
    assert retrieval_metrics(emb, labels)["map"] == pytest.approx(np.mean(aps), abs=1e-9)


def test_map_at_r_matches_pytorch_metric_learning():
    pytest.importorskip("pytorch_metric_learning")
    import torch
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    rng = np.random.default_rng(4)
    emb, labels = unit(rng, 80, 8), rng.integers(0, 5, 80)
    calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r", "r_precision"),
                              k="max_bin_count", device=torch.device("cpu"))
    x, y = torch.from_numpy(emb), torch.from_numpy(labels)
    theirs = calc.get_accuracy(x, y, x, y, ref_includes_query=True)
    ours = retrieval_metrics(emb, labels)
    assert ours["map@r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-6)
    assert ours["r_precision"] == pytest.approx(theirs["r_precision"], abs=1e-6)
    assert ours["recall@1"] == pytest.approx(theirs["precision_at_1"], abs=1e-6)


def test_retrieval_k_beyond_gallery_and_one_class():
    emb = angles(0, 20, 50)
    got = retrieval_metrics(emb, np.zeros(3, np.int64), ks=(1, 5))
    # Every other image is a hit; precision@5 still divides by 5.
    assert got["recall@1"] == got["recall@5"] == got["map@r"] == got["map"] == 1.0
    assert got["precision@5"] == pytest.approx(2 / 5)


def test_retrieval_queries_mask():
    got = retrieval_metrics(HAND, HAND_LABELS, ks=(1,), queries_mask=np.array([0, 0, 1, 1, 1], bool))
    assert got["queries"] == 2 and got["recall@1"] == 0.5


def test_retrieval_errors():
    with pytest.raises(DataError):
        retrieval_metrics(np.zeros((0, 3), np.float32), np.zeros(0, np.int64))
    with pytest.raises(DataError, match="two images"):
        retrieval_metrics(angles(0, 90), np.array([0, 1]))
    with pytest.raises(DataError):
        retrieval_metrics(angles(0, 90), np.array([0, 1, 2]))
    with pytest.raises(DataError):
        retrieval_metrics(np.array([[np.nan, 0]], np.float32), np.array([0]))
    with pytest.raises(DataError):
        retrieval_metrics(angles(0, 90), np.array([0, 0]), ks=(0,))


def test_retrieval_split_against_brute_force():
    rng = np.random.default_rng(5)
    q, g = unit(rng, 25), unit(rng, 30)
    ql, gl = rng.integers(0, 6, 25), rng.integers(0, 5, 30)  # class 5 has no gallery item
    ks = (1, 5, 40)
    got = retrieval_metrics_split(q, ql, g, gl, ks)
    assert_metrics(got, ref_split(q, ql, g, gl, ks))
    assert got["queries"] == int((ql != 5).sum())


def test_per_class_metrics_worst_first():
    rows = per_class_metrics(HAND, HAND_LABELS, ["A", "B", "C"])
    assert [r["class"] for r in rows] == ["B", "A", "C"]
    assert rows[0] == {"class": "B", "label": 1, "images": 2, "queries": 2, "recall@1": 0.5, "map@r": 0.5,
                       "confused_with": "A"}
    assert rows[1]["recall@1"] == 1.0 and rows[1]["map@r"] == 1.0 and rows[1]["confused_with"] is None
    assert rows[2]["queries"] == 0 and rows[2]["recall@1"] is None and rows[2]["map@r"] is None


def test_per_class_metrics_split_counts_both_sides():
    rows = per_class_metrics_split(HAND[[0, 2]], HAND_LABELS[[0, 2]], HAND[[1, 3]], HAND_LABELS[[1, 3]])
    # q0 (A) -> 1 (A) then 3; q2 (B) -> 1 (A) then 3 (B).
    by = {r["label"]: r for r in rows}
    assert by[0]["recall@1"] == 1.0 and by[1]["recall@1"] == 0.0 and by[1]["map@r"] == 0.0
    assert by[0]["images"] == 2 and by[1]["confused_with"] == "0"


def test_oneshot_accuracy():
    support = angles(0, 90, 180)
    queries = angles(10, 80, 100, 170, 46)
    labels = np.array([0, 1, 1, 2, 1])  # 46 degrees is nearer 90 than 0
    assert oneshot_accuracy(queries, labels, support, np.array([0, 1, 2])) == 1.0
    assert oneshot_accuracy(queries, np.array([0, 1, 2, 2, 0]), support, np.array([0, 1, 2])) == 0.6
    with pytest.raises(DataError):
        oneshot_accuracy(queries, np.array([0, 1, 1, 3, 1]), support, np.array([0, 1, 2]))


# ---------------------------------------------------------------- pairs


def test_pair_distances_exact():
    a = np.array([[1, 0], [1, 0], [1, 0], [0.6, 0.8]], np.float32)
    b = np.array([[1, 0], [0, 1], [-1, 0], [0.6, 0.8]], np.float32)
    d = pair_distances(a, b)
    assert d.dtype == np.float32
    np.testing.assert_allclose(d, [0, math.sqrt(2), 2, 0], atol=1e-6)
    # A cosine that rounds above 1 must give 0, not NaN.
    assert pair_distances(np.array([[1.0000001, 0]], np.float32), np.array([[1.0000001, 0]], np.float32))[0] == 0
    with pytest.raises(DataError):
        pair_distances(a, b[:2])


def test_sample_pairs_balanced_and_deterministic():
    labels = np.array([0, 0, 0, 1, 1, 2, 3, 3, 3, 3])  # class 2 is a singleton
    i, j, same = sample_pairs(labels, 501, seed=7)
    assert i.dtype == j.dtype == same.dtype == np.int64 and i.shape == (501,)
    assert same.sum() == 251
    assert (i != j).all()
    np.testing.assert_array_equal(same, (labels[i] == labels[j]).astype(np.int64))
    assert not np.isin(np.concatenate([i[same == 1], j[same == 1]]), [5]).any()
    again = sample_pairs(labels, 501, seed=7)
    for x, y in zip((i, j, same), again):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(sample_pairs(labels, 501, seed=8)[0], i)
    # Each eligible image takes part as the first of a positive pair.
    assert set(i[same == 1].tolist()) == {0, 1, 2, 3, 4, 6, 7, 8, 9}


def test_sample_pairs_errors():
    with pytest.raises(DataError):
        sample_pairs(np.zeros(5, np.int64), 10)
    with pytest.raises(DataError):
        sample_pairs(np.arange(5), 10)
    with pytest.raises(DataError):
        sample_pairs(np.zeros(0, np.int64), 10)


# ---------------------------------------------------------------- verification


D4 = np.array([0.1, 0.2, 0.3, 0.4])


def test_roc_curve_against_brute_force():
    rng = np.random.default_rng(6)
    d = np.round(rng.random(40), 1)  # many ties
    y = rng.integers(0, 2, 40)
    fpr, tpr, thresholds = roc_curve(d, y)
    assert thresholds[0] == -np.inf and fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    for f, t, th in zip(fpr, tpr, thresholds):
        called = d <= th
        assert t == pytest.approx(called[y == 1].mean())
        assert f == pytest.approx(called[y == 0].mean())
    assert roc_auc(d, y) == pytest.approx(ref_auc(d, y))
    # With ties drawn as diagonal steps, the trapezoid area is the Mann-Whitney AUC.
    assert np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2) == pytest.approx(roc_auc(d, y))


def test_roc_auc_hand_worked_and_ties():
    assert roc_auc(D4, [1, 0, 1, 0]) == 0.75
    assert roc_auc([0.5, 0.5], [1, 0]) == 0.5
    assert roc_auc(D4, [1, 1, 0, 0]) == 1.0
    assert roc_auc(D4, [0, 0, 1, 1]) == 0.0


def test_precision_recall_curve():
    precision, recall, thresholds = precision_recall_curve(D4, [1, 0, 1, 0])
    np.testing.assert_allclose(precision, [1, 0.5, 2 / 3, 0.5])
    np.testing.assert_allclose(recall, [0.5, 0.5, 1, 1])
    np.testing.assert_allclose(thresholds, D4)


def test_equal_error_rate():
    assert equal_error_rate(D4, [1, 1, 0, 0]) == (0.0, pytest.approx(0.2))
    assert equal_error_rate(D4, [1, 0, 1, 0]) == (0.5, pytest.approx(0.2))
    # Crossing between ROC points: (fpr 0, fnr .5) at 0.1 and (fpr 1, fnr .5) at 0.2.
    eer, threshold = equal_error_rate([0.1, 0.2, 0.3], [1, 0, 1])
    assert eer == pytest.approx(0.5) and threshold == pytest.approx(0.15)


def test_calibrate_threshold_maximises_accuracy():
    assert calibrate_threshold(D4, [1, 1, 0, 0]) == pytest.approx(0.25)
    assert calibrate_threshold(D4, [1, 0, 1, 0]) == pytest.approx(0.15)  # first of two equal optima
    assert calibrate_threshold(D4, [0, 0, 1, 1]) < 0.1  # best is to call nothing similar
    rng = np.random.default_rng(9)
    d, y = rng.random(50), rng.integers(0, 2, 50)
    best = calibrate_threshold(d, y)
    candidates = np.concatenate([[-1.0], np.sort(d)])
    assert ((d <= best) == (y == 1)).mean() == max(((d <= t) == (y == 1)).mean() for t in candidates)


def test_verification_metrics():
    got = verification_metrics(D4, [1, 0, 1, 0], threshold=0.25)
    assert got["threshold"] == 0.25 and got["best_threshold"] == pytest.approx(0.15)
    assert (got["accuracy"], got["precision"], got["recall"], got["f1"]) == (0.5, 0.5, 0.5, 0.5)
    assert got["roc_auc"] == 0.75 and got["eer"] == 0.5 and got["pairs"] == 4 and got["positives"] == 2
    best = verification_metrics(D4, [1, 0, 1, 0])
    assert best["threshold"] == pytest.approx(0.15)
    assert (best["accuracy"], best["precision"], best["recall"]) == (0.75, 1.0, 0.5)
    assert best["f1"] == pytest.approx(2 / 3)
    nothing = verification_metrics(D4, [1, 0, 1, 0], threshold=0.0)
    assert nothing["precision"] == nothing["recall"] == nothing["f1"] == 0.0


def test_verification_errors():
    for d, y in (([], []), (D4, [1, 1, 1, 1]), (D4, [1, 0, 2, 0]), (D4, [1, 0]), ([0.1, np.nan], [1, 0])):
        with pytest.raises(DataError):
            verification_metrics(d, y)
