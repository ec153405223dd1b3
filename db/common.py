"""What the parts of the metadata store share: its error and id chunks for ``IN (...)`` clauses.
(How a vector is stored: ``db.vectors``.)"""

from __future__ import annotations

from typing import Iterator, Sequence

CHUNK = 500  # ids per IN (...) clause: well under SQLite's variable limit


class StoreError(Exception):
    """The database cannot be opened or read. (The engine maps it to its own CorruptFileError.)"""


class StoreFullError(StoreError):
    """The database could not be written: the disk (or the database's quota) is full."""


PG_DISK_FULL = "53100"  # PostgreSQL's SQLSTATE for "could not extend file: No space left on device"


def chunks(seq: Sequence, size: int = CHUNK) -> Iterator[Sequence]:
    """``seq`` in consecutive slices of at most ``size``."""
    for start in range(0, len(seq), size):
        yield seq[start:start + size]
