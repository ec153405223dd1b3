"""How the store keeps a vector: ``dim`` little-endian float16 values (2 bytes each) in one blob.

Half precision is enough for what stored vectors are for (rebuilding and re-ranking the index, and
queries by an indexed file): the embeddings are L2-normalised, so every component lies in [-1, 1],
where float16 keeps 11 significant bits (a relative error of at most 2**-11 per component): the
cosine of a vector with its stored copy is above 0.999999. It halves the database next to
float32, which schema 2 and earlier kept (``LEGACY_DTYPE``; ``db.migrations`` converts them).

Rounding moves a unit vector's norm by up to 2**-11, and an inner product with it by as much: a
search by an indexed file's stored vector would find the file itself at an L2 distance of about
0.01 instead of 0. So a row read back with a norm that rounding of a unit vector explains is
scaled back to unit norm (the cosine, not the norm, is what float16 keeps well); then each
component is within ``TOLERANCE`` of the unit vector that was stored, and the distance of a vector
to its stored copy is below 1e-3. Other rows are returned as rounded.

Writers pass float32 and readers get float32: the conversion lives here and nowhere else.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from db.common import StoreError

STORED_DTYPE = np.dtype("<f2")  # schema 3 and later
LEGACY_DTYPE = np.dtype("<f4")  # schema 2 and earlier
_LARGEST = float(np.finfo(np.float16).max)  # 65504
_UNIT_SLACK = 2.0 ** -9  # |norm**2 - 1| of a rounded unit vector is below 2**-10
TOLERANCE = 2.0 ** -9  # a component of a unit vector and of its stored copy differ by less (2**-10 at most)


def blob_size(dim: int, dtype: np.dtype = STORED_DTYPE) -> int:
    """Bytes of one stored ``dim``-d vector."""
    return int(dim) * dtype.itemsize


def encode_vectors(vectors: np.ndarray) -> list[bytes]:
    """float32 [N, D] (anything numpy reads as a 2-d array of reals) -> N blobs of D float16
    values each. Raises StoreError for a value that float16 cannot hold (not finite, or beyond
    +-65504): storing it would silently make it infinite."""
    array = np.asarray(vectors, dtype=np.float32)
    if array.ndim != 2:
        raise StoreError(f"vectors must be a 2-d array [N, D], got shape {array.shape}")
    if array.size and not (np.isfinite(array).all() and np.abs(array).max() <= _LARGEST):
        raise StoreError("vectors must be finite and within +-65504 to be stored (float16)")
    half = np.ascontiguousarray(array, dtype=STORED_DTYPE)
    return [row.tobytes() for row in half]


def _unit_again(values: np.ndarray) -> np.ndarray:
    """``values`` (float32 [N, D], rounded from float16) with each row that was a unit vector
    before rounding scaled back to unit norm, in place (see the module docstring)."""
    # float32 sums: their error (~1e-6 at 1280-d) is far inside the slack, and they cost a sixth of
    # float64's, which matters when re-ranking decodes thousands of vectors per batch of queries
    squared = np.einsum("ij,ij->i", values, values)
    near = np.abs(squared - 1.0) <= _UNIT_SLACK
    if near.any():
        values[near] /= np.sqrt(squared[near]).astype(np.float32)[:, None]
    return values


def as_stored(vectors: np.ndarray) -> np.ndarray:
    """float32 [N, D] -> float32 [N, D]: the values a reader gets back after storing ``vectors``
    (rounded to float16, unit rows kept unit)."""
    return _unit_again(np.asarray(vectors, dtype=np.float32).astype(STORED_DTYPE).astype(np.float32))


def stack_vectors(blobs: Sequence[bytes], dim: int, *, legacy: bool = False) -> np.ndarray:
    """Stored vector blobs -> their values as stored, one row each: float16 [len(blobs), dim]
    when every blob is float16 (nothing converted: ``widen`` makes rows of it what
    ``decode_vectors`` gives, a few at a time where a caller scores thousands); with ``legacy``
    and some float32 blobs among them, float32 [len(blobs), dim] as ``decode_vectors`` gives.

    Raises StoreError when a blob has another size: the vectors were switched to another
    encoder's between the caller's read of the dimension and this read (``engine reindex
    --model``), or one is damaged."""
    if not blobs:
        return np.zeros((0, dim), STORED_DTYPE)
    size = blob_size(dim)
    if all(len(b) == size for b in blobs):
        return np.frombuffer(b"".join(blobs), dtype=STORED_DTYPE).reshape(len(blobs), dim)
    legacy_size = blob_size(dim, LEGACY_DTYPE)
    if legacy and all(len(b) in (size, legacy_size) for b in blobs):
        out = np.empty((len(blobs), dim), np.float32)
        half = np.asarray([len(b) == size for b in blobs])
        for row, blob in enumerate(blobs):
            out[row] = np.frombuffer(blob, dtype=STORED_DTYPE if half[row] else LEGACY_DTYPE)
        out[half] = _unit_again(out[half])  # float32 rows are returned exactly as written
        return out
    raise StoreError(f"stored vectors are not all {dim}-d: the library was switched to another encoder while "
                     "this command read it (run it again), or a vector is damaged (`engine doctor` checks)")


def widen(stacked: np.ndarray) -> np.ndarray:
    """Rows of ``stack_vectors``'s result -> float32 [n, dim], the values ``decode_vectors``
    gives for them: float16 rows converted and scaled back to unit norm (a new array); float32
    rows (already so) as they are."""
    if stacked.dtype == np.float32:
        return stacked
    return _unit_again(stacked.astype(np.float32))


def decode_vectors(blobs: Sequence[bytes], dim: int, *, legacy: bool = False) -> np.ndarray:
    """Stored vector blobs -> float32 [len(blobs), dim]. Each blob must be ``dim`` float16 values;
    with ``legacy`` (a database not yet converted by schema 3's upgrade, opened read-only or read
    while the upgrade runs) ``dim`` float32 values are read too. Raises StoreError as
    ``stack_vectors`` does."""
    return widen(stack_vectors(blobs, dim, legacy=legacy))


def halve_blob(blob: bytes) -> bytes | None:
    """A schema-2 blob (float32 values) as a schema-3 blob (the same values as float16), or None
    when it cannot be one (its length is not a whole number of float32 values, or a value is not
    finite or out of float16's range): such a blob is left as it is, and ``engine doctor`` finds it
    malformed and re-embeds its image."""
    if len(blob) % LEGACY_DTYPE.itemsize:
        return None
    values = np.frombuffer(blob, dtype=LEGACY_DTYPE)
    if values.size and not (np.isfinite(values).all() and np.abs(values).max() <= _LARGEST):
        return None
    return values.astype(STORED_DTYPE).tobytes()
