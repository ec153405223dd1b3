"""Whitening (engine.whitening, train.whitening): the fitted maps against their definitions, the
layer inside the encoder and its checkpoint, and `engine train DATA --whiten-only` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from engine.errors import DataError, ModelError
from engine.whitening import fit_learned_whitening, fit_pca_whitening


def _features(seed=0, n=600, d=12, classes=6):
    """Anisotropic, labelled features: class centres plus correlated noise (unit rows)."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) * np.linspace(0.2, 3.0, d)
    labels = np.arange(n) % classes
    centres = rng.normal(size=(classes, d)) * 2
    x = centres[labels] + rng.normal(size=(n, d)) @ mix
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def _centred(w, x):
    return (x.astype(np.float64) - w.mean) @ w.projection.T.astype(np.float64)


def test_pca_whitening_without_shrinkage_gives_identity_covariance():
    x, _ = _features()
    w = fit_pca_whitening(x, shrinkage=0.0)
    z = _centred(w, x)
    np.testing.assert_allclose(z.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(z.T @ z / len(z), np.eye(x.shape[1]), atol=1e-4)


def test_full_shrinkage_is_a_rotation_and_reduction_keeps_the_top_directions():
    x, _ = _features(1)
    w = fit_pca_whitening(x, shrinkage=1.0)
    p = w.projection.astype(np.float64)
    gram = p @ p.T
    np.testing.assert_allclose(gram / gram[0, 0], np.eye(len(p)), atol=1e-5)  # orthogonal rows, one scale
    reduced = fit_pca_whitening(x, dim=3, shrinkage=1.0)
    assert reduced.dim == 3 and reduced.apply(x).shape == (len(x), 3)
    cov = np.cov(x.T.astype(np.float64), bias=True)
    top = np.linalg.eigh(cov)[1][:, ::-1][:, :3]
    # the kept rows span the covariance's top three eigenvectors
    rows = reduced.projection.astype(np.float64)
    q = rows.T / np.linalg.norm(rows, axis=1)
    np.testing.assert_allclose(np.abs(np.linalg.svd(top.T @ q)[1]), 1, atol=1e-4)


def test_learned_whitening_whitens_the_within_class_spread():
    x, labels = _features(2)
    w = fit_learned_whitening(x, labels, shrinkage=0.0)
    z = _centred(w, x)
    means = np.stack([z[labels == c].mean(axis=0) for c in range(labels.max() + 1)])
    within = z - means[labels]
    np.testing.assert_allclose(within.T @ within / len(z), np.eye(x.shape[1]), atol=1e-4)
    out = w.apply(x)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)


@pytest.mark.parametrize("call", [
    lambda x, y: fit_pca_whitening(x[:1]),
    lambda x, y: fit_pca_whitening(x, dim=13),
    lambda x, y: fit_pca_whitening(x, shrinkage=1.5),
    lambda x, y: fit_pca_whitening(np.where(np.arange(12) == 3, np.nan, x)),
    lambda x, y: fit_learned_whitening(x, y[:-1]),
    lambda x, y: fit_learned_whitening(x[:6], np.arange(6)),
])
def test_bad_input_is_refused(call):
    x, y = _features()
    with pytest.raises(DataError):
        call(x, y)


# -- the layer in the encoder ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def base():
    from engine.config import EncoderConfig
    from engine.encoder import build_encoder

    torch.manual_seed(0)
    return build_encoder(EncoderConfig(backbone="test_resnet", pretrained=False, image_size=32))


