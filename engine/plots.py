"""Figures for evaluation reports and training runs, written as PNG files.

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas, never through ``pyplot``: no
global figure state, no GUI backend, safe inside worker threads and on headless machines. Every
function returns the path it wrote (parent folders are created).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)

THUMB = 128
_RIGHT = "#2ca02c"
_WRONG = "#d62728"
_SIMILAR = "#1f77b4"
_DISSIMILAR = "#ff7f0e"


def new_figure(width: float, height: float):
    """A matplotlib Figure with its own Agg canvas (no pyplot state); for every plot of the project."""
    # The Agg canvas is attached explicitly instead of calling matplotlib.use("Agg"), which would
    # switch the backend under a caller's own pyplot session.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path) -> Path:
    """Write ``fig`` as a PNG at ``path`` (folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def _thumbnail(path: str, size: int = THUMB) -> np.ndarray:
    """uint8 [size, size, 3], the image letterboxed on light grey; a grey tile when it cannot be read
    (a report must not fail over one unreadable file)."""
    from PIL import Image, ImageOps

    from engine.errors import ImageError
    from engine.preprocess import load_image

    canvas = Image.new("RGB", (size, size), (235, 235, 235))
    try:
        img = load_image(path, draft_size=size)
    except ImageError as exc:
        log.warning("thumbnail of %s unavailable: %s", path, exc)
        return np.asarray(canvas)
    # contain() also enlarges small images, so 48-pixel icons stay legible beside photos.
    img = ImageOps.contain(img, (size, size))
    canvas.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
    return np.asarray(canvas)


def _frame(ax, colour: str | None, width: float = 4.0) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(colour is not None)
        if colour is not None:
            spine.set_edgecolor(colour)
            spine.set_linewidth(width)


def plot_distances(pos: np.ndarray, neg: np.ndarray, threshold: float | None, path, *,
                   title: str | None = None) -> Path:
    """Histograms of similar-pair (pos) and dissimilar-pair (neg) distances, float [P] each, on shared
    bins, with the decision threshold as a dashed vertical line when given."""
    pos = np.asarray(pos, dtype=np.float64).ravel()
    neg = np.asarray(neg, dtype=np.float64).ravel()
    both = np.concatenate([pos, neg])
    fig = new_figure(7, 4)
    ax = fig.add_subplot()
    if both.size:
        lo, hi = float(both.min()), float(both.max())
        if threshold is not None and np.isfinite(threshold):
            lo, hi = min(lo, threshold), max(hi, threshold)
        bins = np.linspace(lo, hi if hi > lo else lo + 1e-3, 41)
        if pos.size:
            ax.hist(pos, bins=bins, alpha=0.6, color=_SIMILAR, label=f"similar pairs (n={pos.size})")
        if neg.size:
            ax.hist(neg, bins=bins, alpha=0.6, color=_DISSIMILAR, label=f"dissimilar pairs (n={neg.size})")
    if threshold is not None and np.isfinite(threshold):
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1.5, label=f"threshold {threshold:.3f}")
    ax.set_xlabel("embedding distance (L2 between unit vectors; smaller = more similar)")
    ax.set_ylabel("pairs")
    ax.set_title(title or "Pair distances: similar vs dissimilar")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    return save_figure(fig, path)


