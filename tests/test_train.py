"""The training loop end to end on tiny generated images with tiny timm models (pretrained=False)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.config import EncoderConfig
from engine.checkpoint import save_checkpoint
from engine.encoder import build_encoder, load_checkpoint
from engine.errors import DataError, EngineError, ModelError
from train.backbone import Tail, backbone_parts
from train.config import PRESETS, TrainConfig, resolve_preset
from train.head import with_head
from train.loop import train

N_CLASSES, PER_CLASS = 8, 6


pytestmark = pytest.mark.usefixtures("one_torch_thread")




def _make_tree(root: Path, n_classes: int = N_CLASSES, per_class: int = PER_CLASS, seed: int = 0) -> Path:
    """Classes of one colour each plus noise: separable, and different enough from one another."""
    rng = np.random.default_rng(seed)
    for c in range(n_classes):
        colour = rng.integers(0, 255, 3)
        (root / f"class{c:02d}").mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            pixels = np.clip(colour[None, None, :] + rng.normal(0, 20, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"class{c:02d}" / f"{k}.png")
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return _make_tree(tmp_path_factory.mktemp("data") / "set")


BASE = TrainConfig(backbone="test_efficientnet", pretrained=False, image_size=32, epochs=2, batch_size=16,
                   images_per_class=4, val_classes=0.25, workers=0, device="cpu", val_pairs=200, lr=1e-3,
                   backbone_lr=1e-3, freeze_epochs=0, patience=0, plots=False)


@pytest.fixture(scope="module")
def image_run(tree, tmp_path_factory):
    """Two epochs of image training (augmentation on, whole backbone learning after one frozen epoch)."""
    out = tmp_path_factory.mktemp("runs") / "image"
    events: list[str] = []  # "phase" when a progress phase opens, "step" per step, "epoch_end" per record
    records: list[dict] = []

    def progress(done: int, total: int | None) -> None:
        events.append("step" if done else "phase")

    def on_epoch(record: dict) -> None:
        events.append("epoch_end")
        records.append(record)

    result = train(tree, out, replace(BASE, freeze_epochs=1, plots=True), progress=progress, on_epoch=on_epoch)
    return result, events, records


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_folder_has_everything(image_run):
    result, events, records = image_run
    out = result.out_dir
    for name in ("checkpoint.pt", "last.pt", "metrics.jsonl", "loss.png", "distances.png", "pairs.png"):
        assert (out / name).stat().st_size > 0, name
    lines = _lines(out / "metrics.jsonl")
    assert [r["epoch"] for r in lines] == [0, 1, 2] == [r["epoch"] for r in result.history]
    assert result.config.loss == "triplet" and result.config.miner == "batch-hard"  # class folders: batch-hard triplets
    for r in lines[1:]:
        for key in ("train_loss", "val_loss", "active", "images_per_s", "recall@1", "recall@5", "map@r",
                    "pair_accuracy", "roc_auc", "threshold"):
            assert r[key] is not None, key
        assert 0.0 <= r["active"] <= 1.0
    assert lines[1]["frozen_backbone"] is True and lines[2]["frozen_backbone"] is False
    assert events.count("phase") == 2 and events.count("step") >= 2 and events.count("epoch_end") == 3
    assert records == lines  # on_epoch sees each record as metrics.jsonl has it
    # The best epoch is the best validation MAP@R, epoch 0 included.
    assert result.best_metrics["map@r"] == max(r["map@r"] for r in lines)
    assert result.select_metric == "map@r"
    d = result.to_dict()
    assert d["best_epoch"] == result.best_epoch and d["config"]["epochs"] == 2
    json.dumps(d)


def test_checkpoint_loads_and_reproduces_the_best_validation(image_run, tree, tmp_path):
    from engine.embedding import embed_files
    from engine.metrics import retrieval_metrics
    from train.data import load_class_folder, split_classes

    result, _, _ = image_run
    encoder = load_checkpoint(result.checkpoint)
    assert encoder.threshold == pytest.approx(result.threshold)
    assert encoder.metadata["epoch"] == result.best_epoch
    _, val = split_classes(load_class_folder(tree), 0.25, seed=0)
    emb = embed_files(encoder, val.paths, workers=0).embeddings
    assert retrieval_metrics(emb, val.labels)["map@r"] == pytest.approx(result.best_metrics["map@r"], abs=1e-6)
    # Round trip: save and load again, the embeddings are bit for bit the same.
    again = load_checkpoint(save_checkpoint(encoder, tmp_path / "copy.pt"))
    assert again.threshold == encoder.threshold
    assert np.array_equal(embed_files(again, val.paths, workers=0).embeddings, emb)


def test_resume_continues_the_same_run(tree, tmp_path):
    config = replace(BASE, epochs=2, images_per_class=3, batch_size=12)

    class Crash(Exception):
        pass

    def crash_after_epoch_1(record):
        if record["epoch"] == 1:
            raise Crash

    straight = train(tree, tmp_path / "straight", config)
    with pytest.raises(Crash):
        train(tree, tmp_path / "resumed", config, on_epoch=crash_after_epoch_1)
    with pytest.raises(EngineError, match="already holds a training run"):
        train(tree, tmp_path / "resumed", config)
    with pytest.raises(EngineError, match="different settings"):
        train(tree, tmp_path / "resumed", replace(config, lr=0.5), resume=True)
    resumed = train(tree, tmp_path / "resumed", config, resume=True)
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for key, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][key]), key
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("time_s", "images_per_s")} for r in h]  # noqa: E731
    assert strip(straight.history) == strip(resumed.history)
    assert [r["epoch"] for r in _lines(tmp_path / "resumed" / "metrics.jsonl")] == [0, 1, 2]
    with pytest.raises(EngineError, match="nothing to resume"):
        train(tree, tmp_path / "never", config, resume=True)


class RunsCode:
    """Pickles as a call to ``exec``: unpickling it unsafely creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def test_resume_refuses_a_state_that_would_run_code(tree, tmp_path):
    """Issue 9: a shared run folder must not run code on --resume; last.pt is read as plain data only."""
    run, marker = tmp_path / "shared", tmp_path / "code-ran"
    config = replace(BASE, train_stages=0, epochs=1, steps_per_epoch=1)
    train(tree, run, config)
    state = torch.load(run / "last.pt", weights_only=True)  # what training writes needs no code to read
    state["history"].append(RunsCode(marker))
    torch.save(state, run / "last.pt")
    with pytest.raises(ModelError) as err:
        train(tree, run, replace(config, epochs=2), resume=True)
    message = str(err.value)
    assert "refusing resume state" in message and "last.pt" in message and "exec" in message
    assert "\n" not in message and "weights_only" not in message
    assert not marker.exists()


