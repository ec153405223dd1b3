"""``engine train`` options map onto TrainConfig fields by name, checked when the command is defined;
its choices come from train.config; a resume state that would run code is one line on the CLI."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

from engine import cli_train as cli
from engine.cli import main
from train.config import FIELDS, LOSSES, MINERS, PRESET_NAMES, PRESETS, TrainConfig
from train.loop import TrainResult


def _config_params() -> dict[str, click.Parameter]:
    # the global options every command also accepts after its name (--home ...) set no value of its own
    return {p.name: p for p in cli.train.params if p.expose_value and p.name not in cli._TRAIN_OWN}


def test_every_train_option_is_a_train_config_field():
    params = _config_params()
    assert len(params) >= 25
    assert set(params) <= FIELDS, set(params) - FIELDS
    assert set(cli._TRAIN_OWN) == {"data", "out_dir", "as_json", "resume"}


def test_choices_come_from_train_config():
    params = _config_params()
    assert tuple(params["loss"].type.choices) == LOSSES
    assert tuple(params["miner"].type.choices) == MINERS
    assert tuple(params["preset"].type.choices) == PRESET_NAMES == tuple(PRESETS)


def test_an_option_without_a_field_fails_when_the_command_is_defined():
    @click.command()
    @click.option("--learning-rate", type=float)  # a field renamed in TrainConfig but not here
    @click.option("--epochs", type=int)
    def command(learning_rate, epochs):
        pass

    with pytest.raises(TypeError, match="learning_rate"):
        cli._train_config_options(command)


def test_options_reach_the_config(tmp_path, monkeypatch):
    """Every option given on the command line arrives in the TrainConfig train() is called with."""
    import train.loop

    seen: dict = {}

    def fake_train(data, out_dir, config, progress=None, resume=False, on_epoch=None):
        seen.update(config=config, resume=resume)
        return TrainResult(Path(out_dir), Path(out_dir) / "checkpoint.pt", 0, {}, None, [], config, "map@r")

    monkeypatch.setattr(train.loop, "train", fake_train)
    (tmp_path / "data").mkdir()
    (tmp_path / "val.csv").write_text("")
    weights = tmp_path / "w.pt"
    torch.save({}, weights)
    values = {"preset": "cpu-quick", "loss": "triplet", "miner": "semi-hard", "margin": 0.3, "epochs": 3,
              "batch_size": 12, "classes_per_batch": 3, "images_per_class": 4, "lr": 0.01, "backbone_lr": 0.001,
              "weight_decay": 0.0, "warmup_epochs": 0.5, "dim": 32, "backbone": "test_resnet", "weights": str(weights),
              "image_size": 48, "freeze_epochs": 2, "train_stages": 1, "val_classes": 0.3,
              "val": str(tmp_path / "val.csv"), "val_group_sep": "__", "max_per_class": 5, "workers": 0, "seed": 7}
    args = ["--device", "cpu", "train", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--no-pretrained",
            "--resume", "--json"]
    for name, value in values.items():
        args += ["--" + name.replace("_", "-"), str(value)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    config = seen["config"]
    assert seen["resume"] is True
    expected = dataclasses.replace(TrainConfig(), device="cpu", pretrained=False, **values)
    assert config == expected
    # Every option was exercised: each one given is a field that differs from its default.
    # The whitening options take the --whiten-only path instead (tests/test_whitening.py).
    assert set(values) | {"pretrained", "whiten", "whiten_only", "whiten_shrinkage"} == set(_config_params())


def test_resume_state_that_would_run_code_is_one_line(tmp_path):
    class RunsCode:
        def __reduce__(self):
            return (exec, (f"open({str(tmp_path / 'code-ran')!r}, 'w').close()",))

    (tmp_path / "data").mkdir()
    (tmp_path / "run").mkdir()
    torch.save({"epoch": 1, "train_config": {}, "optimizer": RunsCode()}, tmp_path / "run" / "last.pt")
    result = CliRunner().invoke(main, ["train", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
                                           "--resume"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: refusing resume state"), result.output
    assert "weights_only" not in result.output and "Traceback" not in result.output
    assert not (tmp_path / "code-ran").exists()
