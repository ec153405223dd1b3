"""The TorchScript copy of a library's encoder (``encoder.ts`` beside ``encoder.pt``): what a cold
``engine query`` runs instead of building the timm model, so that it imports neither timm nor
torchvision (over a second) and constructs nothing.

The copy is made from the eager ``Encoder`` (``engine.encoder``) in eval mode, traced at the
library's input size, and checked equal to it on fixed seeded inputs (largest difference under
``MAX_ABS_DIFF``; in practice it is bit-identical, as the same kernels run) before it is kept. The
database records what was written (``RECORD_KEY``): the encoder identity it was made from, the
file's SHA-256 and size, the torch version, the data config, dim and threshold. A copy is used only
when that record names the library's current encoder identity and this torch, and the bytes read
match the recorded hash, so a stale, truncated, replaced or tampered file is never loaded; it is
ignored (the eager encoder answers) and written again. The file is loaded from the very bytes that
were hashed (no second read). The record is signed (HMAC-SHA256) with a key private to this user
(``signing_key_path``, outside every library home), so a copy that someone else wrote, in a library
folder shared or copied from elsewhere, is never loaded: only tensors are read from files the engine
did not make itself. ``torch.jit.load`` rebuilds TorchScript, not Python objects: nothing
of Python is unpickled.

Only small batches use the copy (fewer than ``engine.folding.FOLD_MIN_BATCH`` images): the eager
encoder runs those through the unfolded backbone too, so the scores are the same either way;
larger batches go to the eager encoder and its BatchNorm-folded copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import json
import logging
import os
import secrets
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from engine.atomic import atomic_path

if TYPE_CHECKING:
    from engine.encoder import Encoder

log = logging.getLogger(__name__)

SCRIPT_NAME = "encoder.ts"
RECORD_KEY = "encoder_script"
# The largest difference allowed between the copy and the eager encoder on the check inputs.
MAX_ABS_DIFF = 1e-5
# Batches up to this size use the copy; engine.folding.FOLD_MIN_BATCH - 1 (the eager encoder folds
# from there on; tests/test_cold_start.py keeps the two in step).
MAX_BATCH = 7


class ScriptedEncoder:
    """The TorchScript copy of an ``Encoder``, with the parts of its interface a query uses:
    ``data_config``, ``dim``, ``threshold`` / ``decision_threshold``, ``device`` (the CPU) and
    ``embed`` (float32 [B, 3, H, W] -> np.float32 [B, D], unit rows)."""

    def __init__(self, module: torch.jit.ScriptModule, record: dict[str, Any]):
        self.module = module
        self.record = record
        self.data_config = _data_config(record["data_config"])
        self.dim = int(record["dim"])
        self.threshold: float | None = None if record.get("threshold") is None else float(record["threshold"])
        self.identity_hash = str(record["identity"])

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def decision_threshold(self) -> float:
        """The eager encoder's ``decision_threshold``, as recorded when the copy was written."""
        return float(self.record["decision_threshold"])

    def identity(self) -> str:
        return self.identity_hash

    @torch.inference_mode()
    def embed(self, images: torch.Tensor) -> np.ndarray:
        """images float32 [B, 3, H, W] -> np.float32 [B, D] unit-norm, channels-last as the eager
        encoder runs them."""
        images = images.to("cpu").contiguous(memory_format=torch.channels_last)
        with _plain():
            return self.module(images).float().numpy()


def _data_config(raw: dict[str, Any]) -> dict[str, Any]:
    cfg = dict(raw)
    for key in ("input_size", "mean", "std"):
        if key in cfg:
            cfg[key] = tuple(cfg[key])
    return cfg


def on_cpu(device: str) -> bool:
    """Whether the library device name ``device`` (``auto``, ``cpu``, ``cuda``...) means the CPU."""
    return device == "cpu" or (device == "auto" and not torch.cuda.is_available())


@contextlib.contextmanager
def _quiet() -> Any:
    """torch marks its TorchScript functions deprecated with a FutureWarning on every call."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


def _plain() -> Any:
    """Run the graph as traced: the profiling executor's first calls cost more than a query's one
    forward (0.10 s against 0.03 s for tf_efficientnet_lite0), and its rewrites would be the one
    thing not shared with the eager encoder."""
    return torch.jit.optimized_execution(False)


def script_path(home: Path) -> Path:
    return Path(home) / SCRIPT_NAME


def _check_inputs(encoder: Encoder) -> list[torch.Tensor]:
    """Fixed seeded float32 batches [1 and 2, 3, H, W] at the encoder's input size."""
    size = tuple(int(v) for v in encoder.data_config["input_size"])
    gen = torch.Generator().manual_seed(1234)
    return [torch.randn((n, *size), generator=gen).contiguous(memory_format=torch.channels_last) for n in (1, 2)]


