"""Where the projection head starts: identity, PCA, PCA completed when the data is too small, padded
identity for a head wider than the features; and ``--dim`` with any amount of data (issue 13 item 7)."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from engine.config import EncoderConfig
from engine.encoder import build_encoder, load_checkpoint
from tests.util import make_class_tree
from train.config import TrainConfig
from train.head import init_head, with_head
from train.loop import train


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _encoder(dim: int, backbone: str = "test_resnet"):  # test_resnet: 96 features
    torch.manual_seed(0)
    return with_head(build_encoder(EncoderConfig(backbone, image_size=32, pretrained=False)), dim, "cpu")


def _orthonormal_rows(w: torch.Tensor) -> bool:
    w = w.detach().double()
    return torch.allclose(w @ w.T, torch.eye(len(w), dtype=torch.float64), atol=1e-5)


def test_square_head_is_the_identity():
    encoder = _encoder(96)
    assert torch.equal(encoder.head.weight.detach(), torch.eye(96))
    assert init_head(encoder, None) == "identity"


def test_narrow_head_is_the_pca_of_enough_features():
    encoder = _encoder(8)
    rng = np.random.default_rng(0)
    features = (rng.normal(size=(200, 96)) * np.r_[20.0, np.linspace(1, 0.1, 95)] + 3).astype(np.float32)
    assert init_head(encoder, features) == "PCA of the training features"
    w = encoder.head.weight.detach().double()
    assert _orthonormal_rows(w)
    # The top principal direction of these features is the first axis (largest scale).
    assert abs(float(w[0, 0])) > 0.9
    # Centred: the mean feature maps to zero.
    centre = encoder.head(torch.from_numpy(features.mean(0, keepdims=True)))
    assert torch.allclose(centre, torch.zeros_like(centre), atol=1e-4)


def test_narrow_head_with_fewer_images_than_dimensions_is_completed(caplog):
    encoder = _encoder(64)
    features = np.random.default_rng(1).normal(size=(40, 96)).astype(np.float32)
    with caplog.at_level(logging.WARNING, logger="train.head"):
        how = init_head(encoder, features, seed=3)
    assert "PCA gives only 39 directions from 40 training images" in how
    assert "random orthonormal" in caplog.text
    w = encoder.head.weight.detach().double()
    assert w.shape == (64, 96) and _orthonormal_rows(w)
    # The 39 data directions span the centred features: the head keeps all of their variance.
    x = torch.from_numpy(features).double()
    centred = x - x.mean(0)
    assert torch.allclose((centred @ w.T).norm(dim=1), centred.norm(dim=1), atol=1e-4)
    # Seeded: the same start again.
    again = _encoder(64)
    init_head(again, features, seed=3)
    assert torch.equal(again.head.weight, encoder.head.weight)


def test_wide_head_is_a_padded_identity():
    encoder = _encoder(128)
    init_head(encoder, None)
    w = encoder.head.weight.detach()
    assert torch.equal(w[:96], torch.eye(96)) and not w[96:].any() and not encoder.head.bias.detach().any()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        encoder.eval()
        bare = torch.nn.functional.normalize(encoder.backbone(x), dim=1)
        assert torch.allclose(encoder(x)[:, :96], bare, atol=1e-6)


@pytest.mark.parametrize("cached", [True, False])
def test_any_dim_trains_on_a_handful_of_images(tmp_path, cached):
    make_class_tree(tmp_path / "data", classes=4, per_class=3)  # 6 training images after the split
    config = TrainConfig(backbone="test_efficientnet", pretrained=False, image_size=32, epochs=1, batch_size=6,
                         images_per_class=3, val_classes=0.5, workers=0, device="cpu", val_pairs=20, patience=0,
                         plots=False, dim=16, train_stages=0 if cached else None, freeze_epochs=0,
                         steps_per_epoch=1)
    result = train(tmp_path / "data", tmp_path / "run", config)
    assert [r["epoch"] for r in result.history] == [0, 1] and result.history[1]["train_loss"] is not None
    assert load_checkpoint(tmp_path / "run" / "last.pt").dim == 16
    wide = train(tmp_path / "data", tmp_path / "wide", replace(config, dim=300))  # wider than the 256 features
    assert load_checkpoint(wide.checkpoint).dim == 300


def test_cli_cpu_quick_with_a_dim_wider_than_the_data(tmp_path):
    """The report: 50 photos in 10 classes, --preset cpu-quick --dim 64 stopped with a RuntimeError."""
    from engine.cli import main

    make_class_tree(tmp_path / "photos", classes=10, per_class=5)
    args = ["--device", "cpu", "train", str(tmp_path / "photos"), "--out", str(tmp_path / "run"), "--preset",
            "cpu-quick", "--dim", "64", "--backbone", "test_efficientnet", "--no-pretrained", "--image-size", "32",
            "--epochs", "1", "--workers", "0", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert load_checkpoint(Path(tmp_path / "run" / "checkpoint.pt")).dim == 64