def test_resume_after_a_crash_inside_the_first_epoch(tree, tmp_path):
    config = replace(BASE, train_stages=0, epochs=2, steps_per_epoch=3)

    epochs_seen: list[int] = []

    def crash_at_first_step(done, total):
        if epochs_seen and done:  # after epoch 0's record, the first finished step of epoch 1
            raise KeyboardInterrupt

    straight = train(tree, tmp_path / "straight", config)
    with pytest.raises(KeyboardInterrupt):
        train(tree, tmp_path / "resumed", config, progress=crash_at_first_step,
              on_epoch=lambda record: epochs_seen.append(record["epoch"]))
    assert epochs_seen == [0]
    resumed = train(tree, tmp_path / "resumed", config, resume=True)
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in straight.history]
    a = load_checkpoint(tmp_path / "straight" / "last.pt").state_dict()
    b = load_checkpoint(tmp_path / "resumed" / "last.pt").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_loss_decreases_on_a_separable_toy_set(tree, tmp_path):
    # Head only on cached features: a few hundred steps in a second or two.
    config = replace(BASE, train_stages=0, epochs=12, steps_per_epoch=4, lr=3e-3, loss="contrastive", margin=1.0)
    result = train(tree, tmp_path / "toy", config)
    losses = [r["train_loss"] for r in result.history[1:]]
    assert losses[-1] < 0.7 * losses[0], losses
    assert result.history[-1]["map@r"] >= result.history[0]["map@r"] - 1e-9 or result.best_epoch > 0


