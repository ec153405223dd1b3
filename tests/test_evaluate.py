"""engine.evaluate end to end on a tiny generated image tree and a tiny random-init encoder, every
figure checked against a numpy computation on embeddings made separately with embed_files."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.errors import DataError
from engine.evaluate import EvalConfig, evaluate, evaluate_models, format_table
from engine.pairs import read_pairs

CALTECH = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "caltech101-dev"
CLASSES = ("red", "green", "blue")
FAST = dict(workers=0, batch_size=32, n_pairs=200, seed=0, examples=2)


def _image(rng: np.random.Generator, cls: int) -> Image.Image:
    """A random flat colour plus noise, tinted towards the class's channel (stripes for class 1):
    close enough that a random-init encoder ranks some images wrong, so no figure is trivially 1."""
    pixels = rng.uniform(60, 200, size=(1, 1, 3)) + rng.normal(0, 40, (48, 48, 3))
    pixels[..., cls] += 35
    if cls == 1:
        pixels[::8] -= 30
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("tree")
    rng = np.random.default_rng(0)
    for cls, name in enumerate(CLASSES):
        (root / name).mkdir()
        for n in range(4):
            _image(rng, cls).save(root / name / f"{n}.png")
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import torch

    from engine.config import EncoderConfig
    from engine.checkpoint import save_checkpoint
    from engine.encoder import build_encoder

    torch.manual_seed(0)
    enc = build_encoder(EncoderConfig(backbone="test_resnet", pretrained=False, image_size=64))
    return save_checkpoint(enc, tmp_path_factory.mktemp("model") / "ck.pt", threshold=0.5)


@pytest.fixture(scope="module")
def reference(tree, checkpoint):
    from engine.embedding import embed_files
    from engine.files import list_class_folder
    from engine.encoder import load_checkpoint

    paths, labels, _ = list_class_folder(tree)
    embedded = embed_files(load_checkpoint(checkpoint), paths, batch_size=32, workers=0)
    assert not embedded.failures
    return np.asarray(embedded.embeddings, np.float64), labels, paths


def numpy_loo(emb, labels):
    """Leave-one-out figures from the full similarity matrix (stable sort: ties by position)."""
    sims = emb @ emb.T
    n = len(labels)
    out = {"recall@1": [], "recall@5": [], "precision@10": [], "map@r": []}
    for q in range(n):
        others = np.delete(np.arange(n), q)
        order = others[np.argsort(-sims[q, others], kind="stable")]
        rel = labels[order] == labels[q]
        r = rel.sum()
        out["recall@1"].append(rel[:1].any())
        out["recall@5"].append(rel[:5].any())
        out["precision@10"].append(rel[:10].sum() / 10)
        out["map@r"].append(sum(rel[:i + 1].sum() / (i + 1) for i in range(r) if rel[i]) / r)
    return {k: float(np.mean(v)) for k, v in out.items()}


def numpy_verification(distances, same, threshold):
    pos, neg = distances[same == 1], distances[same == 0]
    auc = ((pos[:, None] < neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (pos.size * neg.size)
    called = distances <= threshold
    tp = (called & (same == 1)).sum()
    return {"roc_auc": auc, "accuracy": (called == (same == 1)).mean(),
            "precision": tp / max(called.sum(), 1), "recall": tp / (same == 1).sum()}


def test_loo_figures_match_numpy_and_files_are_written(tree, checkpoint, reference, tmp_path):
    from engine.metrics import sample_pairs

    emb, labels, paths = reference
    out = tmp_path / "out"
    report = evaluate(tree, str(checkpoint), EvalConfig(**FAST), out_dir=out)
    assert report.images == 12 and report.classes == 3 and report.failures == []
    want = numpy_loo(emb, labels)
    for key, value in want.items():
        assert report.metrics[key] == pytest.approx(value, abs=1e-6), key
    assert report.metrics["queries"] == 12
    assert 0 < report.metrics["recall@1"] < 1 and 0 < report.metrics["map@r"] < 1  # not a trivial case

    i, j, same = sample_pairs(labels, 200, seed=0)
    distances = np.sqrt(np.clip(2 - 2 * np.sum(emb[i] * emb[j], axis=1), 0, None))
    assert report.metrics["threshold"] == 0.5  # the checkpoint's own
    for key, value in numpy_verification(distances, same, 0.5).items():
        assert report.metrics[key] == pytest.approx(value, abs=1e-6), key
    best = report.metrics["best_threshold"]
    accuracy_at = lambda t: ((distances <= t) == (same == 1)).mean()  # noqa: E731
    assert accuracy_at(best) == pytest.approx(max(accuracy_at(t) for t in np.concatenate([[-1.0], distances])))

    rows = report.per_class
    assert sorted(r["class"] for r in rows) == sorted(CLASSES)
    assert [r["map@r"] for r in rows] == sorted(r["map@r"] for r in rows)

    for name in ("pr_curve.png", "roc.png", "distances.png", "retrieval_examples.png", "embedding_2d.png",
                 "metrics.json", "report.md"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["reports"][0]["metrics"]["recall@1"] == report.metrics["recall@1"]
    text = (out / "report.md").read_text()
    assert "roc.png" in text and "retrieval_examples.png" in text and "worst first" in text
    table = format_table([report])
    assert "recall@1" in table and "ck.pt" in table and "map@r" in table


def test_split_and_oneshot_protocols(tree, checkpoint):
    split = evaluate(tree, str(checkpoint), EvalConfig(protocol="split", **FAST))
    assert split.metrics["queries"] == 6  # half of each class of four
    oneshot = evaluate(tree, str(checkpoint), EvalConfig(protocol="oneshot", **FAST))
    assert oneshot.metrics["queries"] == 9  # one support image per class
    # With one gallery image per class, the top hit is right exactly when the one-shot call is.
    assert oneshot.metrics["oneshot_accuracy"] == pytest.approx(oneshot.metrics["recall@1"])
    assert oneshot.metrics["map@r"] == pytest.approx(oneshot.metrics["recall@1"])


def test_max_per_class_caps_and_threshold_override(tree, checkpoint):
    report = evaluate(tree, str(checkpoint), EvalConfig(max_per_class=2, threshold=0.3, **FAST))
    assert report.images == 6 and report.metrics["queries"] == 6 and report.metrics["threshold"] == 0.3


def test_two_models_side_by_side(tree, checkpoint, tmp_path):
    other = tmp_path / "other.pt"
    shutil.copy(checkpoint, other)
    reports = evaluate_models(tree, [str(checkpoint), str(other)], EvalConfig(**FAST), tmp_path / "out")
    assert [r.name for r in reports] == ["ck.pt", "other.pt"]
    assert reports[0].metrics == reports[1].metrics  # same weights, same images, same pairs
    for name in ("roc.png", "pr_curve.png", "distances_ck.png", "distances_other.png",
                 "retrieval_examples_ck.png", "embedding_2d_other.png", "report.md"):
        assert (tmp_path / "out" / name).exists(), name
    header = format_table(reports).splitlines()[1]
    assert "ck.pt" in header and "other.pt" in header


def test_report_dict_is_the_one_json_schema_and_progress_counts_all_models(tree, checkpoint, tmp_path):
    other = tmp_path / "other.pt"
    shutil.copy(checkpoint, other)
    calls = []
    reports = evaluate_models(tree, [str(checkpoint), str(other)], EvalConfig(**FAST), tmp_path / "out",
                              progress=lambda done, total: calls.append((done, total)))
    # One count over both models: 12 images each, never going backwards, ending at 24 of 24, after
    # one (0, None) saying that the slow part begins (see engine.progress).
    assert calls[0] == (0, None) and calls.count((0, None)) == 1
    calls = calls[1:]
    assert calls[-1] == (24, 24) and all(total == 24 for _, total in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())["reports"]
    for report, on_disk in zip(reports, saved):
        as_dict = report.to_dict()
        # Plain JSON values: dumping without a default hook must work and round-trip unchanged.
        assert json.loads(json.dumps(as_dict)) == as_dict == on_disk
        assert set(as_dict) == {"model", "name", "dataset", "kind", "protocol", "images", "classes", "metrics",
                                "per_class", "failures", "encoder", "seconds", "files"}
        assert as_dict["metrics"]["recall@1"] == report.metrics["recall@1"] and as_dict["images"] == 12
        assert isinstance(as_dict["failures"], list)


def test_pair_csv(tree, checkpoint, reference, tmp_path):
    emb, labels, paths = reference
    rows = [(0, 1, 1), (0, 4, 0), (4, 5, 1), (5, 9, 0), (8, 11, 1), (2, 10, 0), (3, 7, 0)]
    csv_path = tmp_path / "lists" / "pairs.csv"
    csv_path.parent.mkdir()
    rel = lambda n: os.path.relpath(paths[n], csv_path.parent)  # noqa: E731  (paths are relative to the CSV)
    lines = ["img_a,img_b,label"] + [f"{rel(a)},{rel(b)},{s}" for a, b, s in rows]
    csv_path.write_text("\n".join(lines) + "\n")
    report = evaluate(csv_path, str(checkpoint), EvalConfig(**FAST), out_dir=tmp_path / "out")
    a, b, same = (np.array(c) for c in zip(*rows))
    distances = np.sqrt(np.clip(2 - 2 * np.sum(emb[a] * emb[b], axis=1), 0, None))
    assert report.kind == "pairs" and report.metrics["pairs"] == 7 and report.images == 12 - 1  # image 6 unused
    for key, value in numpy_verification(distances, same, 0.5).items():
        assert report.metrics[key] == pytest.approx(value, abs=1e-6), key
    assert (tmp_path / "out" / "pairs.png").exists() and (tmp_path / "out" / "roc.png").exists()


def test_bad_pair_csv_lists_offending_lines(tree, tmp_path):
    csv_path = tmp_path / "bad.csv"
    good = (tree / "red" / "0.png").as_posix()
    csv_path.write_text(f"{good},{good},1\n{good},{good},2\n{good},missing.png,0\n{good},{good}\n{good},{good},0\n")
    with pytest.raises(DataError) as err:
        read_pairs(csv_path)
    message = str(err.value)
    assert "3 bad rows" in message and "line 2" in message and "line 3" in message and "line 4" in message
    assert "missing.png" in message and "line 5" not in message and "\n" not in message
    empty = tmp_path / "empty.csv"
    empty.write_text("img_a,img_b,label\n")
    with pytest.raises(DataError):
        read_pairs(empty)


def test_bad_dataset_and_config(tmp_path):
    with pytest.raises(DataError):
        evaluate(tmp_path / "nowhere", "pretrained")
    (tmp_path / "only" / "one").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "only" / "one" / "a.png")
    with pytest.raises(DataError):
        evaluate(tmp_path / "only", "pretrained")
    with pytest.raises(DataError):
        EvalConfig(protocol="nope")
    with pytest.raises(DataError):
        EvalConfig(max_per_class=1)


@pytest.mark.slow
@pytest.mark.skipif(not CALTECH.is_dir(), reason="caltech101-dev not present")
def test_pretrained_beats_random_init_on_caltech(tmp_path):
    from engine.config import EncoderConfig
    from engine.checkpoint import save_checkpoint
    from engine.encoder import build_encoder

    random_init = save_checkpoint(build_encoder(EncoderConfig(pretrained=False)), tmp_path / "random.pt")
    start = time.perf_counter()
    pretrained, scratch = evaluate_models(CALTECH, ["pretrained", str(random_init)],
                                          EvalConfig(max_per_class=6, n_pairs=1000, seed=0))
    assert pretrained.images == 300
    assert pretrained.metrics["recall@1"] > scratch.metrics["recall@1"] + 0.2
    assert pretrained.metrics["map@r"] > scratch.metrics["map@r"]
    assert pretrained.metrics["roc_auc"] > scratch.metrics["roc_auc"]
    assert time.perf_counter() - start < 600
