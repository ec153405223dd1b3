"""What a library remembers of its encoder (``ModelInfo``), and the switch of a library to another
encoder (``engine reindex --model``), as a part of ``engine.library.Library``.

Order of a switch, each step crash-safe: the new encoder is saved as ``encoder.pending.pt`` and
its vectors staged beside the live ones (queries see nothing of them); one database transaction
makes them the library's vectors and model and bumps the embeddings epoch; ``encoder.pending.pt``
is renamed over ``encoder.pt`` (a crash before that is finished by the next ``encoder()``); the
index, whose state file records the epoch it was built in, is rebuilt (a crash before that: by
the next open, which never reconciles an index of another epoch by id).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ContextManager

from db.store import StoreError
from engine.atomic import move_atomic
from engine.config import is_pretrained
from engine.errors import EngineError, LockError, ModelError
from engine.faults import fault_point
from engine.shared_home import encoder_files

if TYPE_CHECKING:
    from db.store import MetadataStore
    from engine.config import LibraryPaths
    from engine.encoder import Encoder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelInfo:
    """The encoder a library was built with, as remembered in its database."""

    spec: str
    identity: str
    backbone: str
    dim: int
    input_size: tuple[int, ...]
    weights_source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"spec": self.spec, "identity": self.identity, "backbone": self.backbone, "dim": self.dim,
                "input_size": list(self.input_size), "weights_source": self.weights_source}


def describe_model(spec: str, encoder: Encoder) -> ModelInfo:
    """What a library remembers of ``encoder``, made from ``spec`` (``pretrained`` or a checkpoint
    path, kept absolute)."""
    return ModelInfo(spec=spec if is_pretrained(spec) else os.path.abspath(spec), identity=encoder.identity(),
                     backbone=encoder.config.backbone, dim=encoder.dim, input_size=tuple(encoder.data_config["input_size"]),
                     weights_source=encoder.metadata.get("weights_source"))


class ModelSwitching:
    """The encoder-switching methods of ``engine.library.Library`` (which provides the store, the
    paths, the model record and the write lock named below)."""

    paths: LibraryPaths
    _encoder: Encoder | None

    if TYPE_CHECKING:
        @property
        def store(self) -> MetadataStore: ...

        def model_info(self) -> ModelInfo | None: ...

        def write_lock(self, on_wait: Callable[[], None] | None = None, *, wait: bool = True) -> ContextManager[None]: ...

    def pending_model(self) -> ModelInfo | None:
        """The encoder a reindex is staging vectors for and has not switched to yet, or None."""
        record = self.store.pending_record()
        if not record or not isinstance(record.get("model"), dict):
            return None
        raw = dict(record["model"])
        raw["input_size"] = tuple(raw.get("input_size") or ())
        return ModelInfo(**raw)

    def stage_model(self, spec: str, encoder: Encoder) -> tuple[ModelInfo, bool]:
        """Get ready to stage vectors made by ``encoder`` (from ``spec``): its file is saved as
        ``encoder.pending.pt``; vectors already staged for the same encoder are kept (returns
        resumed=True), any staged for another one are dropped. Returns (its ModelInfo, resumed).
        The live library is untouched."""
        from engine.checkpoint import save_checkpoint

        info = describe_model(spec, encoder)
        pending = self.pending_model()
        resumed = pending is not None and pending.identity == info.identity and pending.dim == info.dim
        save_checkpoint(encoder, self.paths.encoder_pending)
        if not resumed:
            self.store.start_pending({"model": info.to_dict()})
        return info, resumed

    def switch_model(self, info: ModelInfo, encoder: Encoder, drop_ids: Any = ()) -> int:
        """Make the staged vectors (every row must have one, else EngineError and nothing changes)
        the library's, ``info`` its model and ``encoder`` its encoder file, forgetting the rows
        ``drop_ids``; returns how many vectors were switched in. The caller holds the write lock
        and rebuilds the index next (until then every open rebuilds it)."""
        from engine.checkpoint import save_checkpoint

        save_checkpoint(encoder, self.paths.encoder_pending)  # exactly this encoder waits beside encoder.pt
        fault_point("reindex-before-switch")
        try:
            switched = self.store.switch_to_pending({"model": info.to_dict()}, drop_ids,
                                                    files=encoder_files(self, self.paths.encoder_pending))
        except StoreError as exc:
            raise EngineError(f"{exc}; run `engine reindex --model {info.spec}` again") from None
        fault_point("reindex-switched")
        move_atomic(self.paths.encoder_pending, self.paths.encoder)
        fault_point("reindex-encoder-moved")
        self._encoder = encoder
        return switched

    def finish_encoder_switch(self) -> bool:
        """Rename ``encoder.pending.pt`` over ``encoder.pt`` when it is the library's encoder (a
        reindex stopped between its switch and that rename), before anything may overwrite it;
        True when it was. Never raises for a missing or unreadable file."""
        info = self.model_info()
        return info is not None and self._switched_encoder(info, "cpu") is not None

    def encoder_switch_unfinished(self) -> bool:
        """True when the database was switched to a new encoder whose file still waits in
        ``encoder.pending.pt`` (a reindex stopped between the two): the next ``encoder()`` renames it."""
        from engine.encoder import load_checkpoint

        info = self.model_info()
        if info is None or not self.paths.encoder_pending.exists():
            return False
        try:
            if load_checkpoint(self.paths.encoder_pending, "cpu").identity() != info.identity:
                return False
            return not self.paths.encoder.exists() or load_checkpoint(self.paths.encoder, "cpu").identity() != info.identity
        except ModelError:
            return False

    def _switched_encoder(self, info: ModelInfo, device: Any) -> Encoder | None:
        """The encoder a reindex left in ``encoder.pending.pt`` when it stopped after switching the
        database to it and before renaming that file over ``encoder.pt``: the rename is finished
        (when the write lock is free and the file is still the one read) and the encoder returned.
        None when there is no such file or it is not the library's encoder."""
        from engine.encoder import load_checkpoint

        pending = self.paths.encoder_pending
        try:
            seen = pending.stat()
            encoder = load_checkpoint(pending, device)
        except (OSError, ModelError):
            return None
        if encoder.identity() != info.identity:
            return None
        try:
            with self.write_lock(wait=False):
                now = pending.stat()
                unchanged = (now.st_ino, now.st_size, now.st_mtime_ns) == (seen.st_ino, seen.st_size, seen.st_mtime_ns)
                current = self.model_info()
                if unchanged and current is not None and current.identity == info.identity:
                    move_atomic(pending, self.paths.encoder)
                    log.info("finished switching the encoder file to %s", info.spec)
        except (LockError, OSError):
            pass  # read-only home or a writer at work: use the encoder, leave the files to the writer
        return encoder