def test_epoch_zero_is_a_candidate(tree, tmp_path):
    # A learning rate that wrecks the head: no epoch beats the untouched encoder, which is what is saved.
    config = replace(BASE, train_stages=0, epochs=2, lr=5.0, grad_clip=0.0, loss="triplet", miner="all",
                     weight_decay=0.0)
    result = train(tree, tmp_path / "wreck", config)
    assert result.best_epoch == 0
    saved = load_checkpoint(result.checkpoint)
    head = saved.head.weight.detach()
    assert torch.equal(head, torch.eye(head.shape[0]))  # the identity head, as it started
    # --epochs 0: the untouched encoder, calibrated and saved.
    calibrated = train(tree, tmp_path / "zero", replace(config, epochs=0))
    assert calibrated.best_epoch == 0 and len(calibrated.history) == 1
    assert load_checkpoint(calibrated.checkpoint).threshold == pytest.approx(calibrated.threshold)


def test_cached_last_stage_training_matches_the_full_encoder(tree, tmp_path):
    from engine.embedding import embed_files
    from engine.metrics import retrieval_metrics
    from train.data import load_class_folder, split_classes

    start = tmp_path / "start.pt"
    torch.manual_seed(3)
    init = build_encoder(EncoderConfig("test_efficientnet", image_size=32, pretrained=False))
    torch.save(init.backbone.state_dict(), start)
    config = replace(BASE, train_stages=1, cache_features=True, cache_views=2, epochs=3, weights=str(start),
                     lr=1e-2, backbone_lr=1e-2, dim=16)
    result = train(tree, tmp_path / "cached", config)
    encoder = load_checkpoint(tmp_path / "cached" / "last.pt")
    assert encoder.dim == 16 and encoder.config.head_dim == 16
    parts = backbone_parts(encoder.backbone)
    before = backbone_parts(init.backbone)
    # Stem and all stages but the last never move; the last stage did.
    for old, new in zip(before.stem + before.stages[:-1], parts.stem + parts.stages[:-1]):
        for p, q in zip(old.parameters(), new.parameters()):
            assert torch.equal(p.cpu(), q.cpu())
    assert any(not torch.equal(p, q) for p, q in zip(before.stages[-1].parameters(), parts.stages[-1].parameters()))
    # What validation saw through the cached tail is what the saved encoder embeds from images.
    best = load_checkpoint(result.checkpoint)
    _, val = split_classes(load_class_folder(tree), 0.25, seed=0)
    emb = embed_files(best, val.paths, workers=0).embeddings
    assert retrieval_metrics(emb, val.labels)["map@r"] == pytest.approx(result.best_metrics["map@r"], abs=1e-5)


@pytest.mark.parametrize("backbone", ["test_efficientnet", "test_resnet"])
def test_tail_over_cached_prefix_equals_the_encoder(backbone):
    torch.manual_seed(0)
    encoder = with_head(build_encoder(EncoderConfig(backbone, image_size=32, pretrained=False)), 12, "cpu")
    torch.nn.init.normal_(encoder.head.weight)
    encoder.eval()
    parts = backbone_parts(encoder.backbone)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        full = encoder(x)
        for k in list(range(len(parts.stages))) + [None]:
            cut = len(parts.stages) if k is None else k
            cached = x
            for m in parts.prefix(cut):
                cached = m(cached)
            if k is None:
                cached = encoder.backbone.forward_head(cached)
            assert torch.allclose(Tail(encoder, parts, k)(cached), full, atol=1e-5), k


