"""Options every ``engine`` command shares, described once.

``EngineGroup`` is the ``engine`` command group: every command added to it also accepts the global
options where people type them (``engine query --home LIB IMG`` does what ``engine --home LIB
query IMG`` does: the llm convention), and options that recur across commands (``--json``,
``--batch-size``, ``--workers`` ...) get one shared help text when their command gave none;
``--json`` always reads the same.
Standard library and click only, so ``engine --help`` stays instant.
"""

from __future__ import annotations

import os
from typing import Any

import click

JSON_HELP = "Print JSON instead of text: one object per line."

# help of an option, by parameter name, for commands that do not word it themselves
SHARED_HELP = {
    "as_json": JSON_HELP,
    "batch_size": "Images per forward pass.",
    "workers": "Decode processes (default: one per four cores, at least 1; 0 decodes in this process).",
    "seed": "Seed of every random choice, so a run can be repeated.",
    "k": "Hits shown per query.",
    "max_per_class": "Keep at most this many images per class (a seeded choice).",
    # engine train (defaults: train.config; a preset sets them too)
    "loss": "Training loss (default: triplet for class folders, contrastive for a pair list).",
    "miner": "Which pairs or triplets of a batch train (default: batch-hard for triplet, all for pair losses).",
    "epochs": "Passes over the training data (default 30).",
    "weight_decay": "AdamW weight decay (default 1e-4).",
    "warmup_epochs": "Linear warm-up before the cosine decay, in epochs (default 1).",
    "image_size": "Square input side in pixels (default: the backbone's).",
}

HOME_HELP = "Library folder (database, index, encoder). Default: $ENGINE_HOME or ~/.local/share/engine."
DEVICE_HELP = "Where the encoder runs; auto picks CUDA when present."
DATABASE_HELP = ("Any SQLAlchemy URL for the metadata. Default: $ENGINE_DATABASE_URL, else SQLite in the "
                 "library folder.")
_HERE_TOO = " Also accepted after the command name."


def _set(attribute: str):
    """A callback storing a command-level global option on the group's context object."""

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value not in (None, False) and ctx.obj is not None:
            if attribute == "home":
                value = os.path.expanduser(value)
            setattr(ctx.obj, attribute, value)
        return value

    return callback


def global_params() -> list[click.Option]:
    """The global options, as each command accepts them after its name: no default of their own
    (the group's value, from before the command name or the environment, stands unless given)."""
    return [
        click.Option(["--home"], type=click.Path(file_okay=False), default=None, expose_value=False,
                     callback=_set("home"), help=HOME_HELP + _HERE_TOO),
        click.Option(["--device"], type=click.Choice(["auto", "cpu", "cuda"]), default=None, expose_value=False,
                     callback=_set("device"), help=DEVICE_HELP + _HERE_TOO),
        click.Option(["--database-url"], default=None, expose_value=False, callback=_set("database_url"),
                     help=DATABASE_HELP + _HERE_TOO),
        click.Option(["--read-only"], is_flag=True, default=None, expose_value=False, callback=_set("read_only"),
                     help="Search the library without writing anything to it, as `engine --read-only`."),
    ]


class EngineGroup(click.Group):
    """The ``engine`` group: its commands accept the global options too, and shared options get
    their shared help text."""

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        taken = {opt for p in cmd.params for opt in getattr(p, "opts", [])}
        cmd.params.extend(p for p in global_params() if not set(p.opts) & taken)
        for param in cmd.params:
            if isinstance(param, click.Option) and param.name in SHARED_HELP and (
                    not param.help or param.name == "as_json"):  # --json: the same words everywhere
                param.help = SHARED_HELP[param.name]
        super().add_command(cmd, name)