def plot_roc(curves: Mapping[str, tuple[np.ndarray, np.ndarray, float]], path, *, title: str | None = None) -> Path:
    """ROC curves of pair verification: curves maps a label (e.g. the model) to (fpr [T], tpr [T], auc)."""
    fig = new_figure(5.5, 5)
    ax = fig.add_subplot()
    for name, (fpr, tpr, auc) in curves.items():
        ax.plot(fpr, tpr, linewidth=2, label=f"{name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="chance")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate (dissimilar pairs called similar)")
    ax.set_ylabel("true positive rate (similar pairs found)")
    ax.set_title(title or "Pair verification ROC")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_pr_curve(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path, *, title: str | None = None) -> Path:
    """Precision-recall curves of pair verification over distance thresholds: curves maps a label to
    (recall [T], precision [T])."""
    fig = new_figure(5.5, 5)
    ax = fig.add_subplot()
    for name, (recall, precision) in curves.items():
        ax.plot(recall, precision, linewidth=2, label=str(name))
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("recall (share of similar pairs called similar)")
    ax.set_ylabel("precision (share of 'similar' calls that are right)")
    ax.set_title(title or "Pair verification precision-recall over thresholds")
    if curves:
        ax.legend(loc="lower left")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_retrieval_examples(query_paths: Sequence[str], hit_paths: Sequence[Sequence[str]],
                            correct: Sequence[Sequence[bool]], path, scores: Sequence[Sequence[float]] | None = None,
                            *, title: str | None = None) -> Path:
    """A grid: each row one query (blue frame) followed by its ranked hits, framed green when the hit
    is of the query's class and red when not. scores, when given, go under each hit."""
    rows = max(1, len(query_paths))
    cols = 1 + max((len(h) for h in hit_paths), default=0)
    fig = new_figure(1.6 * cols, 1.75 * rows + 0.4)
    for r, query in enumerate(query_paths):
        ax = fig.add_subplot(rows, cols, r * cols + 1)
        ax.imshow(_thumbnail(query))
        _frame(ax, _SIMILAR)
        ax.set_title("query", fontsize=9)
        ax.set_xlabel(Path(query).parent.name, fontsize=8)
        for c, hit in enumerate(hit_paths[r]):
            ax = fig.add_subplot(rows, cols, r * cols + c + 2)
            ax.imshow(_thumbnail(hit))
            ok = bool(correct[r][c])
            _frame(ax, _RIGHT if ok else _WRONG)
            ax.set_title(f"#{c + 1}" + ("" if ok else " wrong"), fontsize=9, color="black" if ok else _WRONG)
            label = Path(hit).parent.name
            if scores is not None:
                label = f"{scores[r][c]:.3f}  {label}"
            ax.set_xlabel(label, fontsize=7)
    fig.suptitle(title or "Retrieval examples (green: same class, red: wrong class)")
    return save_figure(fig, path)


def _pca_2d(embeddings: np.ndarray) -> np.ndarray:
    x = embeddings.astype(np.float64) - embeddings.mean(axis=0, dtype=np.float64)
    if x.shape[0] < 2:
        return np.zeros((x.shape[0], 2))
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    proj = x @ vt[:2].T
    if proj.shape[1] < 2:
        proj = np.hstack([proj, np.zeros((proj.shape[0], 2 - proj.shape[1]))])
    # SVD signs are arbitrary; fixing them keeps the picture stable across runs.
    proj *= np.where(np.abs(proj).max(axis=0) == proj.max(axis=0), 1.0, -1.0)
    return proj


