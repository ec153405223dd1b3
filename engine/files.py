"""Finding image files: the walk shared by ingest and by directory queries, and class-folder trees."""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np


@dataclass
class Discovery:
    """files: image paths found (absolute, sorted per folder); missing: (path, reason) for given
    paths that could not be walked at all."""

    files: list[str] = field(default_factory=list)
    missing: list[tuple[str, str]] = field(default_factory=list)


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _excluded(path: str, name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(path, p) for p in patterns)


def find_images(roots: Iterable[str | os.PathLike], suffixes: frozenset[str], *,
                exclude: Sequence[str] = ()) -> Discovery:
    """Walk ``roots`` for files whose suffix (lower-cased) is in ``suffixes``.

    Hidden files and folders are skipped, symlinked folders are followed but each real folder is
    walked once (so a symlink loop ends), ``exclude`` globs match a name or a whole path. A root
    that is a file is taken as it is, whatever its suffix: the caller asked for it by name.
    """
    found = Discovery()
    seen_dirs: set[tuple[int, int]] = set()
    seen_files: set[str] = set()

    def add(path: str) -> None:
        if path not in seen_files:
            seen_files.add(path)
            found.files.append(path)

    for root in roots:
        root = os.path.abspath(os.fspath(root))
        if not os.path.lexists(root):
            found.missing.append((root, "no such file or directory"))
            continue
        if not os.path.exists(root):
            found.missing.append((root, "broken symbolic link"))
            continue
        if not os.path.isdir(root):
            add(root)
            continue

        def on_error(err: OSError, root=root) -> None:
            found.missing.append((err.filename or root, f"cannot list folder: {err.strerror or err}"))

        for folder, dirs, files in os.walk(root, followlinks=True, onerror=on_error):
            try:
                st = os.stat(folder)
            except OSError:
                dirs[:] = []
                continue
            key = (st.st_dev, st.st_ino)
            if key in seen_dirs:
                dirs[:] = []
                continue
            seen_dirs.add(key)
            dirs[:] = sorted(d for d in dirs if not _hidden(d) and not _excluded(os.path.join(folder, d), d, exclude))
            for name in sorted(files):
                if _hidden(name) or Path(name).suffix.lower() not in suffixes:
                    continue
                path = os.path.join(folder, name)
                if not _excluded(path, name, exclude):
                    add(path)
    return found


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


def cap_per_class(labels: np.ndarray, max_per_class: int, seed: int = 0) -> np.ndarray:
    """Indices (int64, ascending) keeping at most ``max_per_class`` items of each label: a seeded
    random choice per class, classes drawn in ascending label order, kept in their original order."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    keep: list[np.ndarray] = []
    for label in np.unique(labels):
        mine = np.flatnonzero(labels == label)
        if mine.size > max_per_class:
            mine = np.sort(rng.choice(mine, max_per_class, replace=False))
        keep.append(mine)
    return np.sort(np.concatenate(keep)).astype(np.int64) if keep else np.zeros(0, np.int64)


def nothing_found_message(roots: Sequence[str | os.PathLike], found: Discovery, suffixes: frozenset[str]) -> str:
    """Why a walk that found no image file found none, as one line: the given paths that do not
    exist, or the folders that hold no image (with the suffixes looked for)."""
    if found.missing and len(found.missing) >= len(roots):
        return "; ".join(f"{path}: {reason}" for path, reason in found.missing)
    looked = ", ".join(sorted(s.lstrip(".") for s in suffixes))
    where = ", ".join(os.fspath(r) for r in roots)
    return f"no images found under {where} (looked for: {looked}; hidden files are skipped)"
