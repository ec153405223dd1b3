"""``engine train``: its options map one to one onto ``TrainConfig`` fields (checked on import)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import click

from engine.cli_context import Context, pass_ctx
from engine.cli_errors import _echo_json, _printable, handle_errors
from engine.cli_params import Number, cap_workers_option
# Torch-free: the train command's choices and its option check come from here at import time.
from train.config import FIELDS as TRAIN_FIELDS
from train.config import LOSSES, MINERS, PRESET_NAMES
from engine.config import WHITENINGS

if TYPE_CHECKING:
    from train.config import TrainConfig


# Parameters of ``engine train`` that are its own; every other one names a TrainConfig field.
_TRAIN_OWN = frozenset({"data", "out_dir", "as_json", "resume"})


def _train_config_options(command: click.Command) -> click.Command:
    """Check, when the command is defined, that each of its options other than ``_TRAIN_OWN`` is a
    TrainConfig field: a renamed field then fails on import (and in every test), never in a user's run."""
    unknown = sorted(p.name or "" for p in command.params
                     if p.expose_value and p.name not in _TRAIN_OWN and p.name not in TRAIN_FIELDS)
    if unknown:
        raise TypeError(f"engine train options without a TrainConfig field: {', '.join(unknown)}")
    return command


def _train_config(device: str, options: dict[str, Any]) -> TrainConfig:
    """The TrainConfig of ``engine train``'s options: the ones given (not None), and the global --device."""
    from train.config import TrainConfig

    return TrainConfig(device=device, **{k: v for k, v in options.items() if v is not None})


@_train_config_options
@click.command()
@click.argument("data", type=click.Path(exists=True))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Run folder to write.")
@click.option("--preset", type=click.Choice(PRESET_NAMES), default=None,
              help="cpu-quick: photos near ImageNet, a head on frozen features, <= 20 min on 2 CPU cores; "
                   "cpu-long: data far from ImageNet (characters, grey faces), a small net from scratch, "
                   "<= 60 min on 2 CPU cores; gpu: the whole backbone fine-tuned, the defaults.")
@click.option("--loss", type=click.Choice(LOSSES), default=None)
@click.option("--miner", type=click.Choice(MINERS), default=None)
@click.option("--margin", type=Number(0), default=None, help="Loss margin on the L2 distance.")
@click.option("--epochs", type=click.IntRange(0), default=None)
@click.option("--batch-size", type=click.IntRange(2), default=None)
@click.option("--classes-per-batch", type=click.IntRange(2), default=None, help="P of a P x K batch.")
@click.option("--images-per-class", type=click.IntRange(2), default=None, help="K of a P x K batch.")
@click.option("--lr", type=Number(0, open_min=True), default=None, help="Head learning rate (Adam).")
@click.option("--backbone-lr", type=Number(0), default=None, help="Backbone learning rate (default lr/10).")
@click.option("--weight-decay", type=Number(0), default=None)
@click.option("--warmup-epochs", type=Number(0), default=None)
@click.option("--dim", type=click.IntRange(2), default=None, help="Projection head size (default: backbone width).")
@click.option("--backbone", default=None, help="Any timm model name (default tf_efficientnet_lite0).")
@click.option("--pretrained/--no-pretrained", default=None, help="Start from ImageNet weights (default) or random.")
@click.option("--weights", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Start from this checkpoint or weights file.")
@click.option("--image-size", type=click.IntRange(16), default=None)
@click.option("--freeze-epochs", type=click.IntRange(0), default=None, help="Keep the backbone frozen this long.")
@click.option("--train-stages", type=click.IntRange(0), default=None, help="Train only the last N backbone stages.")
@click.option("--val-classes", type=Number(0, 1, open_min=True, open_max=True), default=None,
              help="Share of classes held out for validation (split by class, seeded).")
@click.option("--val", default=None, type=click.Path(exists=True), help="A separate validation folder or pair CSV.")
@click.option("--val-group-sep", default=None,
              help="Hold out class groups: classes whose names share the part before SEP (e.g. '__' for alphabets).")
@click.option("--max-per-class", type=click.IntRange(2), default=None)
@click.option("--workers", type=click.IntRange(0), default=None, callback=cap_workers_option)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--whiten-only", is_flag=True, default=None,
              help="Fit a whitening layer on the encoder's embeddings of DATA instead of training (seconds): "
                   "learned from the classes (pca for a pair list), --dim its size (default 256); written into "
                   "the checkpoint.")
@click.option("--whiten", type=click.Choice(WHITENINGS), default=None, help="With --whiten-only: the kind.")
@click.option("--whiten-shrinkage", type=Number(0, 1), default=None,
              help="With --whiten-only: covariance shrinkage towards the identity, 0..1 (default: 0.5 learned, "
                   "0.9 pca).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last epoch.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_ctx
@handle_errors
def train(obj: Context, data: str, out_dir: str, as_json: bool, resume: bool, **options: Any) -> None:
    """Fine-tune a Siamese encoder on DATA: a folder-per-class tree or a pair CSV (img_a,img_b,label).
    Writes checkpoint.pt (with the calibrated threshold), metrics.jsonl and plots to --out."""
    from train.loop import train as run_training
    from train.progress import TrainProgress

    config = _train_config(obj.device, options)
    if config.whiten_only:
        _whiten(data, out_dir, config, as_json, resume)
        return
    if config.whiten or config.whiten_shrinkage is not None:
        raise click.UsageError("--whiten and --whiten-shrinkage go with --whiten-only")
    view = None if as_json else TrainProgress(file=sys.stderr, resume=resume)
    result = run_training(data, out_dir, config, progress=view, resume=resume,
                          on_epoch=view.epoch_end if view is not None else None)
    if as_json:
        _echo_json(result.to_dict())
        return
    best = result.best_metrics
    figures = ", ".join(f"{k} {best[k]:.4f}" for k in ("recall@1", "recall@5", "map@r", "roc_auc", "pair_accuracy")
                        if isinstance(best.get(k), (int, float)))
    click.echo(f"best epoch {result.best_epoch} ({result.select_metric}): {figures}")
    if result.threshold is not None:
        click.echo(f"calibrated threshold (L2 distance): {result.threshold:.4f}")
    click.echo(_printable(f"checkpoint: {result.checkpoint}"))
    click.echo(_printable(f"run folder: {result.out_dir} ({result.wall_s:.0f} s)"))


def _whiten(data: str, out_dir: str, config: TrainConfig, as_json: bool, resume: bool) -> None:
    """``engine train DATA --whiten-only``: fit, write the run folder, print before and after."""
    from engine.console import Progress
    from train.whitening import fit_whitening_run

    if resume:
        raise click.UsageError("--whiten-only fits in one go: there is nothing to --resume")
    bar = Progress("whitening", enabled=not as_json, waiting="loading the encoder...")
    try:
        result = fit_whitening_run(data, out_dir, config, progress=bar)
    finally:
        bar.close()
    if as_json:
        _echo_json(result.to_dict())
        return
    w = result.whitening
    click.echo(f"{w['kind']} whitening to {w['dim']} dimensions, shrinkage {w['shrinkage']:g}, fitted on "
               f"{w['images']} images")
    for key in ("recall@1", "precision@10", "map@r", "roc_auc"):
        if key in result.before:
            click.echo(f"  {key:13s} {result.before[key]:.4f} -> {result.after[key]:.4f}  (held-out classes)")
    for note in result.notes:
        click.echo(_printable(f"note: {note}"), err=True)
    click.echo(f"calibrated threshold (L2 distance): {result.threshold:.4f}")
    click.echo(_printable(f"checkpoint: {result.checkpoint}"))
