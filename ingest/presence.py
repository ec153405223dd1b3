"""Whether an indexed file is gone, and whether forgetting missing files is safe at all: the one
rule (``split_missing``) that ``engine ingest --prune`` and ``engine doctor --repair`` share.

A file is gone only when the system says it does not exist (ENOENT, or ENOTDIR: a folder on its
path is now a file). Any other error (permission denied, an I/O error, a stale network mount) says
nothing about the file, so it is never taken for gone.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass
from typing import Callable, Iterable

PRESENT = "present"
GONE = "gone"
UNKNOWN = "unknown"

UNMOUNTED = "every indexed file there is missing, which looks like an unmounted drive"


def probe(path: str) -> tuple[str, os.stat_result | None]:
    """(PRESENT, its stat) / (GONE, None) / (UNKNOWN, None) for ``path`` (symlinks followed)."""
    try:
        return PRESENT, os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return GONE, None
    except (OSError, ValueError):
        return UNKNOWN, None


@dataclass(frozen=True)
class IndexedCounts:
    """How many files are indexed in all (``total``) and inside a folder (``under(folder)``),
    without holding their paths: a library of a million files answers from its database
    (``MetadataStore.count_under``)."""

    total: int
    under: Callable[[str], int]

    @classmethod
    def of_paths(cls, paths: Iterable[str]) -> IndexedCounts:
        """The counts of a list of paths (absolute), held sorted in memory."""
        ordered = sorted(set(paths))
        return cls(len(ordered), lambda folder: _count_under(ordered, folder))


def split_missing(missing: Iterable[str], indexed: Iterable[str] | IndexedCounts) -> tuple[list[str], dict[str, int]]:
    """Split ``missing`` (indexed files found gone) into those safe to forget and those to keep.

    Each missing file is judged by its nearest folder that still exists: when every file indexed
    under that folder (``indexed``: every known path, absolute, or their IndexedCounts) is missing
    too (``looks_unmounted``) and the folder is now empty, it looks like an unmounted drive (an
    empty mount point) or a renamed mount point, and its files are kept; so are all of them when
    every indexed file is missing at once. A folder that still holds anything was changed on
    purpose: deleting the only photo of a folder, or all photos beside a sidecar file, is pruned.
    Returns (forgettable paths, {folder: files kept})."""
    missing = sorted(set(missing))
    counts = indexed if isinstance(indexed, IndexedCounts) else IndexedCounts.of_paths([*indexed, *missing])
    nearest: dict[str, str] = {}
    groups: dict[str, list[str]] = {}
    for path in missing:
        groups.setdefault(_existing_folder(os.path.dirname(path), nearest), []).append(path)
    forget: list[str] = []
    kept: dict[str, int] = {}
    everything = looks_unmounted(counts.total, len(missing))
    for folder, paths in groups.items():
        if everything or (looks_unmounted(counts.under(folder), _count_under(missing, folder))
                          and _is_empty(folder)):
            kept[folder] = len(paths)
        else:
            forget += paths
    return forget, kept


def _existing_folder(folder: str, cache: dict[str, str]) -> str:
    """``folder`` or its nearest ancestor that exists (a folder we cannot look into counts as
    existing: nothing below it is judged missing by ``probe`` anyway)."""
    walked: list[str] = []
    while folder not in cache:
        if probe(folder)[0] != GONE or os.path.dirname(folder) == folder:
            cache[folder] = folder
            break
        walked.append(folder)
        folder = os.path.dirname(folder)
    for step in walked:
        cache[step] = cache[folder]
    return cache[folder]


def _is_empty(folder: str) -> bool:
    """True when ``folder`` holds no entry at all (what an unmounted mount point looks like); a
    folder that cannot be listed counts as empty, so its files are kept."""
    try:
        with os.scandir(folder) as entries:
            return next(entries, None) is None
    except OSError:
        return True


def _count_under(ordered: list[str], folder: str) -> int:
    """How many of the sorted paths ``ordered`` lie inside ``folder``."""
    prefix = folder.rstrip(os.sep) + os.sep
    return bisect.bisect_left(ordered, prefix[:-1] + chr(ord(os.sep) + 1)) - bisect.bisect_left(ordered, prefix)


def looks_unmounted(indexed: int, missing: int) -> bool:
    """True when forgetting the ``missing`` of ``indexed`` files would be unsafe: more than one is
    indexed and every one of them is missing at once, far likelier an unmounted drive (or a renamed mount
    point) than a deliberate deletion. ``engine remove PATH`` forgets such files on purpose."""
    return indexed > 1 and missing >= indexed
