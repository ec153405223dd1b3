import json

import pytest
from click.testing import CliRunner

from engine.cli import main
from tests.util import make_folder, make_image, tiny_checkpoint


@pytest.fixture()
def env(tmp_path):
    ck = tiny_checkpoint(tmp_path / "tiny.pt")
    photos = tmp_path / "photos"
    make_folder(photos, 5)
    return tmp_path / "home", photos, ck


def run(home, *args):
    result = CliRunner().invoke(main, ["--home", str(home), "--device", "cpu", *map(str, args)])
    return result


def test_ingest_query_compare_info_json(env, tmp_path):
    home, photos, ck = env
    r = run(home, "ingest", photos, "--model", ck, "--batch-size", 2, "--workers", 0, "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)
    assert {k: summary[k] for k in ("added", "unchanged", "updated", "duplicates", "failed", "removed")} == \
        {"added": 5, "unchanged": 0, "updated": 0, "duplicates": 0, "failed": 0, "removed": 0}
    assert set(summary["stages"]) == {"model", "walk", "plan", "decode", "embed", "commit", "index"}
    assert summary["stages"]["embed"] > 0 and sum(summary["stages"].values()) <= summary["seconds"] + 1e-3

    r = run(home, "query", photos / "img_002.png", "-k", 3, "--json")
    assert r.exit_code == 0, r.output
    obj = json.loads(r.output)
    assert obj["query"] == str(photos / "img_002.png")
    assert [h["rank"] for h in obj["hits"]] == [1, 2, 3]
    assert obj["hits"][0]["path"] == str(photos / "img_002.png")
    assert {"id", "score", "distance", "width", "height", "format"} <= set(obj["hits"][0])

    r = run(home, "query", photos, "-k", 1, "--json")  # a folder is a batch: one line per image
    lines = [json.loads(line) for line in r.output.splitlines()]
    assert r.exit_code == 0 and len(lines) == 5
    assert all(o["hits"][0]["path"] == o["query"] for o in lines)

    r = run(home, "query", photos / "img_002.png", "-k", 2)
    assert r.exit_code == 0 and "img_002.png" in r.output.splitlines()[2]

    r = run(home, "compare", photos / "img_000.png", photos / "img_000.png", "--json")
    assert r.exit_code == 0, r.output
    verdict = json.loads(r.output)
    assert verdict["verdict"] == "similar" and verdict["distance"] == pytest.approx(0, abs=1e-3)
    r = run(home, "compare", photos / "img_000.png", photos / "img_001.png", "--threshold", "0")
    assert r.exit_code == 0 and r.output.startswith("different")

    r = run(home, "info", "--json")
    facts = json.loads(r.output)
    assert facts["images"] == 5 and facts["vectors"] == 5 and facts["model"]["backbone"] == "test_resnet"


def test_errors_are_one_line_with_non_zero_exit(env, tmp_path):
    home, photos, ck = env
    r = run(home, "query", photos / "img_000.png")
    assert r.exit_code == 1 and "no index" in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1

    run(home, "ingest", photos, "--model", ck, "--workers", 0)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    r = run(home, "query", bad)
    assert r.exit_code == 1 and "bad.jpg" in r.output and "Traceback" not in r.output

    r = run(home, "query", tmp_path / "missing.jpg")
    assert r.exit_code == 1 and "missing.jpg" in r.output

    r = run(home, "ingest", tmp_path / "nowhere", "--workers", 0)
    assert r.exit_code == 1 and "nowhere" in r.output

    other = tiny_checkpoint(tmp_path / "other.pt", backbone="test_efficientnet")
    r = run(home, "query", photos / "img_000.png", "--model", other)
    assert r.exit_code == 1 and "built with" in r.output and "reindex" in r.output

    r = run(home, "compare", photos / "img_000.png", bad)
    assert r.exit_code == 1 and "bad.jpg" in r.output and "Traceback" not in r.output


def test_train_then_use_the_checkpoint_for_compare_and_ingest(tmp_path):
    from tests.util import make_class_tree

    make_class_tree(tmp_path / "data", 6, 4, size=32)
    run_dir = tmp_path / "run"
    r = run(tmp_path / "home", "train", tmp_path / "data", "--out", run_dir, "--backbone", "test_resnet",
            "--no-pretrained", "--image-size", 32, "--epochs", 1, "--batch-size", 8, "--images-per-class", 2,
            "--val-classes", 0.34, "--workers", 0, "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    ck = run_dir / "checkpoint.pt"
    assert result["checkpoint"] == str(ck) and result["threshold"] is not None
    assert {"checkpoint.pt", "metrics.jsonl", "loss.png", "distances.png", "pairs.png"} <= {p.name for p in run_dir.iterdir()}
    a, b = tmp_path / "data" / "class_0" / "00.png", tmp_path / "data" / "class_0" / "01.png"
    r = run(tmp_path / "home", "compare", a, b, "--model", ck, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["threshold"] == pytest.approx(result["threshold"], abs=1e-6)
    r = run(tmp_path / "home", "ingest", tmp_path / "data", "--model", ck, "--workers", 0, "--json")
    assert r.exit_code == 0 and json.loads(r.output)["added"] == 24
    r = run(tmp_path / "home", "train", tmp_path / "data", "--out", run_dir, "--backbone", "test_resnet", "--no-pretrained")
    assert r.exit_code == 1 and "--resume" in r.output


def test_eval_json_prints_the_report_dict(tmp_path):
    from engine.evaluate import EvalConfig, evaluate
    from tests.util import make_class_tree

    make_class_tree(tmp_path / "data", 3, 3, size=32)
    ck = tiny_checkpoint(tmp_path / "tiny.pt")
    r = run(tmp_path / "home", "eval", tmp_path / "data", "--model", ck, "--pairs", 20, "--workers", 0, "--json")
    assert r.exit_code == 0, r.output
    [printed] = [json.loads(line) for line in r.stdout.splitlines()]
    expected = evaluate(tmp_path / "data", str(ck), EvalConfig(n_pairs=20, workers=0)).to_dict()
    assert printed.pop("seconds") >= 0 and expected.pop("seconds") >= 0
    assert printed == expected
    assert printed["images"] == 9 and printed["classes"] == 3 and 0 <= printed["metrics"]["recall@1"] <= 1