def plot_embedding_2d(embeddings: np.ndarray, labels: np.ndarray, class_names: Sequence[str] | None, path,
                      seed: int = 0, *, max_points: int = 5000, title: str | None = None) -> Path:
    """The embeddings float32 [N, D] projected on their first two principal components, coloured by
    labels int [N]. Above max_points a seeded sample is drawn; the legend appears for <= 20 classes."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    labels = np.asarray(labels)
    if embeddings.shape[0] > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(embeddings.shape[0], max_points, replace=False))
        embeddings, labels = embeddings[keep], labels[keep]
    xy = _pca_2d(embeddings) if embeddings.size else np.zeros((0, 2))
    classes = np.unique(labels)
    from matplotlib import colormaps

    # tab10 then tab20 keep neighbouring classes distinguishable; beyond 20 only a gradient is left.
    cmap = colormaps["tab10" if classes.size <= 10 else "tab20" if classes.size <= 20 else "turbo"]
    fig = new_figure(7, 6)
    ax = fig.add_subplot()
    for n, label in enumerate(classes):
        mine = labels == label
        colour = cmap(n) if classes.size <= 20 else cmap(n / max(1, classes.size - 1))
        name = class_names[label] if class_names is not None and 0 <= label < len(class_names) else str(label)
        ax.scatter(xy[mine, 0], xy[mine, 1], s=30 if labels.size < 500 else 8, alpha=0.75, color=colour, label=str(name), linewidths=0)
    ax.set_xlabel("principal component 1")
    ax.set_ylabel("principal component 2")
    ax.set_title(title or f"Embeddings, 2-D PCA ({labels.size} images, {classes.size} classes)")
    if 0 < classes.size <= 20:
        ax.legend(fontsize=7, markerscale=2, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return save_figure(fig, path)


def plot_contact_sheet(query_path: str, hit_paths: Sequence[str], scores: Sequence[float], path,
                       title: str | None = None) -> Path:
    """The query then its ranked hits, with each hit's score (cosine similarity) underneath; more than
    six hits wrap onto further rows."""
    per_row = 6
    rows = 1 + max(0, math.ceil(len(hit_paths) / per_row) - 1)
    cols = 1 + min(per_row, max(1, len(hit_paths)))
    fig = new_figure(1.9 * cols, 2.1 * rows + 0.4)
    ax = fig.add_subplot(rows, cols, 1)
    ax.imshow(_thumbnail(query_path))
    _frame(ax, _SIMILAR)
    ax.set_title("query", fontsize=10)
    ax.set_xlabel(Path(query_path).name, fontsize=7)
    for n, (hit, score) in enumerate(zip(hit_paths, scores)):
        r, c = divmod(n, per_row)
        ax = fig.add_subplot(rows, cols, r * cols + c + 2)
        ax.imshow(_thumbnail(hit))
        _frame(ax, None)
        ax.set_title(f"#{n + 1}  {score:.3f}", fontsize=9)
        ax.set_xlabel(Path(hit).name, fontsize=7)
    fig.suptitle(title or "Query and nearest images (score: cosine similarity)")
    return save_figure(fig, path)


def plot_pairs(pairs: Sequence[tuple[str, str]], distances: Sequence[float], labels: Sequence[int],
               threshold: float, path, *, title: str | None = None) -> Path:
    """A grid of image pairs, each captioned with its distance, truth and the verdict of "similar iff
    distance <= threshold"; wrong verdicts are framed and captioned red, right ones green."""
    per_row = 4
    n = max(1, len(pairs))
    rows = math.ceil(n / per_row)
    cols = min(per_row, n)
    fig = new_figure(3.2 * cols, 2.0 * rows + 0.5)
    for k, ((a, b), dist, label) in enumerate(zip(pairs, distances, labels)):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.imshow(np.hstack([_thumbnail(a), np.full((THUMB, 6, 3), 255, np.uint8), _thumbnail(b)]))
        said_similar = float(dist) <= threshold
        ok = said_similar == bool(label)
        _frame(ax, _RIGHT if ok else _WRONG, 3.0)
        truth = "same" if label else "different"
        verdict = "similar" if said_similar else "dissimilar"
        ax.set_title(f"d={float(dist):.3f} {truth} -> {verdict}" + ("" if ok else "  WRONG"),
                     fontsize=8, color="black" if ok else _WRONG)
    fig.suptitle(title or f"Pairs at threshold {threshold:.3f} (red: wrong verdict)")
    return save_figure(fig, path)


def sheet_pages(path, pages: int) -> list[Path]:
    """The files a sheet of ``pages`` pages is written to: ``path`` itself, then ``NAME-2.png``,
    ``NAME-3.png`` ... beside it."""
    path = Path(path)
    return [path] + [path.with_name(f"{path.stem}-{n}{path.suffix or '.png'}") for n in range(2, pages + 1)]


def plot_tile_rows(blocks: Sequence[Sequence[tuple[str, str, str | None]]], path, *, title: str,
                   per_row: int = 8, lines_per_page: int = 20) -> list[Path]:
    """A contact sheet of image blocks: each block (a query and its hits, a group of duplicates)
    starts a new line and wraps after ``per_row`` tiles. A tile is (image path, caption above,
    frame colour or None); its file name is written under it. Blocks never split across pages;
    a sheet longer than ``lines_per_page`` lines goes on several pages (see ``sheet_pages``).
    Returns the PNG paths written."""
    lines_of = [max(1, math.ceil(len(block) / per_row)) for block in blocks]
    pages: list[list[int]] = [[]]
    used = 0
    for n, lines in enumerate(lines_of):
        if pages[-1] and used + lines > lines_per_page:
            pages.append([])
            used = 0
        pages[-1].append(n)
        used += lines
    targets = sheet_pages(path, len(pages))
    cols = max(1, min(per_row, max((len(b) for b in blocks), default=1)))
    for page_no, (members, target) in enumerate(zip(pages, targets), start=1):
        rows = max(1, sum(lines_of[n] for n in members))
        fig = new_figure(1.9 * cols, 2.1 * rows + 0.5)
        line = 0
        for n in members:
            for t, (image, caption, colour) in enumerate(blocks[n]):
                r, c = divmod(t, per_row)
                ax = fig.add_subplot(rows, cols, (line + r) * cols + c + 1)
                ax.imshow(_thumbnail(image))
                _frame(ax, colour)
                ax.set_title(caption, fontsize=8)
                ax.set_xlabel(Path(image).name[:28], fontsize=7)
            line += lines_of[n]
        suffix = f" (page {page_no} of {len(pages)})" if len(pages) > 1 else ""
        fig.suptitle(title + suffix)
        save_figure(fig, target)
    return targets
