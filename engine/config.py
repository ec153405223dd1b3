"""Frozen configuration dataclasses, one per component.

``None`` means "the backbone's default" wherever it appears.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_BACKBONE = "tf_efficientnet_lite0"
# Kinds of whitening layer (engine.whitening); here, torch- and numpy-free, for the CLI's choices.
WHITENINGS = ("pca", "learned")
# The encoders ``--model NAME`` builds with ImageNet weights and nothing trained: name -> the
# ``EncoderConfig`` fields that differ from the default. lite1 and lite2 are larger and slower than
# lite0, their weights ship as packages of the same family; "-gem" pools with GeM instead of the
# average, at p = 2: measured (README, "Quality") p = 2 raised MAP@R on faces and characters and
# tied on photos, while p = 3 and 4 lowered it on photos. "pretrained" itself stays average pooling:
# libraries record it by name, so its meaning must never change.
PRETRAINED_MODELS: dict[str, dict[str, object]] = {
    "pretrained": {},
    "pretrained-lite1": {"backbone": "tf_efficientnet_lite1"},
    "pretrained-lite2": {"backbone": "tf_efficientnet_lite2"},
    "pretrained-gem": {"pooling": "gem", "gem_p": 2.0},
}


def is_pretrained(spec: str | None) -> bool:
    """Whether a model spec names a pretrained encoder (``PRETRAINED_MODELS``) rather than a file."""
    return spec in PRETRAINED_MODELS


@dataclass(frozen=True)
class EncoderConfig:
    """What is needed to rebuild an encoder exactly (weights aside).

    backbone: a timm model name, created with ``num_classes=0`` so it returns pooled features.
    head_dim: output size of the projection head; ``None`` means no head (the pooled features are
        the embedding).
    image_size: square input side in pixels; ``None`` means the backbone's pretrained default.
    pretrained: resolve ImageNet weights when the encoder is first built (ignored when weights come
        from a checkpoint).
    weights: an explicit weights file (a timm/torch state dict or an engine checkpoint).
    pooling: "avg" (the backbone's own global pooling) or "gem" (generalised mean, exponent
        ``gem_p``: a parameter of the backbone, learned when the backbone trains, else fixed).
    whiten_dim: output size of a whitening layer after the head (engine.whitening: L2 norm, then
        a linear map fitted once); ``None`` means none.
    """

    backbone: str = DEFAULT_BACKBONE
    head_dim: int | None = None
    image_size: int | None = None
    pretrained: bool = True
    weights: str | None = None
    pooling: str = "avg"
    gem_p: float = 3.0
    whiten_dim: int | None = None


AUTO_INDEX = "auto"  # the index type chosen by engine.index_policy from the library's size
DEFAULT_RECALL = 0.95


@dataclass(frozen=True)
class IndexConfig:
    """How vectors are indexed.

    factory: ``"auto"`` (the default: ``engine.index_policy`` chooses the type from the row count,
        dimension and memory budget, and moves the library up as it grows), or a FAISS
        index-factory string chosen by hand: ``"Flat"`` is exact search; ``"HNSW32"``,
        ``"IVF1024,Flat"`` or ``"IVF1024,PQ32"`` trade recall for speed and memory.
    memory_budget: bytes the index may use in memory; ``None`` means a share of this machine's
        RAM (``engine.index_policy.default_memory_budget``).
    recall: the recall@10 an approximate index is tuned to after each build (``engine.index_tuning``).

    Vectors are L2-normalised and compared by inner product (cosine similarity).
    """

    factory: str = AUTO_INDEX
    memory_budget: int | None = None
    recall: float = DEFAULT_RECALL


def default_home() -> Path:
    """The per-user library folder: ``$ENGINE_HOME``, else ``$XDG_DATA_HOME/engine``, else
    ``~/.local/share/engine``."""
    env = os.environ.get("ENGINE_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return base / "engine"


@dataclass(frozen=True)
class LibraryPaths:
    """Where one library keeps its files inside its home folder."""

    home: Path
    database: Path = field(init=False)
    index: Path = field(init=False)
    index_state: Path = field(init=False)
    encoder: Path = field(init=False)
    encoder_pending: Path = field(init=False)  # the encoder a reindex is moving to, until it is switched in
    lock: Path = field(init=False)
    report: Path = field(init=False)

    def __post_init__(self) -> None:
        home = Path(self.home)
        object.__setattr__(self, "home", home)
        object.__setattr__(self, "database", home / "library.db")
        object.__setattr__(self, "index", home / "index.faiss")
        object.__setattr__(self, "index_state", home / "index.json")
        object.__setattr__(self, "encoder", home / "encoder.pt")
        object.__setattr__(self, "encoder_pending", home / "encoder.pending.pt")
        object.__setattr__(self, "lock", home / "write.lock")
        object.__setattr__(self, "report", home / "ingest-failures.tsv")
