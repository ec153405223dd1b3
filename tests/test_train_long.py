"""``--preset cpu-long``: the small from-scratch net, images held in memory and warped, quarter-turn
classes, the prototypical loss, the time budget, and the checkpoint's way into ingest and query."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image, ImageDraw

from engine.config import EncoderConfig
from engine.errors import DataError
from train.config import TrainConfig, resolve_preset


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _glyph_tree(root: Path, classes: int = 8, per_class: int = 6, size: int = 40) -> Path:
    """Grey 'characters': each class three seeded strokes, each drawing of it the strokes moved by a
    pixel or two (1-bit-like black on white, mode L, as omniglot)."""
    for c in range(classes):
        rng = np.random.default_rng(500 + c)
        strokes = rng.integers(4, size - 4, (3, 4))
        for k in range(per_class):
            jitter = np.random.default_rng(c * 100 + k).integers(-2, 3, strokes.shape)
            img = Image.new("L", (size, size), 255)
            draw = ImageDraw.Draw(img)
            for x0, y0, x1, y1 in (strokes + jitter).tolist():
                draw.line((x0, y0, x1, y1), fill=0, width=3)
            (root / f"glyph{c:02d}").mkdir(parents=True, exist_ok=True)
            img.save(root / f"glyph{c:02d}" / f"{k}.png")
    return root


@pytest.fixture(scope="module")
def glyphs(tmp_path_factory) -> Path:
    return _glyph_tree(tmp_path_factory.mktemp("glyphs") / "set")


# cpu-long with tiny sizes: one short epoch, no time budget, no figures.
LONG = TrainConfig(preset="cpu-long", epochs=1, batch_size=16, images_per_class=4, val_classes=0.25, workers=0,
                   device="cpu", val_pairs=100, plots=False, time_budget_min=None)


# ------------------------------------------------------------------------------------------- the preset


def test_cpu_long_preset_trains_a_small_net_from_scratch():
    config = resolve_preset(TrainConfig(preset="cpu-long"))
    assert (config.backbone, config.pretrained, config.augment, config.class_rotations, config.loss) == \
        ("small_cnn", False, "affine", 4, "prototypical")
    assert config.time_budget_min and config.time_budget_min <= 60
    # Given options win over the preset's, as for every preset.
    assert resolve_preset(TrainConfig(preset="cpu-long", class_rotations=1)).class_rotations == 1
    assert resolve_preset(TrainConfig(preset="cpu-quick")).pretrained is True
    with pytest.raises(DataError, match="augment='affine'"):
        resolve_preset(TrainConfig(preset="cpu-quick", class_rotations=4))
    with pytest.raises(DataError, match="augment"):
        resolve_preset(TrainConfig(preset="cpu-long", augment="mixup"))


def test_small_cnn_is_a_timm_model_with_its_own_data_config():
    import timm

    from engine.encoder import build_encoder

    encoder = build_encoder(EncoderConfig(backbone="small_cnn", pretrained=False))
    assert isinstance(timm.create_model("small_cnn", pretrained=False, num_classes=0), torch.nn.Module)
    assert encoder.data_config["input_size"] == (3, 28, 28)
    assert encoder.data_config["mean"] == (0.5, 0.5, 0.5) and encoder.data_config["crop_pct"] == 1.0
    out = encoder.embed(torch.randn(5, 3, 28, 28))
    assert out.shape == (5, 64) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert encoder.metadata["weights_source"] == "random"


# ------------------------------------------------------------------------------------------- units


def test_rotation_labels_make_each_quarter_turn_a_class():
    from train.tensor_data import rotation_labels

    labels = np.array([0, 2, 1, 1])
    assert rotation_labels(labels, 3, 1).tolist() == [0, 2, 1, 1]
    assert rotation_labels(labels, 3, 4).tolist() == [0, 2, 1, 1, 3, 5, 4, 4, 6, 8, 7, 7, 9, 11, 10, 10]


def test_affine_warp_against_exact_references():
    from train.tensor_data import affine_matrices, warp

    x = torch.from_numpy(np.random.default_rng(0).normal(size=(3, 1, 12, 12)).astype(np.float32))
    identity = affine_matrices(3, torch.Generator().manual_seed(1), strength=0.0)
    assert torch.equal(identity, torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(3, 2, 3))
    torch.testing.assert_close(warp(x, identity), x, atol=1e-5, rtol=0)
    # A quarter turn through the sampling grid lands on pixel centres: exactly torch.rot90.
    quarter = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0]]).expand(3, 2, 3)
    turned = warp(x, quarter)
    assert any(torch.allclose(turned, torch.rot90(x, k, (2, 3)), atol=1e-5) for k in (1, -1))
    # A shift by one pixel (2/12 in normalised units) moves every column by one; the border repeats.
    shift = torch.tensor([[1.0, 0.0, 2.0 / 12], [0.0, 1.0, 0.0]]).expand(3, 2, 3)
    moved = warp(x, shift)
    torch.testing.assert_close(moved[..., :-1], x[..., 1:], atol=1e-5, rtol=0)
    torch.testing.assert_close(moved[..., -1], x[..., -1], atol=1e-5, rtol=0)
    # Seeded: the same generator seed draws the same warps; a different one others.
    a = affine_matrices(4, torch.Generator().manual_seed(7))
    assert torch.equal(a, affine_matrices(4, torch.Generator().manual_seed(7)))
    assert not torch.equal(a, affine_matrices(4, torch.Generator().manual_seed(8)))


def _prototypical_reference(emb: np.ndarray, labels: np.ndarray, scale: float) -> tuple[float, float]:
    """Loop-by-loop: first half of each class (>= 1) is its prototype, the rest query all prototypes."""
    classes = sorted(set(labels.tolist()))
    protos, queries = [], []
    for k, c in enumerate(classes):
        members = [i for i in range(len(labels)) if labels[i] == c]
        n = max(1, len(members) // 2)
        p = emb[members[:n]].mean(0)
        protos.append(p / np.linalg.norm(p))
        queries += [(i, k) for i in members[n:]]
    losses, wrong = [], 0
    for i, k in queries:
        logits = np.array([scale * float(emb[i] @ p) for p in protos])
        losses.append(-(logits[k] - np.log(np.exp(logits - logits.max()).sum()) - logits.max()))
        wrong += int(np.argmax(logits) != k)
    return float(np.mean(losses)), wrong / len(queries)


def test_prototypical_loss_matches_a_reference_and_learns():
    from train.losses import PROTO_SCALE, build_loss

    rng = np.random.default_rng(3)
    emb = rng.normal(size=(11, 6)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 3, 3])
    loss_fn = build_loss("prototypical", None, None)
    x = torch.from_numpy(emb).requires_grad_(True)
    out = loss_fn(x, torch.from_numpy(labels))
    want, wrong = _prototypical_reference(emb, labels, PROTO_SCALE)
    assert float(out.loss.detach()) == pytest.approx(want, rel=1e-5)
    assert out.active == pytest.approx(wrong) and out.mined == out.total == 6
    out.loss.backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    with pytest.raises(DataError, match="class labels"):
        loss_fn(x, pairs=(torch.tensor([0]), torch.tensor([1]), torch.tensor([1])))
    with pytest.raises(DataError, match="no miner"):
        build_loss("prototypical", "batch-hard", None)


def test_images_held_in_memory_are_the_eval_transform_of_each_file(glyphs):
    from engine.preprocess import build_transform, load_image
    from engine.small_cnn import _cfg
    from train.tensor_data import TensorImages

    paths = sorted(str(p) for p in glyphs.rglob("*.png"))[:6]
    bad = glyphs / "broken.png"
    bad.write_bytes(b"not a png")
    try:
        held = TensorImages.load(paths + [str(bad)], _cfg(28), workers=2)
    finally:
        bad.unlink()
    assert held.images.shape == (7, 1, 28, 28) and held.bad == {6}  # grey: one channel kept
    want = torch.stack([build_transform(_cfg(28))(load_image(p)) for p in paths])
    torch.testing.assert_close(held.images[:6].float().expand(-1, 3, -1, -1), want, atol=4e-3, rtol=0)


# ------------------------------------------------------------------------------------------- end to end


def test_cpu_long_trains_and_its_checkpoint_ingests_and_queries(glyphs, tmp_path):
    from engine.cli import main
    from engine.encoder import load_checkpoint
    from train.loop import train

    result = train(glyphs, tmp_path / "run", LONG)
    assert [r["epoch"] for r in result.history] == [0, 1]
    first = result.history[1]
    assert np.isfinite(first["train_loss"]) and first["images_per_s"] > 0 and 0.0 <= first["active"] <= 1.0
    encoder = load_checkpoint(result.checkpoint)
    assert encoder.config.backbone == "small_cnn" and encoder.data_config["input_size"] == (3, 28, 28)

    home = tmp_path / "home"
    runner = CliRunner()
    r = runner.invoke(main, ["--home", str(home), "--device", "cpu", "ingest", str(glyphs), "--model",
                             str(result.checkpoint), "--workers", "0", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["added"] == 48
    query = glyphs / "glyph03" / "2.png"
    r = runner.invoke(main, ["--home", str(home), "--device", "cpu", "query", str(query), "-k", "3", "--json"])
    assert r.exit_code == 0, r.output
    hits = json.loads(r.output)["hits"]
    assert hits[0]["path"] == str(query) and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)


def test_time_budget_shrinks_the_run(glyphs, tmp_path):
    from train.loop import train

    # A budget no second epoch fits in: the run keeps its first epoch and stops there.
    tight = train(glyphs, tmp_path / "tight", replace(LONG, epochs=5, time_budget_min=1e-4))
    assert [r["epoch"] for r in tight.history] == [0, 1] and tight.config.epochs == 1
    free = train(glyphs, tmp_path / "free", replace(LONG, epochs=3, time_budget_min=None))
    assert [r["epoch"] for r in free.history] == [0, 1, 2, 3]


def test_reschedule_decays_to_zero_at_the_new_end():
    from engine.encoder import build_encoder
    from train.head import with_head
    from train.optimizer import build_optimizer, reschedule

    encoder = with_head(build_encoder(EncoderConfig(backbone="small_cnn", pretrained=False)), 64, "cpu")
    config = resolve_preset(replace(LONG, epochs=10, warmup_epochs=1.0))
    opt = build_optimizer(encoder, [encoder.backbone], config, steps_per_epoch=4, freeze_epochs=0)

    def run_steps(n: int) -> float:
        for _ in range(n):
            opt.step(torch.zeros(()), None)  # no gradient: the update is skipped, the schedule advances
        return opt.optimizer.param_groups[0]["lr"]

    assert run_steps(4) == pytest.approx(config.lr)  # warm-up done after the first epoch
    reschedule(opt, replace(config, epochs=2), steps_per_epoch=4, freeze_epochs=0)
    assert 0 < run_steps(2) < config.lr
    assert run_steps(2) == pytest.approx(0.0, abs=1e-12)


def test_prototypical_loss_refuses_a_pair_list(tmp_path, glyphs):
    from train.loop import train

    paths = sorted(glyphs.rglob("*.png"))
    csv = tmp_path / "pairs.csv"
    rows = [(paths[i], paths[i + d]) for i in range(0, 40, 2) for d in (1, 7)]  # same glyph, another glyph
    csv.write_text("".join(f"{a},{b},{int(a.parent == b.parent)}\n" for a, b in rows))
    with pytest.raises(DataError, match="class labels"):
        train(csv, tmp_path / "run", replace(LONG, class_rotations=1, val=str(csv)))
