"""What the parts of the metadata store share: its error, id chunks for ``IN (...)`` clauses and
the decoding of vector blobs."""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

CHUNK = 500  # ids per IN (...) clause: well under SQLite's variable limit


class StoreError(Exception):
    """The database cannot be opened or read. (The engine maps it to its own CorruptFileError.)"""


def chunks(seq: Sequence, size: int = CHUNK) -> Iterator[Sequence]:
    """``seq`` in consecutive slices of at most ``size``."""
    for start in range(0, len(seq), size):
        yield seq[start:start + size]


def decode_vectors(blobs: Sequence[bytes], dim: int) -> np.ndarray:
    """Stored vector blobs (``dim`` float32 values each) -> float32 [len(blobs), dim]. Raises
    StoreError when a blob has another size: the vectors were switched to another encoder's
    between the caller's read of the dimension and this read (``engine reindex --model``), or one
    is damaged."""
    if not blobs:
        return np.zeros((0, dim), np.float32)
    if any(len(b) != dim * 4 for b in blobs):
        raise StoreError(f"stored vectors are not all {dim}-d: the library was switched to another encoder while "
                         "this command read it (run it again), or a vector is damaged (`engine doctor` checks)")
    return np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(blobs), dim).copy()
