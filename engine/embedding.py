"""Decode and embed files with an encoder's own preprocessing (eval, training and queries)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from engine.loader import ImageFileDataset, decode_batches
from engine.preprocess import build_transform, draft_size_for

if TYPE_CHECKING:
    from engine.encoder import Encoder
    from engine.progress import ProgressFn


@dataclass
class EmbeddedFiles:
    """embeddings: float32 [N_ok, D] in the order of ``paths`` (failed files left out);
    positions: int64 [N_ok] index into the input paths; failures: (path, reason)."""

    embeddings: np.ndarray
    positions: np.ndarray
    failures: list[tuple[str, str]]


def embed_files(encoder: Encoder, paths: Sequence[str | os.PathLike], *, batch_size: int = 32, workers: int | None = None,
                progress: ProgressFn | None = None) -> EmbeddedFiles:
    """Decode and embed ``paths`` with ``encoder``'s own preprocessing (workers: decode processes,
    None = engine.loader.default_workers()). progress(done, total) is called after each batch
    with the files finished (embedded or failed) out of ``len(paths)``."""
    transform = build_transform(encoder.data_config)
    dataset = ImageFileDataset(paths, transform, draft_size_for(encoder.data_config))
    chunks: list[np.ndarray] = []
    positions: list[int] = []
    failures: list[tuple[str, str]] = []
    done = 0
    for batch in decode_batches(dataset, batch_size, workers):
        if batch.images is not None:
            chunks.append(encoder.embed(batch.images))
            positions.extend(it.position for it in batch.items)
        failures.extend((it.path, it.error or "unknown error") for it in batch.failures)
        done += len(batch.items) + len(batch.failures)
        if progress:
            progress(done, len(dataset))
    embeddings = np.concatenate(chunks) if chunks else np.zeros((0, encoder.dim), np.float32)
    return EmbeddedFiles(embeddings, np.asarray(positions, np.int64), failures)