def test_pair_list_trains_with_contrastive_loss(tmp_path):
    root = _make_tree(tmp_path / "imgs", n_classes=6, per_class=3, seed=1)
    rows = []
    classes = sorted(p.name for p in root.iterdir())
    for c, name in enumerate(classes):
        rows.append(f"imgs/{name}/0.png,imgs/{name}/1.png,1")
        rows.append(f"imgs/{name}/1.png,imgs/{name}/2.png,1")
        for other in classes[c + 1:]:
            rows.append(f"imgs/{name}/0.png,imgs/{other}/2.png,0")
    csv = tmp_path / "pairs.csv"
    csv.write_text("img_a,img_b,label\n" + "\n".join(rows) + "\n")
    config = replace(BASE, epochs=1, val_classes=0.34, train_stages=0)
    result = train(csv, tmp_path / "pairs", config)
    assert result.config.loss == "contrastive"  # the default for a pair list
    assert result.history[1]["train_loss"] is not None
    assert result.history[1]["roc_auc"] is not None and result.select_metric == "roc_auc"
    assert load_checkpoint(result.checkpoint).threshold == pytest.approx(result.threshold)
    with pytest.raises(DataError, match="triplet loss needs class labels"):
        train(csv, tmp_path / "triplet", replace(config, loss="triplet"))
    with pytest.raises(DataError, match="needs class labels"):
        train(csv, tmp_path / "miner", replace(config, miner="batch-hard"))


def test_bad_training_data_is_one_clear_error(tmp_path):
    root = _make_tree(tmp_path / "bad", n_classes=3, per_class=2)
    (root / "class00" / "1.png").write_bytes(b"\x89PNG truncated")
    (root / "lonely").mkdir()
    with pytest.raises(DataError, match=r"bad training data .*1 classes with fewer than 2 images \(lonely: 0\).*"
                                         r"1 unreadable files \(class00/1.png"):
        train(root, tmp_path / "out", BASE)
    assert not (tmp_path / "out").exists()


def test_resolve_preset_fills_only_what_was_not_given():
    quick = resolve_preset(TrainConfig(preset="cpu-quick", epochs=3))
    assert quick.epochs == 3
    assert quick.train_stages == PRESETS["cpu-quick"]["train_stages"]
    assert quick.cache_features is True
    default = resolve_preset(TrainConfig())
    assert default.loss is None and default.train_stages is None and default.epochs == 30  # loss follows the data
    assert resolve_preset(TrainConfig(preset="gpu")) == replace(default, preset="gpu")
    with pytest.raises(DataError, match="unknown preset"):
        resolve_preset(TrainConfig(preset="tpu"))
    with pytest.raises(DataError, match="unknown loss"):
        resolve_preset(TrainConfig(loss="arcface"))
    with pytest.raises(DataError, match="val-classes"):
        resolve_preset(TrainConfig(val_classes=0.0))


def test_narrow_head_starts_from_pca(tree, tmp_path):
    from engine.embedding import embed_files

    config = replace(BASE, dim=6, epochs=1, steps_per_epoch=1, lr=1e-6, backbone_lr=1e-9)
    result = train(tree, tmp_path / "pca", config)
    encoder = load_checkpoint(result.checkpoint)
    assert encoder.dim == 6 and encoder.head.weight.shape == (6, encoder.feature_dim)
    # The head's rows are orthonormal principal directions of the training features.
    w = encoder.head.weight.detach().double()
    assert torch.allclose(w @ w.T, torch.eye(6, dtype=torch.float64), atol=1e-4)
    emb = embed_files(encoder, [str(p) for p in sorted(tree.rglob("*.png"))[:4]], workers=0).embeddings
    assert emb.shape == (4, 6) and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_patience_stops_a_run_that_no_longer_improves(tree, tmp_path):
    config = replace(BASE, train_stages=0, epochs=6, steps_per_epoch=1, lr=5.0, grad_clip=0.0, weight_decay=0.0,
                     patience=2)
    result = train(tree, tmp_path / "patient", config)
    assert result.stopped_early and result.best_epoch == 0 and len(result.history) == 3
