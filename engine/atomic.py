"""Atomic file replacement: write beside the target, fsync, rename over it, fsync the folder.

A crash at any moment leaves either the old file or the new one, never half of either. Every file
the engine writes for itself (index, index state, checkpoints, reports) goes through here.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Iterator


def _fsync_path(path: str | os.PathLike, *, directory: bool = False, strict: bool = False) -> None:
    """fsync ``path``. strict=True raises when it fails: a file whose data did not reach the disk
    (ENOSPC or EIO at fsync) must not replace a good one. Folders are synced leniently."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # some filesystems refuse to open folders; the rename is still atomic
        if strict:
            raise
        return
    try:
        os.fsync(fd)
    except OSError as exc:  # EINVAL and the like: a file system without fsync; the data was written
        if strict and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for the caller to write (with any writer: ``open``,
    ``torch.save``, ``faiss.write_index``); on success it is fsynced and renamed over ``path``,
    on any exception it is deleted and ``path`` is untouched.

    The temporary name is hidden and carries the pid (``.NAME.PID.tmp``), so a writer that died
    mid-save can be recognised and its leftover removed (``engine doctor``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        _fsync_path(tmp, strict=True)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_path(path.parent, directory=True)


def write_atomic(path: str | os.PathLike, data: bytes | str, *, encoding: str = "utf-8") -> Path:
    """Replace ``path`` with ``data`` (bytes, or text in ``encoding``) atomically; returns the path."""
    payload = data.encode(encoding) if isinstance(data, str) else data
    with atomic_path(path) as tmp:
        tmp.write_bytes(payload)
    return Path(path)


def move_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Rename ``src`` over ``dst`` (in the same folder) atomically and durably: a crash leaves
    either both files as they were or ``dst`` holding what ``src`` held. Returns ``dst``."""
    _fsync_path(src)
    os.replace(src, dst)
    _fsync_path(Path(dst).parent, directory=True)
    return Path(dst)
