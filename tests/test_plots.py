"""engine.plots writes readable PNGs, copes with unreadable thumbnails and leaves pyplot alone."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from PIL import Image

from engine import plots


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    paths = []
    for n, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]):
        path = root / f"c{n}" / f"{n}.png"
        path.parent.mkdir()
        Image.new("RGB", (40 + 10 * n, 30), colour).save(path)
        paths.append(str(path))
    return paths


def _is_png(path, min_size=(100, 100)):
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.width >= min_size[0] and img.height >= min_size[1]


def test_curves_and_histograms(tmp_path):
    rng = np.random.default_rng(0)
    out = plots.plot_distances(rng.normal(0.6, 0.1, 50), rng.normal(1.1, 0.1, 50), 0.85, tmp_path / "a" / "d.png")
    assert out == tmp_path / "a" / "d.png"
    _is_png(out)
    _is_png(plots.plot_distances(np.array([]), np.array([0.5]), None, tmp_path / "d2.png"))
    _is_png(plots.plot_roc({"m1": (np.array([0, 0.5, 1]), np.array([0, 0.8, 1]), 0.65)}, tmp_path / "roc.png"))
    _is_png(plots.plot_pr_curve({"m1": (np.array([0.5, 1]), np.array([1, 0.5]))}, tmp_path / "pr.png"))


def test_embedding_2d_many_and_few_classes(tmp_path):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(300, 16)).astype(np.float32)
    _is_png(plots.plot_embedding_2d(emb, rng.integers(0, 3, 300), ["a", "b", "c"], tmp_path / "few.png"))
    _is_png(plots.plot_embedding_2d(emb, rng.integers(0, 40, 300), None, tmp_path / "many.png", max_points=100))


def test_pca_projection_is_the_leading_direction():
    rng = np.random.default_rng(1)
    x = np.outer(rng.normal(size=50), [3.0, 0, 0, 0]) + rng.normal(scale=0.01, size=(50, 4))
    xy = plots._pca_2d(x.astype(np.float32))
    centred = x[:, 0] - x[:, 0].mean()
    assert abs(np.corrcoef(xy[:, 0], centred)[0, 1]) > 0.999


def test_image_grids_survive_unreadable_files(images, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    _is_png(plots.plot_retrieval_examples(images[:2], [[images[1], str(broken)], [images[3], images[0]]],
                                          [[True, False], [False, True]], tmp_path / "ex.png",
                                          scores=[[0.9, 0.5], [0.7, 0.6]]))
    _is_png(plots.plot_contact_sheet(images[0], images[1:] + [str(broken)] * 5, [0.9] * 8, tmp_path / "cs.png",
                                     title="demo"))
    _is_png(plots.plot_pairs([(images[0], images[1]), (images[2], str(broken))], [0.4, 1.2], [1, 1], 0.8,
                             tmp_path / "pairs.png"))


def test_no_pyplot_state():
    # Figures are drawn on their own Agg canvas: no global pyplot figure is ever opened.
    if "matplotlib.pyplot" in sys.modules:
        import matplotlib.pyplot as plt

        assert plt.get_fignums() == []
