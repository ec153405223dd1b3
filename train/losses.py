"""Losses and miners: pytorch-metric-learning objects wired together, plus the share of active
tuples so that a collapse to zero loss shows in the log.

- ``contrastive``: ``relu(d)`` for similar pairs, ``relu(margin - d)`` for dissimilar ones, d the L2
  distance between unit embeddings (pml ``ContrastiveLoss(pos_margin=0, neg_margin=margin)``,
  averaged over the pairs with non-zero loss, similar and dissimilar parts separately).
- ``triplet``: ``relu(d_ap - d_an + margin)`` averaged over the triplets with non-zero loss
  (pml ``TripletMarginLoss``).
- ``multi-similarity``: pml ``MultiSimilarityLoss`` (alpha 2, beta 50, base 0.5 on cosine similarity).
- ``prototypical`` (Snell et al. 2017, on cosine similarity): in a class-labelled batch the first half
  of each class's images (at least one) make its prototype (their normalised mean), the rest are
  queries, each classified by softmax over ``PROTO_SCALE`` x its cosine to every prototype of the batch;
  the loss is the mean cross-entropy. Episodic training for few-shot retrieval; no miner, no margin.

Miners (class-labelled batches only): ``all`` (every pair or triplet in the batch), ``batch-hard``
(per anchor the farthest positive and the nearest negative, pml ``BatchHardMiner``), ``semi-hard``
(triplets whose negative is farther than the positive but inside the margin, pml
``TripletMarginMiner(type_of_triplets="semihard")``). A pair list brings its own pairs: no miner.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import DataError
from train.config import LOSSES, MINERS

DEFAULT_MARGIN = {"contrastive": 1.0, "triplet": 0.2, "multi-similarity": 0.1, "prototypical": 0.0}
MS_ALPHA, MS_BETA, MS_BASE = 2.0, 50.0, 0.5
# Softmax temperature of the prototypical loss: cosines lie in [-1, 1], too flat for a softmax over
# dozens of prototypes; 16 is within the usual range of cosine-softmax losses (normalised softmax, CosFace).
PROTO_SCALE = 16.0


@dataclass
class LossOutput:
    """loss: scalar tensor (differentiable); active: share of all pairs/triplets of the batch that have
    a non-zero loss (for multi-similarity: that its mining rule keeps), in [0, 1]; mined: how many
    tuples the loss was computed over; total: how many the batch has."""

    loss: torch.Tensor
    active: float
    mined: int
    total: int


def default_margin(loss: str) -> float:
    return DEFAULT_MARGIN[loss]


class MetricLoss(nn.Module):
    """A loss with its miner. ``forward(embeddings [B, D] unit-norm, labels int64 [B])`` for class
    batches, or ``forward(embeddings, pairs=(i, j, same))`` for explicit pairs (int64 [P] each)."""

    def __init__(self, loss: str = "triplet", miner: str = "all", margin: float | None = None):
        super().__init__()
        from pytorch_metric_learning import distances, losses, miners

        if loss not in LOSSES:
            raise DataError(f"unknown loss {loss!r} (use {', '.join(LOSSES)})")
        if miner not in MINERS:
            raise DataError(f"unknown miner {miner!r} (use {', '.join(MINERS)})")
        self.name = loss
        self.miner_name = miner
        if loss == "prototypical":
            if miner != "all":
                raise DataError("the prototypical loss takes no miner (every query meets every prototype)")
            self.margin = DEFAULT_MARGIN[loss]
            self.miner = None
            return
        self.margin = float(DEFAULT_MARGIN[loss] if margin is None else margin)
        lp = distances.LpDistance(normalize_embeddings=True, p=2, power=1)
        if loss == "contrastive":
            self.loss_fn = losses.ContrastiveLoss(pos_margin=0.0, neg_margin=self.margin, distance=lp)
        elif loss == "triplet":
            self.loss_fn = losses.TripletMarginLoss(margin=self.margin, distance=lp)
        else:
            self.loss_fn = losses.MultiSimilarityLoss(alpha=MS_ALPHA, beta=MS_BETA, base=MS_BASE)
        if miner == "batch-hard":
            self.miner = miners.BatchHardMiner(distance=lp)
        elif miner == "semi-hard":
            # The miner's margin is the triplet margin; for the pair losses, the triplet loss's default.
            m = self.margin if loss == "triplet" else DEFAULT_MARGIN["triplet"]
            self.miner = miners.TripletMarginMiner(margin=m, type_of_triplets="semihard", distance=lp)
        else:
            self.miner = None

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None,
                pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> LossOutput:
        embeddings = embeddings.float()
        if pairs is not None:
            return self._pairs(embeddings, pairs)
        if labels is None:
            raise ValueError("labels or pairs are needed")
        labels = labels.to(embeddings.device)
        if self.name == "prototypical":
            return prototypical_loss(embeddings, labels)
        indices = self.miner(embeddings, labels) if self.miner is not None else None
        loss = self.loss_fn(embeddings, labels, indices)
        active, total = active_share(self.name, embeddings.detach(), labels, self.margin)
        if indices is None:
            mined = total
        else:
            mined = int(len(indices[0])) if len(indices) == 3 else int(len(indices[0]) + len(indices[2]))
        return LossOutput(loss, active, mined, total)

    def _pairs(self, embeddings: torch.Tensor, pairs) -> LossOutput:
        i, j, same = (torch.as_tensor(t, device=embeddings.device) for t in pairs)
        if self.name in ("triplet", "prototypical"):
            raise DataError(f"{self.name} loss needs class labels; train a pair list with --loss contrastive or "
                            "multi-similarity, or use a folder-per-class tree")
        same = same.bool()
        indices = (i[same], j[same], i[~same], j[~same])
        loss = self.loss_fn(embeddings, None, indices)
        with torch.no_grad():
            d = (embeddings[i] - embeddings[j]).norm(dim=1)
            if self.name == "contrastive":
                on = torch.where(same, d > 0, d < self.margin)
            else:
                on = _ms_pair_active(embeddings, i, j, same)
        total = int(len(i))
        return LossOutput(loss, float(on.float().mean()) if total else 0.0, total, total)


def prototypical_loss(embeddings: torch.Tensor, labels: torch.Tensor, scale: float = PROTO_SCALE) -> LossOutput:
    """Prototypical loss of a class-labelled batch (see the module docstring): embeddings float32
    [B, D] unit-norm, labels int64 [B]. active: the share of queries whose nearest prototype is of
    another class; mined = total = the number of queries. A batch without a class of two images has
    no query: zero loss, not differentiable (the optimizer skips it)."""
    support: list[torch.Tensor] = []
    queries: list[torch.Tensor] = []
    targets: list[int] = []
    for k, c in enumerate(torch.unique(labels)):
        members = torch.nonzero(labels == c).flatten()
        n_support = max(1, len(members) // 2)
        support.append(F.normalize(embeddings[members[:n_support]].mean(0), dim=0))
        queries.append(members[n_support:])
        targets += [k] * (len(members) - n_support)
    query = torch.cat(queries)
    if len(query) == 0:
        return LossOutput(torch.zeros((), device=embeddings.device), 0.0, 0, 0)
    logits = scale * embeddings[query] @ torch.stack(support).T
    target = torch.as_tensor(targets, device=embeddings.device)
    loss = F.cross_entropy(logits, target)
    wrong = float((logits.detach().argmax(1) != target).float().mean())
    return LossOutput(loss, wrong, len(query), len(query))


def _ms_pair_active(embeddings, i, j, same) -> torch.Tensor:
    """Multi-similarity mining rule on explicit pairs, per anchor ``i``."""
    sim = (embeddings[i] * embeddings[j]).sum(1)
    on = torch.zeros_like(same)
    eps = DEFAULT_MARGIN["multi-similarity"]
    for a in torch.unique(i):
        rows = i == a
        pos, neg = rows & same, rows & ~same
        if pos.any() and neg.any():
            on[pos] = sim[pos] - eps < sim[neg].max()
            on[neg] = sim[neg] + eps > sim[pos].min()
    return on


@torch.no_grad()
def active_share(loss: str, embeddings: torch.Tensor, labels: torch.Tensor, margin: float) -> tuple[float, int]:
    """(share of the batch's tuples with non-zero loss, how many tuples). Triplets for ``triplet``,
    ordered pairs (i != j) otherwise; for multi-similarity a pair counts when the MS mining rule
    (epsilon = ``margin``) would keep it."""
    d = torch.cdist(embeddings, embeddings)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    pos = same & ~eye
    neg = ~same
    if loss == "triplet":
        # [anchors, positives, negatives] in chunks of anchors, so a big batch stays small in memory.
        n_hot, total = 0, 0
        for s in range(0, len(labels), 64):
            valid = pos[s:s + 64, :, None] & neg[s:s + 64, None, :]
            hot = (d[s:s + 64, :, None] - d[s:s + 64, None, :] + margin > 0) & valid
            n_hot += int(hot.sum())
            total += int(valid.sum())
        return (n_hot / total if total else 0.0), total
    elif loss == "contrastive":
        hot = (pos & (d > 0)) | (neg & (d < margin))
        total = int((pos | neg).sum())
    else:
        sim = embeddings @ embeddings.T
        has = pos.any(1) & neg.any(1)
        max_neg = torch.where(neg, sim, torch.full_like(sim, -torch.inf)).max(1).values
        min_pos = torch.where(pos, sim, torch.full_like(sim, torch.inf)).min(1).values
        hot = (pos & (sim - margin < max_neg[:, None])) | (neg & (sim + margin > min_pos[:, None]))
        hot &= has[:, None]
        total = int((pos | neg).sum())
    return (float(hot.sum()) / total if total else 0.0), total


def build_loss(loss: str, miner: str | None, margin: float | None) -> MetricLoss:
    """``miner=None`` picks the loss's usual partner: batch-hard for triplet (it beat semi-hard on both
    benchmark sets), all for the pair losses."""
    if miner is None:
        miner = "batch-hard" if loss == "triplet" else "all"
    return MetricLoss(loss, miner, margin)