def file_sha256(path: Path) -> str | None:
    """The SHA-256 of the file at ``path`` (hex), or None when it cannot be read."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    except OSError:
        return None
    return h.hexdigest()


def signing_key_path() -> Path:
    """This user's key for signing scripted-copy records: ``$XDG_CONFIG_HOME/engine/signing.key``
    (default ``~/.config``), made (mode 0600) on first use."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "engine" / "signing.key"


def _signing_key(create: bool) -> bytes | None:
    path = signing_key_path()
    try:
        data = path.read_bytes()
        if len(data) >= 32:
            return data
    except OSError:
        pass
    if not create:
        return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(32))
        return path.read_bytes()
    except FileExistsError:  # another process made it first
        return _signing_key(create=False)
    except OSError as exc:
        log.info("cannot keep a signing key at %s (%s): scripted copies will not be used", path, exc)
        return None


def _mac(record: dict[str, Any], key: bytes) -> str:
    body = json.dumps({k: v for k, v in record.items() if k != "mac"}, sort_keys=True, default=str)
    return hmac.new(key, body.encode("utf-8"), hashlib.sha256).hexdigest()


def write_scripted_copy(encoder: Encoder, home: Path, encoder_file: Path) -> dict[str, Any]:
    """Trace ``encoder`` (on the CPU, eval mode) into ``home/encoder.ts`` (atomically) after checking
    the traced module equal to the eager one on fixed inputs; returns the record to keep in the
    database, which also holds the hash of ``encoder_file`` (the library's ``encoder.pt``, which
    must hold ``encoder``): the copy is used only while that file is unchanged, so a query still
    refuses a damaged or replaced ``encoder.pt`` as the eager path does. Raises ValueError when the
    copy does not match (nothing is written)."""
    if encoder.device.type != "cpu":
        raise ValueError("the scripted copy is made from an encoder on the CPU")
    encoder.eval()
    inputs = _check_inputs(encoder)
    with _quiet(), torch.inference_mode(False), torch.no_grad():
        traced = torch.jit.trace(encoder, inputs[0], check_trace=False).eval()
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
        data = buffer.getvalue()
        loaded = torch.jit.load(io.BytesIO(data), map_location="cpu")  # check what will be read back
    with torch.inference_mode():
        for x in inputs:
            want = F.normalize(encoder.head(encoder.backbone(x)), dim=1)
            with _plain():
                diff = float((loaded(x) - want).abs().max())
                if not diff < MAX_ABS_DIFF:
                    raise ValueError(f"the traced encoder differs from the eager one by {diff:.3g}")
    target = script_path(home)
    with atomic_path(target) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
    data_config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in encoder.data_config.items()}
    record = {"file": SCRIPT_NAME, "identity": encoder.identity(), "encoder_file_sha256": file_sha256(encoder_file),
              "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "torch": torch.__version__,
              "data_config": data_config, "dim": int(encoder.dim), "threshold": encoder.threshold,
              "decision_threshold": encoder.decision_threshold}
    key = _signing_key(create=True)
    if key is not None:
        record["mac"] = _mac(record, key)
    return record


def load_scripted_copy(home: Path, record: Any, identity: str, encoder_file: Path) -> ScriptedEncoder | None:
    """The copy in ``home`` when ``record`` (as written by ``write_scripted_copy``) names encoder
    ``identity`` and this torch, ``encoder_file`` is unchanged since, and the copy's bytes match its
    size and hash; else None (the copy is then not loaded at all)."""
    if not isinstance(record, dict) or record.get("identity") != identity or record.get("torch") != torch.__version__:
        return None
    key = _signing_key(create=False)
    if key is None or not hmac.compare_digest(str(record.get("mac", "")), _mac(record, key)):
        log.info("ignoring %s: not a copy this user's engine made", script_path(home))
        return None
    if record.get("file") != SCRIPT_NAME or not isinstance(record.get("sha256"), str):
        return None
    if not isinstance(record.get("decision_threshold"), (int, float)) or not isinstance(record.get("data_config"), dict):
        return None
    if record.get("encoder_file_sha256") is None or file_sha256(encoder_file) != record["encoder_file_sha256"]:
        return None
    try:
        with open(script_path(home), "rb") as fh:
            data = fh.read(int(record["bytes"]) + 1)
    except (OSError, TypeError, ValueError, KeyError):
        return None
    if len(data) != record["bytes"] or hashlib.sha256(data).hexdigest() != record["sha256"]:
        log.info("ignoring %s: not the copy recorded for this encoder", script_path(home))
        return None
    try:
        with _quiet():
            module = torch.jit.load(io.BytesIO(data), map_location="cpu")
        return ScriptedEncoder(module.eval(), record)
    except Exception as exc:  # a recorded file that will not load is just not used
        log.info("ignoring %s: %s", script_path(home), exc)
        return None
