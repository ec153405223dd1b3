"""The losses and miners of train.losses against naive loops over small hand-made embeddings."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from engine.errors import DataError
from train.losses import LOSSES, MINERS, MS_ALPHA, MS_BASE, MS_BETA, MetricLoss, active_share, build_loss


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _unit(angles_deg):
    """Points on the unit circle: float32 [N, 2]."""
    a = np.radians(np.asarray(angles_deg, np.float64))
    return torch.tensor(np.stack([np.cos(a), np.sin(a)], 1), dtype=torch.float32)


# Three classes of two, placed so that some triplets are easy, some semi-hard and some hard.
EMB = _unit([0, 20, 50, 100, 170, 200])
LAB = torch.tensor([0, 0, 1, 1, 2, 0])


def _d(e, i, j) -> float:
    return float(np.linalg.norm(e[i].numpy().astype(np.float64) - e[j].numpy().astype(np.float64)))


def _avg_nonzero(values) -> float:
    nz = [v for v in values if v > 0]
    return sum(nz) / len(nz) if nz else 0.0


def _triplets(lab):
    n = len(lab)
    return [(a, p, q) for a, p, q in itertools.product(range(n), repeat=3)
            if a != p and lab[a] == lab[p] and lab[q] != lab[a]]


def naive_contrastive(e, lab, margin, pairs=None):
    if pairs is None:
        n = len(lab)
        pairs = [(i, j, int(lab[i] == lab[j])) for i in range(n) for j in range(n) if i != j]
    pos = [_d(e, i, j) for i, j, s in pairs if s]
    neg = [max(0.0, margin - _d(e, i, j)) for i, j, s in pairs if not s]
    return _avg_nonzero(pos) + _avg_nonzero(neg)


def naive_triplet(e, triplets, margin):
    return _avg_nonzero([max(0.0, _d(e, a, p) - _d(e, a, q) + margin) for a, p, q in triplets])


def naive_batch_hard(e, lab):
    n = len(lab)
    out = []
    for a in range(n):
        pos = [p for p in range(n) if p != a and lab[p] == lab[a]]
        neg = [q for q in range(n) if lab[q] != lab[a]]
        if pos and neg:
            out.append((a, max(pos, key=lambda p: _d(e, a, p)), min(neg, key=lambda q: _d(e, a, q))))
    return out


def naive_semi_hard(e, lab, margin):
    return [(a, p, q) for a, p, q in _triplets(lab)
            if _d(e, a, p) < _d(e, a, q) <= _d(e, a, p) + margin]


def naive_ms(e, lab):
    n = len(lab)
    s = (e @ e.T).double().numpy()
    total = 0.0
    for a in range(n):
        pos = [s[a, p] for p in range(n) if p != a and lab[p] == lab[a]]
        neg = [s[a, q] for q in range(n) if lab[q] != lab[a]]
        lp = math.log1p(sum(math.exp(-MS_ALPHA * (v - MS_BASE)) for v in pos)) / MS_ALPHA
        ln = math.log1p(sum(math.exp(MS_BETA * (v - MS_BASE)) for v in neg)) / MS_BETA
        total += lp + ln
    return total / n


def naive_active(loss, e, lab, margin):
    n = len(lab)
    if loss == "triplet":
        trip = _triplets(lab)
        return sum(_d(e, a, p) - _d(e, a, q) + margin > 0 for a, p, q in trip) / len(trip)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    if loss == "contrastive":
        hot = [(lab[i] == lab[j] and _d(e, i, j) > 0) or (lab[i] != lab[j] and _d(e, i, j) < margin) for i, j in pairs]
        return sum(hot) / len(pairs)
    s = (e @ e.T).numpy()
    hot = 0
    for i, j in pairs:
        pos = [s[i, p] for p in range(n) if p != i and lab[p] == lab[i]]
        neg = [s[i, q] for q in range(n) if lab[q] != lab[i]]
        if not pos or not neg:
            continue
        if lab[i] == lab[j]:
            hot += s[i, j] - margin < max(neg)
        else:
            hot += s[i, j] + margin > min(pos)
    return hot / len(pairs)


def test_contrastive_all_pairs_matches_naive():
    for margin in (0.5, 1.0, 1.9):
        out = MetricLoss("contrastive", "all", margin)(EMB, LAB)
        assert float(out.loss) == pytest.approx(naive_contrastive(EMB, LAB.tolist(), margin), rel=1e-5)
        assert out.mined == out.total == 30


def test_triplet_all_matches_naive():
    for margin in (0.05, 0.2, 1.0):
        out = MetricLoss("triplet", "all", margin)(EMB, LAB)
        assert float(out.loss) == pytest.approx(naive_triplet(EMB, _triplets(LAB.tolist()), margin), rel=1e-5)


def test_batch_hard_miner_and_loss_match_naive():
    loss = MetricLoss("triplet", "batch-hard", 0.2)
    mined = loss.miner(EMB, LAB)
    got = sorted(zip(*(t.tolist() for t in mined)))
    expected = sorted(naive_batch_hard(EMB, LAB.tolist()))
    assert got == expected
    assert float(loss(EMB, LAB).loss) == pytest.approx(naive_triplet(EMB, expected, 0.2), rel=1e-5)


def test_semi_hard_miner_and_loss_match_naive():
    margin = 0.5
    loss = MetricLoss("triplet", "semi-hard", margin)
    got = sorted(zip(*(t.tolist() for t in loss.miner(EMB, LAB))))
    expected = sorted(naive_semi_hard(EMB, LAB.tolist(), margin))
    assert got == expected and expected  # the fixture does hold semi-hard triplets
    assert float(loss(EMB, LAB).loss) == pytest.approx(naive_triplet(EMB, expected, margin), rel=1e-5)
    assert loss(EMB, LAB).mined == len(expected)


def test_contrastive_on_mined_triplets_uses_their_pairs():
    loss = MetricLoss("contrastive", "batch-hard", 1.0)
    trip = naive_batch_hard(EMB, LAB.tolist())
    pairs = [(a, p, 1) for a, p, _ in trip] + [(a, q, 0) for a, _, q in trip]
    assert float(loss(EMB, LAB).loss) == pytest.approx(naive_contrastive(EMB, None, 1.0, pairs), rel=1e-5)


def test_multi_similarity_matches_naive():
    out = MetricLoss("multi-similarity", "all")(EMB, LAB)
    assert float(out.loss) == pytest.approx(naive_ms(EMB, LAB.tolist()), rel=1e-5)


def test_explicit_pairs_match_naive():
    pairs = [(0, 1, 1), (2, 3, 1), (0, 2, 0), (1, 4, 0), (3, 5, 0)]
    i, j, s = (torch.tensor(c) for c in zip(*pairs))
    out = MetricLoss("contrastive", "all", 1.5)(EMB, pairs=(i, j, s))
    assert float(out.loss) == pytest.approx(naive_contrastive(EMB, None, 1.5, pairs), rel=1e-5)
    assert out.total == 5
    expected_active = sum((_d(EMB, a, b) > 0) if t else (_d(EMB, a, b) < 1.5) for a, b, t in pairs) / 5
    assert out.active == pytest.approx(expected_active)
    with pytest.raises(DataError, match="triplet loss needs class labels"):
        MetricLoss("triplet", "all")(EMB, pairs=(i, j, s))


# the prototypical loss has no margin to be active against: tests/test_train_long.py checks it
@pytest.mark.parametrize("loss", [name for name in LOSSES if name != "prototypical"])
def test_active_share_matches_naive(loss):
    margin = {"triplet": 0.3, "contrastive": 0.8, "multi-similarity": 0.1}[loss]
    share, total = active_share(loss, EMB, LAB, margin)
    assert share == pytest.approx(naive_active(loss, EMB, LAB.tolist(), margin))
    assert total == (len(_triplets(LAB.tolist())) if loss == "triplet" else 30)


def test_collapse_shows_as_zero_active_share():
    # Classes far apart and each class on one point: nothing left to learn, and the log says so.
    e = _unit([0, 0, 120, 120, 240, 240])
    lab = torch.tensor([0, 0, 1, 1, 2, 2])
    out = MetricLoss("triplet", "all", 0.2)(e, lab)
    assert float(out.loss) == 0.0 and out.active == 0.0


def test_gradients_flow_and_reduce_the_loss():
    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(12, 8), dim=1).requires_grad_(True)
    lab = torch.arange(12) // 3
    for name, miner in itertools.product(LOSSES, MINERS):
        if name == "prototypical" and miner != "all":
            continue  # it takes no miner: every query meets every prototype
        loss = MetricLoss(name, miner)
        v = x.detach().clone().requires_grad_(True)
        opt = torch.optim.SGD([v], lr=0.5)
        for _ in range(20):
            out = loss(torch.nn.functional.normalize(v, dim=1), lab)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
        last = float(MetricLoss(name, "all")(torch.nn.functional.normalize(v.detach(), dim=1), lab).loss)
        ref = float(MetricLoss(name, "all")(torch.nn.functional.normalize(x.detach(), dim=1), lab).loss)
        assert last < ref, (name, miner)


def test_build_loss_defaults_and_bad_names():
    assert build_loss("triplet", None, None).miner_name == "batch-hard"
    assert build_loss("contrastive", None, None).miner_name == "all"
    assert build_loss("triplet", None, None).margin == 0.2
    with pytest.raises(DataError, match="unknown loss"):
        MetricLoss("arcface")
    with pytest.raises(DataError, match="unknown miner"):
        MetricLoss("triplet", "hardest")
