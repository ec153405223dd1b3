import numpy as np
import pytest
import torch

from engine.config import EncoderConfig
from engine.encoder import build_encoder, load_checkpoint, load_encoder, save_checkpoint
from engine.errors import ModelError
from engine.weights import find_package_weights, map_lukemelas_state_dict


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_encoder(EncoderConfig(backbone="test_efficientnet", pretrained=False, image_size=32, head_dim=16))


def test_embed_shape_dtype_and_unit_norm(tiny):
    x = torch.randn(3, 3, 32, 32)
    out = tiny.embed(x)
    assert out.shape == (3, 16) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)


def test_checkpoint_round_trip_reproduces_embeddings_exactly(tiny, tmp_path):
    tiny.threshold = 0.7
    path = save_checkpoint(tiny, tmp_path / "ck.pt", metadata={"note": "x"})
    again = load_checkpoint(path)
    x = torch.randn(2, 3, 32, 32)
    np.testing.assert_array_equal(tiny.embed(x), again.embed(x))
    assert again.threshold == 0.7 and again.metadata["note"] == "x"
    assert again.identity() == tiny.identity()
    assert again.data_config["input_size"] == (3, 32, 32)
    assert load_encoder(str(path)).identity() == tiny.identity()


def test_square_head_starts_as_identity():
    enc = build_encoder(EncoderConfig(backbone="test_resnet", pretrained=False, head_dim=96))
    assert enc.feature_dim == 96
    torch.testing.assert_close(enc.head.weight, torch.eye(96))


def test_bad_model_files_raise_model_error(tmp_path):
    with pytest.raises(ModelError, match="no such model file"):
        load_checkpoint(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"garbage")
    with pytest.raises(ModelError, match="cannot read"):
        load_checkpoint(junk)
    with pytest.raises(ModelError, match="unknown timm backbone"):
        build_encoder(EncoderConfig(backbone="no_such_net", pretrained=False))


def test_lukemelas_mapping_checks_shapes():
    src = {"_a": torch.zeros(2, 3), "_b": torch.zeros(4)}
    dst = {"a": torch.ones(2, 3), "b": torch.ones(4)}
    assert list(map_lukemelas_state_dict(src, dst)) == ["a", "b"]
    with pytest.raises(ModelError, match="does not fit"):
        map_lukemelas_state_dict(src, {"a": torch.ones(3, 2), "b": torch.ones(4)})


@pytest.mark.skipif(find_package_weights("tf_efficientnet_lite0") is None, reason="offline weights package absent")
def test_offline_package_weights_classify_a_synthetic_image(monkeypatch):
    """The packaged ImageNet weights load into timm's tf_efficientnet_lite0 and behave like a trained
    network: confident, input-dependent predictions rather than a random init's near-uniform ones."""
    import timm

    from engine.weights import load_package_weights

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    assert load_package_weights(model, "tf_efficientnet_lite0")
    model.eval()
    raw = torch.load(find_package_weights("tf_efficientnet_lite0"), map_location="cpu", weights_only=True)
    torch.testing.assert_close(model.conv_stem.weight, raw["_conv_stem.weight"])
    torch.testing.assert_close(model.classifier.weight, raw["_fc.weight"])
    monkeypatch.setenv("ENGINE_OFFLINE", "1")
    enc = build_encoder(EncoderConfig())  # the default path: offline -> package
    assert enc.metadata["weights_source"] == "package" and enc.dim == 1280
    torch.testing.assert_close(enc.backbone.conv_stem.weight, raw["_conv_stem.weight"])
