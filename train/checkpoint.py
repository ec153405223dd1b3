"""The run folder's files: the best checkpoint, the resume state and the metrics log.

    checkpoint.pt   an engine checkpoint (``engine.encoder.load_checkpoint`` reads it) of the best
                    epoch, with its calibrated threshold, plus the run's ``epoch`` and ``train_config``
    last.pt         the same for the latest epoch, plus what ``--resume`` needs: optimizer,
                    schedule and gradient-scaler state, history, best so far, epochs without progress
    metrics.jsonl   one JSON object per epoch (epoch 0 = before training)

A run folder may come from someone else, so the resume state is untrusted like every file the engine
reads: it is unpickled as tensors and plain data only (``engine.checkpoint.read_torch_file``) and
anything else is refused, naming the file, with nothing of it run.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.errors import EngineError, ModelError
from train.config import TrainConfig

if TYPE_CHECKING:
    from engine.encoder import Encoder

CHECKPOINT = "checkpoint.pt"
LAST = "last.pt"
METRICS = "metrics.jsonl"

# What last.pt must hold, beyond the engine checkpoint, for a run to resume from it.
_STATE_KEYS = ("epoch", "train_config", "optimizer", "scheduler", "history", "best", "bad_epochs")
# Fields a resumed run may change without changing what is being trained.
RESUMABLE = frozenset({"epochs", "workers", "device", "patience", "plots", "time_budget_min", "threads"})


def save_run_checkpoint(encoder: Encoder, path: Path, epoch: int, threshold: float | None, config: TrainConfig,
                        val: dict | None = None, **extra: Any) -> None:
    """Write an engine checkpoint of ``encoder`` at ``epoch`` with ``threshold`` (and, for the best
    epoch, its validation figures ``val``) plus the run's own keys ``extra``, atomically."""
    from engine.checkpoint import checkpoint_payload, save_payload

    encoder.threshold = threshold
    metadata: dict[str, Any] = {"epoch": epoch, "train_config": asdict(config)}
    if val is not None:
        metadata["val"] = val
    payload = checkpoint_payload(encoder, threshold=threshold, metadata=metadata)
    payload.update({"epoch": epoch, "train_config": asdict(config), **extra})
    save_payload(payload, path)


def load_resume_state(path: Path) -> dict:
    """The resume state in ``path`` (a run's last.pt), read as tensors and plain data only.

    Raises EngineError when there is none, ModelError when it cannot be read, would need code to
    unpickle (refused, nothing of it runs), or is not a resumable training state."""
    from engine.checkpoint import read_torch_file

    if not path.exists():
        raise EngineError(f"nothing to resume: {path} does not exist")
    state = read_torch_file(path, what="resume state")
    if not isinstance(state, dict) or any(key not in state for key in _STATE_KEYS):
        raise ModelError(f"{path} is not a resumable training state")
    if not isinstance(state["train_config"], dict) or set(state["train_config"]) - {
            f.name for f in dataclasses.fields(TrainConfig)}:
        raise ModelError(f"{path} holds a training configuration this version does not know; start a new --out")
    return state


def resume_config(saved: TrainConfig, asked: TrainConfig) -> TrainConfig:
    """The saved run's configuration, with the fields a resumed run may change (``RESUMABLE``) taken
    from ``asked`` where given. ``asked`` is as the caller built it (unresolved): a field left at its
    default was not given. Raises EngineError naming any other field given with a different value."""
    defaults = TrainConfig()
    given = {f.name for f in dataclasses.fields(TrainConfig) if getattr(asked, f.name) != getattr(defaults, f.name)}
    differ = [n for n in sorted(given - RESUMABLE - {"preset"}) if getattr(asked, n) != getattr(saved, n)]
    if differ:
        raise EngineError("--resume with different settings (" + ", ".join(
            f"{n}: {getattr(saved, n)!r} -> {getattr(asked, n)!r}" for n in differ) + "); start a new --out instead")
    return replace(saved, **{n: getattr(asked, n) for n in RESUMABLE & given})


def append_metrics(out_dir: Path, record: dict) -> None:
    """Add one epoch's record to metrics.jsonl."""
    with open(out_dir / METRICS, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def write_metrics(out_dir: Path, history: list[dict]) -> None:
    """Replace metrics.jsonl with ``history`` (atomically: a resumed run drops lines of an epoch that
    never finished)."""
    from engine.atomic import write_atomic

    write_atomic(out_dir / METRICS, "".join(json.dumps(r) + "\n" for r in history).encode("utf-8"))