def test_whitened_encoder_is_norm_then_linear_then_norm(base, tmp_path):
    from engine.checkpoint import save_checkpoint
    from engine.encoder import load_checkpoint, with_whitening, without_whitening

    images = torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    plain = base.embed(images)
    rng = np.random.default_rng(0)
    w = fit_pca_whitening(rng.normal(size=(200, base.dim)).astype(np.float32), dim=16, shrinkage=0.2)
    whitened = with_whitening(base, w.mean, w.projection)
    assert whitened.dim == 16 and whitened.describe()["whiten_dim"] == 16
    np.testing.assert_allclose(whitened.embed(images), w.apply(plain), atol=1e-5)
    assert without_whitening(whitened).embed(images) == pytest.approx(plain, abs=1e-6)
    # folded batches (8 and more) go through the same layer
    big = torch.cat([images, images])
    np.testing.assert_allclose(whitened.embed(big)[:10], w.apply(plain), atol=1e-4)

    path = save_checkpoint(whitened, tmp_path / "w.pt", threshold=0.7)
    back = load_checkpoint(path)
    assert back.config.whiten_dim == 16 and back.identity() == whitened.identity() and back.threshold == 0.7
    np.testing.assert_allclose(back.embed(images), whitened.embed(images), atol=1e-6)
    again = with_whitening(back, w.mean, w.projection)  # whitening an encoder that has one replaces it
    np.testing.assert_allclose(again.embed(images), whitened.embed(images), atol=1e-5)


def test_an_empty_whitening_layer_is_never_built():
    from engine.config import EncoderConfig
    from engine.encoder import build_encoder

    with pytest.raises(ModelError, match="whiten-only"):
        build_encoder(EncoderConfig(backbone="test_resnet", pretrained=False, whiten_dim=8))


def test_a_whitening_of_the_wrong_shape_is_refused(base):
    from engine.encoder import with_whitening

    whitened = with_whitening(base, np.zeros(base.dim), np.eye(base.dim)[:8])
    with pytest.raises(ModelError):
        whitened.set_whitening(np.zeros(base.dim + 1), np.eye(base.dim + 1)[:8])


def test_training_from_a_whitened_checkpoint_drops_the_layer(base):
    from engine.encoder import with_whitening
    from train.head import with_head

    whitened = with_whitening(base, np.zeros(base.dim), np.eye(base.dim)[:8])
    head = with_head(whitened, base.dim, "cpu")
    assert head.config.whiten_dim is None and head.dim == base.dim


# -- engine train --whiten-only, then ingest and query ------------------------------------------------


def test_whiten_only_run_then_ingest_and_query(tmp_path):
    from engine.cli import main
    from engine.encoder import load_checkpoint
    from tests.util import make_class_tree

    make_class_tree(tmp_path / "data", 6, 5, size=32)
    runner = CliRunner()
    args = ["--device", "cpu", "train", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--whiten-only",
            "--backbone", "test_resnet", "--no-pretrained", "--image-size", "32", "--dim", "8", "--val-classes",
            "0.34", "--workers", "0", "--json"]
    r = runner.invoke(main, args)
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["whitening"]["kind"] == "learned" and result["whitening"]["dim"] == 8
    assert result["whitening"]["images"] == 20  # 4 classes fitted, 2 held out
    assert {"map@r", "recall@1", "roc_auc"} <= set(result["after"])
    encoder = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert encoder.dim == 8 and encoder.threshold == pytest.approx(result["threshold"])
    assert encoder.metadata["whitening"]["kind"] == "learned"
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["threshold"] == result["threshold"]

    again = runner.invoke(main, args)
    assert again.exit_code == 1 and "already holds a run" in again.output
    home = str(tmp_path / "home")
    r = runner.invoke(main, ["--home", home, "ingest", str(tmp_path / "data"), "--model",
                             str(tmp_path / "run" / "checkpoint.pt"), "--workers", "0", "--json"])
    assert r.exit_code == 0, r.output
    photo = str(sorted((tmp_path / "data" / "class_0").iterdir())[0])
    r = runner.invoke(main, ["--home", home, "query", photo, "-k", "3", "--json", "--no-server"])
    assert r.exit_code == 0, r.output
    hits = json.loads(r.stdout)["hits"]
    assert hits[0]["path"] == photo and hits[0]["distance"] == pytest.approx(0, abs=1e-3)
    info = runner.invoke(main, ["--home", home, "info", "--json"])
    assert '"dim": 8' in info.output


def test_whiten_options_need_whiten_only(tmp_path):
    from engine.cli import main
    from tests.util import make_class_tree

    make_class_tree(tmp_path / "data", 3, 3, size=32)
    r = CliRunner().invoke(main, ["train", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--whiten", "pca"])
    assert r.exit_code == 2 and "--whiten-only" in r.output
