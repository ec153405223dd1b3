"""One pair-list reader: ``engine eval`` and ``engine train`` accept and refuse the same CSVs, with the
same message (a table of variants through both commands' loading, plus one CLI run of each)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from engine.errors import DataError
from engine.evaluate import EvalConfig, evaluate_models
from engine.pairs import parse_label, read_pairs
from tests.util import make_class_tree
from train.data import load_data

ROWS = [("c0/00", "c0/01", "1"), ("c1/00", "c1/01", "1"), ("c0/00", "c1/00", "0"), ("c2/00", "c0/01", "0")]


def _rows(rows=ROWS, prefix: str = "imgs/", labels: tuple[str, str] | None = None, tail: str = "") -> str:
    out = []
    for a, b, label in rows:
        if labels is not None:
            label = labels[0] if label == "1" else labels[1]
        out.append(f"{prefix}{a.replace('c', 'class_')}.png,{prefix}{b.replace('c', 'class_')}.png,{label}{tail}")
    return "\n".join(out) + "\n"


# name -> (CSV text ({root} = the folder of CSV and images), pairs when accepted or the message part when refused)
VARIANTS: dict[str, tuple[str, int | str]] = {
    "header": ("img_a,img_b,label\n" + _rows(), 4),
    "no header": (_rows(), 4),
    "other header words": ("left,right,same\n" + _rows(), 4),
    "labels 1.0/0.0": (_rows(labels=("1.0", "0.0")), 4),
    "labels true/FALSE": (_rows(labels=("true", "FALSE")), 4),
    "~ paths": (_rows(prefix="~/imgs/"), 4),
    "absolute paths": (_rows(prefix="{root}/imgs/"), 4),
    "blank lines": ("\n" + _rows().replace("\n", "\n\n", 2) + "\n\n", 4),
    "comment line": ("# pairs of the test set\n" + _rows(), 4),
    "trailing empty cells": (_rows(tail=",,"), 4),
    "BOM and CRLF": ("\ufeff" + _rows().replace("\n", "\r\n"), 4),
    "a missing file": (_rows() + "imgs/gone.png,imgs/class_0/00.png,0\n", "1 missing files (line 5: imgs/gone.png)"),
    "a third label value": (_rows() + "imgs/class_0/00.png,imgs/class_2/00.png,2\n",
                            "1 labels other than 0/1 (line 5: '2')"),
    "label yes": (_rows() + "imgs/class_0/00.png,imgs/class_2/00.png,yes\n", "(line 5: 'yes')"),
    "first row labelled 2 is no header": ("imgs/class_0/00.png,imgs/class_2/00.png,2\n" + _rows(),
                                          "labels other than 0/1 (line 1: '2')"),
    "a fourth column": (_rows() + "imgs/class_0/00.png,imgs/class_2/00.png,0,note\n",
                        "1 malformed rows (want img_a,img_b,label) (line 5: 4 columns)"),
    "two columns": (_rows() + "imgs/class_0/00.png,imgs/class_2/00.png\n", "(line 5: 2 columns)"),
    "similar pairs only": (_rows(ROWS[:2]), "no dissimilar (0) pairs: both kinds are needed"),
    "header only": ("img_a,img_b,label\n", "empty set: no pairs"),
}


@pytest.fixture()
def root(tmp_path, monkeypatch) -> Path:
    make_class_tree(tmp_path / "imgs", classes=3, per_class=2, size=32)
    monkeypatch.setenv("HOME", str(tmp_path))  # for the ~ paths
    return tmp_path


def _write(root: Path, text: str) -> Path:
    path = root / "pairs.csv"
    path.write_text(text.replace("{root}", str(root)), encoding="utf-8", newline="")
    return path


def _eval_outcome(csv: Path, model: str) -> int | str:
    try:
        return int(evaluate_models(csv, [model], EvalConfig(workers=0))[0].metrics["pairs"])
    except DataError as exc:
        return str(exc)


def _train_outcome(csv: Path) -> int | str:
    try:
        return len(load_data(csv))
    except DataError as exc:
        return str(exc)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_eval_and_train_accept_and_refuse_alike(name, root, tiny_model):
    text, expected = VARIANTS[name]
    csv = _write(root, text)
    by_eval, by_train = _eval_outcome(csv, tiny_model), _train_outcome(csv)
    assert by_eval == by_train
    if isinstance(expected, int):
        assert by_eval == expected
    else:
        assert isinstance(by_eval, str) and expected in by_eval and "\n" not in by_eval
        assert by_eval.startswith(f"bad pair list {csv}: ")


def test_the_pairs_as_read(root):
    data = read_pairs(_write(root, "img_a,img_b,label\n" + _rows(prefix="~/imgs/")))
    assert len(data) == 4 and len(data.images) == 5
    assert data.images[data.a[0]] == str(root / "imgs" / "class_0" / "00.png")
    assert data.same.tolist() == [1, 1, 0, 0] and data.lines.tolist() == [2, 3, 4, 5]
    assert data.a.dtype == data.b.dtype == data.same.dtype == "int64"


def test_labels():
    for cell, value in (("1", 1), ("0", 0), ("1.0", 1), ("0.00", 0), ("true", 1), ("False", 0), (" TRUE ", 1)):
        assert parse_label(cell) == value, cell
    for cell in ("2", "-1", "0.5", "yes", "", "nan", "label"):
        assert parse_label(cell) is None, cell


def test_one_missing_file_named_once_with_every_bad_row_counted(root):
    text = _rows() + "".join(f"imgs/gone.png,imgs/class_0/00.png,0\n" for _ in range(3))
    with pytest.raises(DataError) as err:
        read_pairs(_write(root, text))
    assert str(err.value).endswith(": 3 bad rows: 1 missing files (line 5: imgs/gone.png)")


def _pair_list_for_training(root: Path) -> Path:
    """Enough identities for a class-disjoint split: 6 classes of 3 images, similar within, dissimilar across."""
    make_class_tree(root / "many", classes=6, per_class=3, size=32)
    rows = []
    for c in range(6):
        rows += [f"many/class_{c}/00.png,many/class_{c}/01.png,1.0", f"~/many/class_{c}/01.png,many/class_{c}/02.png,true"]
        rows += [f"many/class_{c}/00.png,many/class_{d}/02.png,0" for d in range(c + 1, 6)]
    return _write(root, "img_a,img_b,same\n\n" + "\n".join(rows) + "\n\n")


def test_both_commands_on_the_command_line(root, tiny_model):
    from engine.cli import main

    runner = CliRunner()
    good = _pair_list_for_training(root)
    evaluated = runner.invoke(main, ["--device", "cpu", "eval", str(good), "--model", tiny_model, "--workers", "0",
                                     "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    trained = runner.invoke(main, ["--device", "cpu", "train", str(good), "--out", str(root / "run"), "--epochs", "0",
                                   "--backbone", "test_resnet", "--no-pretrained", "--image-size", "32",
                                   "--workers", "0", "--val-classes", "0.34", "--json"])
    assert trained.exit_code == 0, trained.output
    assert (root / "run" / "checkpoint.pt").exists()

    bad = _write(root, VARIANTS["a missing file"][0])
    refused_eval = runner.invoke(main, ["eval", str(bad), "--model", tiny_model, "--workers", "0"])
    refused_train = runner.invoke(main, ["train", str(bad), "--out", str(root / "run2"), "--workers", "0"])
    assert refused_eval.exit_code == refused_train.exit_code == 1
    assert refused_eval.output == refused_train.output
    assert refused_eval.output.startswith(f"Error: bad pair list {bad}: 1 bad rows: 1 missing files")
    assert len(refused_eval.output.strip().splitlines()) == 1
