"""Decode image files in worker processes, in batches.

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
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from engine.errors import ImageError
from engine.preprocess import IN_MEMORY_FILE_BYTES, ImageInfo, build_transform, draft_size_for, open_image
from engine.resources import cap_workers


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


def hash_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """``hash_bytes`` of a file's bytes, read in ``chunk``-byte pieces (bounded memory). Raises
    OSError when the file cannot be read."""
    digest = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


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
                if st.st_size <= IN_MEMORY_FILE_BYTES:  # hash and decode the very same bytes
                    with open(path, "rb") as fh:
                        data = fh.read()
                    item.content_hash = hash_bytes(data)
                    image, item.info = open_image(data, draft_size=self.draft_size)
                else:  # a big file is not held in memory beside its decoded pixels
                    item.content_hash = hash_file(path)
                    image, item.info = open_image(path, draft_size=self.draft_size)
                    after = os.stat(path)
                    if (after.st_size, after.st_mtime) != (st.st_size, st.st_mtime):
                        raise ImageError("file changed while it was read")
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


def default_workers() -> int:
    """Decode processes that leave the model most of the cores: one per four cores, at least one,
    and never more than the machine holds (``engine.resources.worker_limit``)."""
    return cap_workers(max(1, (os.cpu_count() or 2) // 4))[0]


def decode_batches(dataset: Dataset, batch_size: int = 32, workers: int | None = None) -> Iterator[Batch]:
    """Yield ``Batch``es over ``dataset`` in file order, decoded by ``workers`` processes
    (None = ``default_workers()``; 0 = in-process), capped at what the machine holds
    (``engine.resources.cap_workers``: cores, and memory at DECODE_BUDGET_BYTES a worker). A
    dataset that fits in one batch is decoded in-process: starting workers would cost more than
    they save."""
    workers = default_workers() if workers is None else cap_workers(workers)[0]
    if len(dataset) <= batch_size:
        workers = 0
    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs = {"prefetch_factor": 4, "persistent_workers": False}
    yield from DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                          collate_fn=collate_decoded, **kwargs)
