"""The encoder checkpoint format, and the one reader of torch files.

A checkpoint is a torch file holding one dict of plain data and tensors:

    format      "engine.encoder"
    version     1 (a newer one is refused)
    config      the ``EncoderConfig`` fields (weights None, pretrained False: the file is the weights)
    data_config timm's data config, tuples stored as lists
    state_dict  str -> CPU tensor, the whole ``Encoder`` (backbone and head)
    threshold   the calibrated L2 distance threshold, float or None
    metadata    dict of plain data (weights source, training epoch, validation figures)

Training adds its own keys beside these; readers ignore keys they do not know.

Every torch file the engine reads is untrusted: ``read_torch_file`` unpickles tensors and plain data
only (``torch.load(weights_only=True)``) and refuses anything that would need code to rebuild.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from engine.atomic import atomic_path
from engine.config import EncoderConfig
from engine.errors import ModelError

if TYPE_CHECKING:
    from engine.encoder import Encoder

CHECKPOINT_FORMAT = "engine.encoder"
CHECKPOINT_VERSION = 1

_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def read_torch_file(path: str | Path, what: str = "model file") -> Any:
    """The contents of a torch file: tensors (on the CPU) and plain data, nothing else.

    Raises ModelError, naming the file: missing, unreadable, or refused because unpickling it would
    call code (a class or function outside torch's allow-list). A refused file runs nothing.
    ``what`` names the kind of file in messages.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"no such {what}: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's own message advises loading without the safeguard; ours does not.
        found = _GLOBAL.search(str(exc))
        if found:
            raise ModelError(f"refusing {what} {path}: loading it would call {found.group(1)}; "
                             "only tensors and plain data are read") from None
        raise ModelError(f"cannot read {what} {path}: not a torch file of tensors and plain data") from None
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"cannot read {what} {path}: {first}") from None


@dataclass(frozen=True)
class Checkpoint:
    """A decoded checkpoint: everything needed to rebuild the ``Encoder`` that was saved.

    state_dict: str -> CPU tensor of the whole encoder; data_config: timm's, with ``input_size``,
    ``mean`` and ``std`` as tuples again.
    """

    path: Path
    config: EncoderConfig
    data_config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    threshold: float | None
    metadata: dict[str, Any]


def is_checkpoint(payload: Any) -> bool:
    """Whether the contents of a torch file are an engine checkpoint (not a plain state dict)."""
    return isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT


def decode_checkpoint(payload: dict, path: str | Path) -> Checkpoint:
    """The ``Checkpoint`` in ``payload`` (read from ``path``). Raises ModelError when it was written
    by a newer engine or lacks what a rebuild needs."""
    path = Path(path)
    version = payload.get("version", 0)
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise ModelError(f"{path} was written by a newer engine (checkpoint version {version})")
    try:
        config = EncoderConfig(**payload["config"])
        data_config = dict(payload["data_config"])
        for key in ("input_size", "mean", "std"):
            data_config[key] = tuple(data_config[key])
        state_dict = dict(payload["state_dict"])
        threshold = payload.get("threshold")
        threshold = None if threshold is None else float(threshold)
        metadata = dict(payload.get("metadata") or {})
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{path} is not a usable engine checkpoint: {str(exc).splitlines()[0]}") from None
    return Checkpoint(path, config, data_config, state_dict, threshold, metadata)


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read and decode the checkpoint at ``path``. Raises ModelError for anything else."""
    payload = read_torch_file(path)
    if not is_checkpoint(payload):
        raise ModelError(f"{path} is not an engine checkpoint")
    return decode_checkpoint(payload, path)


def checkpoint_payload(encoder: Encoder, *, threshold: float | None = None, metadata: dict | None = None) -> dict:
    """The dict ``save_checkpoint`` writes; training adds its own keys (optimizer, epoch) beside these.
    ``threshold`` and ``metadata`` override the encoder's own."""
    config = replace(encoder.config, weights=None, pretrained=False)
    meta = dict(encoder.metadata)
    meta.update(metadata or {})
    meta.pop("checkpoint", None)  # where it was loaded from is no fact about the model
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": asdict(config),
        "data_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in encoder.data_config.items()},
        "state_dict": {k: v.detach().cpu() for k, v in encoder.state_dict().items()},
        "threshold": encoder.threshold if threshold is None else float(threshold),
        "metadata": meta,
    }


def save_payload(payload: dict, path: str | Path) -> Path:
    """Write a checkpoint dict atomically (temp file + rename): a crash never leaves half a file."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(payload, fh)  # into a Python file: a full disk raises OSError, not a RuntimeError
    return Path(path)


def save_checkpoint(encoder: Encoder, path: str | Path, *, threshold: float | None = None,
                    metadata: dict | None = None) -> Path:
    """Save config + weights + threshold so ``engine.encoder.load_checkpoint`` rebuilds the encoder
    exactly."""
    return save_payload(checkpoint_payload(encoder, threshold=threshold, metadata=metadata), path)
