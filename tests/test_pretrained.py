"""The offline ImageNet encoder on real photos: same-class retrieval far above a random init."""

from pathlib import Path

import numpy as np
import pytest

from engine.config import EncoderConfig
from engine.embedding import embed_files
from engine.encoder import build_encoder
from engine.weights import find_package_weights

CALTECH = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "caltech101-dev"
CLASSES = ["accordion", "airplanes", "bonsai", "butterfly", "car_side", "chair", "dalmatian", "elephant"]


def _precision_at_1(embeddings: np.ndarray, labels: np.ndarray) -> float:
    sims = embeddings @ embeddings.T
    np.fill_diagonal(sims, -np.inf)
    return float(np.mean(labels[sims.argmax(1)] == labels))


@pytest.mark.skipif(not CALTECH.is_dir(), reason="caltech101-dev not present")
@pytest.mark.skipif(find_package_weights("tf_efficientnet_lite0") is None, reason="offline weights absent")
def test_pretrained_retrieves_same_class_far_better_than_random(monkeypatch):
    monkeypatch.setenv("ENGINE_OFFLINE", "1")
    paths, labels = [], []
    for label, name in enumerate(CLASSES):
        files = sorted((CALTECH / name).glob("*.jpg"))[10:18]  # not the demo's sample images
        paths += [str(f) for f in files]
        labels += [label] * len(files)
    labels = np.asarray(labels)
    pretrained = build_encoder(EncoderConfig())
    random_init = build_encoder(EncoderConfig(pretrained=False))
    p_pre = _precision_at_1(embed_files(pretrained, paths, workers=0).embeddings, labels)
    p_rand = _precision_at_1(embed_files(random_init, paths, workers=0).embeddings, labels)
    assert p_pre >= 0.85, p_pre
    assert p_pre >= p_rand + 0.3, (p_pre, p_rand)
