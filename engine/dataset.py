"""Decode image files in worker processes and embed them in batches.

Unreadable files come back as failures with a reason and are dropped at collate time, so one bad
file never stops a batch. Ingest, eval and training all decode through here (and so through
``engine.preprocess``).
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from engine.errors import ImageError
from engine.preprocess import ImageInfo, build_transform, draft_size_for, open_image


@dataclass
class Decoded:
    """One decoded file. tensor: float32 [3, H, W]; content_hash: blake2b-256 hex of the bytes."""

    position: int
    path: str
    tensor: torch.Tensor | None
    info: ImageInfo | None = None
    content_hash: str | None = None
    size: int | None = None
    mtime: float | None = None
    error: str | None = None


@dataclass
class Batch:
    """What the loader yields: images float32 [B, 3, H, W] for the decoded items, and the failures."""

    images: torch.Tensor | None
    items: list[Decoded]
    failures: list[Decoded] = field(default_factory=list)


def hash_bytes(data: bytes) -> str:
    """Content hash used to recognise identical files: blake2b, 256-bit, hex."""
    return hashlib.blake2b(data, digest_size=32).hexdigest()


class ImageFileDataset(Dataset):
    """Files -> ``Decoded`` items. with_facts=True also hashes the bytes and keeps size, mtime and
    image facts (what ingest stores); otherwise only the tensor is made."""

    def __init__(self, paths: Sequence[str | os.PathLike], transform: Callable, draft_size: int | None,
                 with_facts: bool = False):
        self.paths = [os.fspath(p) for p in paths]
        self.transform = transform
        self.draft_size = draft_size
        self.with_facts = with_facts

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position: int) -> Decoded:
        path = self.paths[position]
        item = Decoded(position, path, None)
        try:
            if self.with_facts:
                st = os.stat(path)
                if not stat.S_ISREG(st.st_mode):  # a fifo would block the read, a device never end it
                    raise ImageError("is a directory, not an image" if stat.S_ISDIR(st.st_mode) else "not a regular file")
                item.size, item.mtime = st.st_size, st.st_mtime
                with open(path, "rb") as fh:
                    data = fh.read()
                item.content_hash = hash_bytes(data)
                image, item.info = open_image(data, draft_size=self.draft_size)
            else:
                image, item.info = open_image(path, draft_size=self.draft_size)
            item.tensor = self.transform(image)
        except ImageError as exc:
            item.error = str(exc)
        except IsADirectoryError:
            item.error = "is a directory, not an image"
        except PermissionError:
            item.error = "permission denied"
        except FileNotFoundError:
            item.error = "file vanished before it was read"
        except OSError as exc:
            item.error = f"cannot read file: {exc.strerror or exc}"
        except Exception as exc:  # a transform or codec bug must not stop a library-sized run
            item.error = f"cannot decode image: {type(exc).__name__}: {exc}"
        return item


def collate_decoded(items: list[Decoded]) -> Batch:
    """Stack the decoded tensors; failed items travel beside them instead of breaking the batch."""
    good = [it for it in items if it.tensor is not None]
    bad = [it for it in items if it.tensor is None]
    images = torch.stack([it.tensor for it in good]) if good else None
    for it in good:
        it.tensor = None  # the stacked copy is the one that travels on
    return Batch(images, good, bad)


def make_loader(dataset: Dataset, batch_size: int = 32, workers: int = 1) -> DataLoader:
    """A DataLoader over ``dataset`` in file order; ``workers`` decode processes (0 = in-process)."""
    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs = {"prefetch_factor": 4, "persistent_workers": False}
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      collate_fn=collate_decoded, **kwargs)


def default_workers() -> int:
    """Decode processes that leave the model most of the cores: one per four cores, at least one."""
    return max(1, (os.cpu_count() or 2) // 4)


@dataclass
class EmbeddedFiles:
    """embeddings: float32 [N_ok, D] in the order of ``paths`` (failed files left out);
    positions: int64 [N_ok] index into the input paths; failures: (path, reason)."""

    embeddings: np.ndarray
    positions: np.ndarray
    failures: list[tuple[str, str]]


def embed_files(encoder, paths: Sequence[str | os.PathLike], *, batch_size: int = 32, workers: int | None = None,
                progress: Callable[[int], None] | None = None) -> EmbeddedFiles:
    """Decode and embed ``paths`` with ``encoder``'s own preprocessing. progress(n) is called with
    the number of files finished after each batch."""
    transform = build_transform(encoder.data_config)
    dataset = ImageFileDataset(paths, transform, draft_size_for(encoder.data_config))
    chunks: list[np.ndarray] = []
    positions: list[int] = []
    failures: list[tuple[str, str]] = []
    workers = default_workers() if workers is None else workers
    for batch in make_loader(dataset, batch_size, workers if len(dataset) > batch_size else 0):
        if batch.images is not None:
            chunks.append(encoder.embed(batch.images))
            positions.extend(it.position for it in batch.items)
        failures.extend((it.path, it.error or "unknown error") for it in batch.failures)
        if progress:
            progress(len(batch.items) + len(batch.failures))
    embeddings = np.concatenate(chunks) if chunks else np.zeros((0, encoder.dim), np.float32)
    return EmbeddedFiles(embeddings, np.asarray(positions, np.int64), failures)


def list_class_folder(root: str | os.PathLike, suffixes: frozenset[str] | None = None) -> tuple[list[str], np.ndarray, list[str]]:
    """A folder-per-class tree -> (paths, labels int64 [N], class names). Hidden entries skipped,
    classes and files in sorted order so labels are stable."""
    from engine.preprocess import IMAGE_SUFFIXES

    suffixes = suffixes or IMAGE_SUFFIXES
    root = Path(root)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    paths: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        for f in sorted((root / name).rglob("*")):
            if f.is_file() and f.suffix.lower() in suffixes and not any(p.startswith(".") for p in f.relative_to(root).parts):
                paths.append(str(f))
                labels.append(label)
    return paths, np.asarray(labels, np.int64), classes
