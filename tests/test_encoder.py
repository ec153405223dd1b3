import pickle
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner

from engine.checkpoint import checkpoint_payload, read_torch_file, save_checkpoint, save_payload
from engine.cli import main
from engine.config import EncoderConfig
from engine.encoder import DEFAULT_THRESHOLD, build_encoder, load_checkpoint, load_encoder
from engine.errors import ModelError
from engine.folding import fold_batchnorm
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
    # An engine checkpoint given as --weights wins wholesale: head, threshold and all.
    started = build_encoder(EncoderConfig(backbone="test_resnet", pretrained=False, weights=str(path)))
    assert started.identity() == tiny.identity() and started.threshold == 0.7


def test_decision_threshold_is_the_calibrated_one_else_the_default(tiny):
    tiny.threshold = None
    assert tiny.decision_threshold == DEFAULT_THRESHOLD
    tiny.threshold = 0.7
    assert tiny.decision_threshold == 0.7


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
    plain = tmp_path / "plain.pt"
    torch.save({"a": torch.zeros(2)}, plain)
    with pytest.raises(ModelError, match="not an engine checkpoint"):
        load_checkpoint(plain)


def test_newer_or_incomplete_checkpoints_are_refused(tiny, tmp_path):
    payload = checkpoint_payload(tiny)
    save_payload({**payload, "version": 99}, tmp_path / "new.pt")
    with pytest.raises(ModelError, match="newer engine"):
        load_checkpoint(tmp_path / "new.pt")
    save_payload({k: v for k, v in payload.items() if k != "data_config"}, tmp_path / "cut.pt")
    with pytest.raises(ModelError, match="not a usable engine checkpoint"):
        load_checkpoint(tmp_path / "cut.pt")
    state = dict(payload["state_dict"])
    state.pop("head.bias")
    save_payload({**payload, "state_dict": state}, tmp_path / "short.pt")
    with pytest.raises(ModelError, match="not a usable engine checkpoint"):
        load_checkpoint(tmp_path / "short.pt")


def test_plain_state_dict_weights_fill_the_backbone(tmp_path):
    torch.manual_seed(1)
    source = timm.create_model("test_resnet", pretrained=False)  # with its classifier: dropped on load
    torch.save(source.state_dict(), tmp_path / "w.pt")
    enc = build_encoder(EncoderConfig(backbone="test_resnet", pretrained=False, weights=str(tmp_path / "w.pt")))
    assert enc.metadata["weights_source"] == str(tmp_path / "w.pt")
    torch.testing.assert_close(enc.backbone.conv1[0].weight, source.conv1[0].weight.contiguous(
        memory_format=torch.channels_last))
    with pytest.raises(ModelError, match="do not fit test_efficientnet"):
        build_encoder(EncoderConfig(backbone="test_efficientnet", pretrained=False, weights=str(tmp_path / "w.pt")))


def _leave_marker(path: str) -> str:
    """What the crafted pickle calls when it is unpickled without the safeguard."""
    Path(path).write_text("code ran")
    return "weights"


class _Payload:
    """Pickles as a call to ``_leave_marker``: unpickling it runs code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (_leave_marker, (self.marker,))


def _malicious_checkpoint(path: Path, marker: Path, tiny) -> Path:
    payload = checkpoint_payload(tiny)
    payload["metadata"]["note"] = _Payload(marker)
    torch.save(payload, path)
    return path


def test_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tiny, tmp_path):
    # The crafted file really runs code when loaded without the safeguard (else this test proves nothing).
    twin_marker = tmp_path / "twin-ran"
    twin = _malicious_checkpoint(tmp_path / "twin.pt", twin_marker, tiny)
    with open(twin, "rb"):
        torch.load(twin, map_location="cpu", weights_only=False)
    assert twin_marker.exists()

    marker = tmp_path / "ran"
    evil = _malicious_checkpoint(tmp_path / "evil.pt", marker, tiny)
    for load in (load_checkpoint, load_encoder, read_torch_file,
                 lambda p: build_encoder(EncoderConfig(backbone="test_efficientnet", weights=str(p)))):
        with pytest.raises(ModelError) as caught:
            load(evil)
        message = str(caught.value)
        assert str(evil) in message and "refusing" in message and "_leave_marker" in message
        assert "\n" not in message and "weights_only" not in message
    r = CliRunner().invoke(main, ["--home", str(tmp_path / "home"), "--device", "cpu", "compare",
                                  str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--model", str(evil)])
    assert r.exit_code == 1 and str(evil) in r.output and "refusing" in r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert "weights_only" not in r.output
    assert not marker.exists()


def test_a_pickle_that_is_not_a_torch_file_is_refused_without_running(tmp_path):
    marker = tmp_path / "ran"
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(_Payload(marker), protocol=2))
    with pytest.raises(ModelError, match="refusing"):
        load_checkpoint(raw)
    assert not marker.exists()


def _count(model: torch.nn.Module, kind: str) -> int:
    return sum(kind in type(m).__name__ for m in model.modules())


def test_fold_batchnorm_merges_norms_into_convs_with_the_same_output():
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=0)
    for m in model.modules():  # non-trivial running statistics, so a wrong fold would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 32, 32)
    folded = fold_batchnorm(model, x[:1])
    assert folded is not model
    assert _count(model, "BatchNorm") > 0 and _count(folded, "BatchNorm") == 0
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)
    for key, value in model.state_dict().items():  # the original is untouched
        torch.testing.assert_close(value, before[key])
    assert fold_batchnorm(model.train(), x[:1]) is model  # training mode: nothing to fold


def test_embed_uses_a_folded_copy_that_follows_weight_changes():
    torch.manual_seed(0)
    enc = build_encoder(EncoderConfig(backbone="test_efficientnet", pretrained=False, image_size=32))
    x = torch.randn(8, 3, 32, 32)  # at least FOLD_MIN_BATCH: the folded copy is used
    first = enc.embed(x)
    assert enc._folded.module_for(enc.backbone, x) is not enc.backbone  # folding happened
    with torch.no_grad():
        np.testing.assert_allclose(first, enc(x.contiguous(memory_format=torch.channels_last)).numpy(), atol=1e-5)
        for p in enc.backbone.parameters():
            p.mul_(0.5)
        expected = enc(x.contiguous(memory_format=torch.channels_last)).numpy()
    second = enc.embed(x)
    assert np.abs(second - first).max() > 1e-3
    np.testing.assert_allclose(second, expected, atol=1e-5)
    assert "_folded" not in "".join(enc.state_dict())


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
