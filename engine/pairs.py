"""The one reader of pair lists: the CSV that ``engine eval`` scores and ``engine train`` learns from.

Both commands (and ``engine train --val``) read a pair list through ``read_pairs``, so a file is
accepted or refused alike, with the same message.

The rules:

- One pair per row, ``img_a,img_b,label``, comma-separated UTF-8 (a byte-order mark is fine). Cells
  are stripped of surrounding spaces.
- ``label``: ``1`` (similar) or ``0`` (dissimilar). Any number equal to 1 or 0 (``1.0``, ``0.00``)
  and ``true`` / ``false`` in any case mean the same. Anything else is refused.
- Header: the first row is a header, and skipped, when its label cell is neither a number nor
  ``true``/``false`` (``label``, ``same``, ``similar`` ...). A first row labelled ``2`` is a bad row,
  not a header.
- Blank rows and rows whose first cell starts with ``#`` are skipped.
- Paths: ``~`` is expanded; a relative path is relative to the CSV's folder; all are made absolute.
- Columns: exactly three. Empty cells after the third (what spreadsheets export) are ignored; a
  fourth cell with something in it is refused, since what it should mean is anybody's guess.
- Every image must exist as a file. Whether it decodes is for the command to find out: evaluation
  drops the pairs of an unreadable image and reports it; training refuses unreadable images before
  it starts, as it does for class folders.
- At least one similar and one dissimilar pair: neither verification nor training means anything
  with one kind only.

Everything wrong with a file is reported in one single-line ``DataError`` naming the offending lines:
``bad pair list PATH: 3 bad rows: 1 labels other than 0/1 (line 2: '2'); 1 missing files
(line 3: gone.png); ...``.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.errors import DataError

COLUMNS = "img_a,img_b,label"
_TRUE = ("1", "true")
_FALSE = ("0", "false")
_SHOW = 5  # offenders quoted per kind before "and N more"


@dataclass(frozen=True)
class PairList:
    """A pair list read and checked.

    source: the CSV. images: M unique absolute image paths, in order of first appearance.
    a, b: int64 [P] indices into ``images``, the two sides of each pair. same: int64 [P], 1 similar,
    0 dissimilar. lines: int64 [P], the CSV line of each pair (for messages).
    """

    source: Path
    images: list[str]
    a: np.ndarray
    b: np.ndarray
    same: np.ndarray
    lines: np.ndarray

    def __len__(self) -> int:
        return int(len(self.a))


def parse_label(cell: str) -> int | None:
    """1 or 0 for a label cell under the rules above, None for anything else."""
    text = cell.strip().lower()
    if text in _TRUE or text in _FALSE:
        return 1 if text in _TRUE else 0
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if value in (0.0, 1.0) else None


def _is_label_like(cell: str) -> bool:
    """A number or a boolean word: a row with such a label cell is data, never a header."""
    text = cell.strip().lower()
    if text in ("true", "false"):
        return True
    try:
        float(text)
    except ValueError:
        return False
    return True


class _Offences:
    """What is wrong with the file, by kind, and how many rows it touches."""

    def __init__(self) -> None:
        self.kinds: dict[str, list[str]] = {}
        self.rows: set[int] = set()

    def add(self, kind: str, line: int, detail: str) -> None:
        self.kinds.setdefault(kind, []).append(f"line {line}: {detail}")
        self.rows.add(line)

    def message(self, path: Path) -> str:
        parts = []
        for kind, items in self.kinds.items():
            more = f" and {len(items) - _SHOW} more" if len(items) > _SHOW else ""
            parts.append(f"{len(items)} {kind} ({', '.join(items[:_SHOW])}{more})")
        return f"bad pair list {path}: {len(self.rows)} bad rows: " + "; ".join(parts)


def _resolve(cell: str, base: Path) -> str:
    path = Path(cell).expanduser()
    return os.path.abspath(path if path.is_absolute() else base / path)


def read_pairs(path: str | os.PathLike) -> PairList:
    """Read and check the pair list at ``path`` (rules in the module docstring).

    Raises DataError when the file cannot be read, has a bad row (every one named, one line in
    all), names a missing image, holds no pairs, or lacks similar or dissimilar pairs.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"no such pair list: {path}")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read pair list {path}: {exc}") from None
    base = path.parent
    offences = _Offences()
    index: dict[str, int] = {}
    images: list[str] = []
    a: list[int] = []
    b: list[int] = []
    same: list[int] = []
    lines: list[int] = []
    missing: set[str] = set()
    first = True
    for line, row in enumerate(rows, start=1):
        cells = [c.strip() for c in row]
        while cells and not cells[-1]:  # trailing empty cells: a spreadsheet's export, not data
            cells.pop()
        if not cells or cells[0].startswith("#"):
            continue
        if first:
            first = False
            if len(cells) == 3 and not _is_label_like(cells[2]):
                continue  # header
        if len(cells) != 3:
            offences.add(f"malformed rows (want {COLUMNS})", line, f"{len(cells)} columns")
            continue
        if not cells[0] or not cells[1]:
            offences.add(f"malformed rows (want {COLUMNS})", line, "empty image path")
            continue
        label = parse_label(cells[2])
        if label is None:
            offences.add("labels other than 0/1", line, repr(cells[2]))
        ids = []
        for cell in cells[:2]:
            full = _resolve(cell, base)
            if full in missing or (full not in index and not os.path.isfile(full)):
                if full not in missing:  # each missing file named once, at its first line
                    missing.add(full)
                    offences.add("missing files", line, cell)
                else:
                    offences.rows.add(line)
                ids.append(-1)
                continue
            if full not in index:
                index[full] = len(images)
                images.append(full)
            ids.append(index[full])
        if label is None or min(ids) < 0:
            continue
        a.append(ids[0])
        b.append(ids[1])
        same.append(label)
        lines.append(line)
    if offences.kinds:
        raise DataError(offences.message(path))
    if not a:
        raise DataError(f"bad pair list {path}: empty set: no pairs (want rows {COLUMNS})")
    if sum(same) in (0, len(same)):
        kind = "dissimilar (0)" if sum(same) else "similar (1)"
        raise DataError(f"bad pair list {path}: no {kind} pairs: both kinds are needed")
    return PairList(path, images, np.asarray(a, np.int64), np.asarray(b, np.int64), np.asarray(same, np.int64),
                    np.asarray(lines, np.int64))
