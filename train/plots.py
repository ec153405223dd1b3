"""Figures of a training run: loss.png here; distances.png and pairs.png through ``engine.plots``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from engine.plots import new_figure, save_figure

log = logging.getLogger(__name__)


def plot_loss(history: Sequence[dict], path) -> Path:
    """Training and validation loss per epoch (left axis) and validation MAP@R when known (right axis).
    history: the metrics.jsonl records; epoch 0 (before training) has no training loss."""
    fig = new_figure(7, 4)
    ax = fig.add_subplot()

    def series(key: str) -> tuple[list[int], list[float]]:
        pts = [(r["epoch"], r[key]) for r in history if r.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    for key, label, style in (("train_loss", "training loss", "-o"), ("val_loss", "validation loss", "-s")):
        x, y = series(key)
        if x:
            ax.plot(x, y, style, markersize=3, label=label)
    ax.set_xlabel("epoch (0 = before training)")
    ax.set_ylabel("loss")
    handles, labels = ax.get_legend_handles_labels()
    x, y = series("map@r")
    if x:
        right = ax.twinx()
        right.plot(x, y, "--", color="#2ca02c", label="validation MAP@R")
        best = [r["epoch"] for r in history if r.get("best")]
        if best:
            right.axvline(best[-1], color="#2ca02c", linewidth=0.8, alpha=0.6)
        right.set_ylabel("MAP@R (unseen classes)")
        h2, l2 = right.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    if handles:
        ax.legend(handles, labels, loc="best")
    ax.set_title("Training run")
    return save_figure(fig, path)


def choose_pairs(distances: np.ndarray, same: np.ndarray, threshold: float, n: int = 16,
                 seed: int = 0) -> np.ndarray:
    """Indices of up to ``n`` pairs worth looking at: the worst mistakes first (at most half), then
    a seeded mix of right verdicts, similar and dissimilar alike."""
    d = np.asarray(distances, np.float64)
    y = np.asarray(same).astype(bool)
    said = d <= threshold
    wrong = np.flatnonzero(said != y)
    # Worst mistakes: farthest from the threshold on the wrong side.
    wrong = wrong[np.argsort(-np.abs(d[wrong] - threshold), kind="stable")][: n // 2]
    rng = np.random.default_rng(seed)
    right = np.flatnonzero(said == y)
    right_pos, right_neg = right[y[right]], right[~y[right]]
    rest = n - len(wrong)
    take_pos = rng.permutation(right_pos)[: (rest + 1) // 2]
    take_neg = rng.permutation(right_neg)[: rest - len(take_pos)]
    if len(take_pos) + len(take_neg) < rest:  # one kind ran short: fill from the other
        extra = rng.permutation(np.setdiff1d(right, np.concatenate([take_pos, take_neg])))
        take_pos = np.concatenate([take_pos, extra[: rest - len(take_pos) - len(take_neg)]])
    chosen = np.concatenate([wrong, take_pos, take_neg]).astype(np.int64)
    return chosen[:n]


def write_run_plots(out_dir, history: Sequence[dict], paths: Sequence[str], i: np.ndarray, j: np.ndarray,
                    same: np.ndarray, distances: np.ndarray, threshold: float | None) -> dict[str, Path]:
    """loss.png, distances.png (similar vs dissimilar validation pair distances with the threshold) and
    pairs.png (validation pairs with distance and verdict, wrong ones marked) into ``out_dir``."""
    from engine.plots import plot_distances, plot_pairs

    out_dir = Path(out_dir)
    written = {"loss": plot_loss(history, out_dir / "loss.png")}
    same = np.asarray(same).astype(bool)
    d = np.asarray(distances, np.float64)
    written["distances"] = plot_distances(d[same], d[~same], threshold, out_dir / "distances.png",
                                          title="Validation pairs (unseen classes): similar vs dissimilar")
    if threshold is not None:
        chosen = choose_pairs(d, same, threshold)
        pairs = [(paths[int(i[k])], paths[int(j[k])]) for k in chosen]
        written["pairs"] = plot_pairs(pairs, d[chosen].tolist(), same[chosen].astype(int).tolist(), threshold,
                                      out_dir / "pairs.png")
    return written
