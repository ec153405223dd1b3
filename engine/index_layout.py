"""The bytes of a saved index file, checked before FAISS reads them: its headers and the sizes
they claim, so that a damaged or hostile file is refused with the reason instead of making FAISS
allocate gigabytes (``engine.index.VectorIndex.load`` calls ``layout_problem`` first).

Two layouts are ours: an ``IDMap2`` wrapper (Flat, HNSW ...) whose id table ends the file, and
an inverted file (possibly under a pre-transform) that holds the row ids in its lists.
"""

from __future__ import annotations

import struct
from typing import Any

# FAISS's layout of an IDMap2 index: fourcc, header, the inner index (fourcc, header, payload),
# then the id table (count, ids). Header: d, ntotal, two dummies (always 1 << 20), is_trained, metric.
_HEADER = struct.Struct("<iqqqBi")
_FOURCC_IDMAP2 = b"IxM2"
_FOURCC_FLAT_IP = b"IxFI"
_DUMMY = 1 << 20
_HEADS = 2 * (4 + _HEADER.size)  # outer and inner fourcc + header
_MAX_DIM = 1 << 16
_FOREIGN_IDMAPS = {b"IxMp": "row ids it cannot give back (IDMap, not IDMap2)"}
_FOURCC_PRETRANSFORM = b"IxPT"
_IVF_PREFIX = b"Iw"  # every inverted-file index's fourcc starts so (IwFl, IwPQ, IwPf, IwSq, ...)


def _is_native_magic(magic: bytes) -> bool:
    """True for the fourcc of an index that may hold row ids itself: an inverted-file index, or a
    pre-transform (whose inner index is checked once FAISS has read it)."""
    return magic[:2] == _IVF_PREFIX or magic == _FOURCC_PRETRANSFORM


def _native_layout_problem(head: bytes, size: int, dim: int | None) -> tuple[str, str] | None:
    """(code, reason) for an inverted-file index file (row ids in its own lists) whose header
    cannot be ours; each vector costs at least its 8-byte id, so a count the size cannot hold is
    refused before FAISS allocates for it."""
    if size < 4 + _HEADER.size:
        return "index-unreadable", f"is truncated ({size} bytes)"
    d, ntotal, dummy1, dummy2, trained, metric = _HEADER.unpack_from(head, 4)
    if not (0 < d <= _MAX_DIM and ntotal >= 0 and dummy1 == dummy2 == _DUMMY and trained in (0, 1)):
        return "index-unreadable", "has a damaged header"
    if metric != 0:
        return "index-foreign", "compares vectors by another metric than the inner product"
    if dim is not None and d != dim:
        return "index-dimension", f"has dimension {d}, the library's encoder {dim}"
    if 4 + _HEADER.size + 8 * ntotal > size:
        return "index-unreadable", f"is truncated or damaged (it claims {ntotal} vectors in {size} bytes)"
    return None


def layout_problem(fh: Any, size: int, dim: int | None) -> tuple[str, str] | None:
    """(code, reason) when the bytes cannot be an index of ours, else None. Reads the headers and
    the id table's count only, so nothing a damaged file claims is allocated before it is checked;
    for a Flat index (the default type) every size in the file is checked."""
    if size == 0:
        return "index-unreadable", "is empty"
    head = fh.read(_HEADS)
    magic = head[:4]
    if magic != _FOURCC_IDMAP2:
        if _is_native_magic(magic):
            return _native_layout_problem(head, size, dim)
        if magic in _FOREIGN_IDMAPS:
            return "index-foreign", f"holds {_FOREIGN_IDMAPS[magic]}"
        if len(magic) == 4 and magic.isalnum() and magic[:1] == b"I":
            return "index-foreign", "is a FAISS index that holds no row ids"
        return "index-unreadable", "is not a FAISS index file"
    if size < _HEADS + 16:
        return "index-unreadable", f"is truncated ({size} bytes)"
    d, ntotal, dummy1, dummy2, trained, metric = _HEADER.unpack_from(head, 4)
    inner = head[4 + _HEADER.size:8 + _HEADER.size]
    d2, ntotal2, dummy3, dummy4, trained2, metric2 = _HEADER.unpack_from(head, 8 + _HEADER.size)
    if not (0 < d <= _MAX_DIM and ntotal >= 0 and dummy1 == dummy2 == dummy3 == dummy4 == _DUMMY
            and trained in (0, 1) and trained2 in (0, 1) and (d2, ntotal2) == (d, ntotal)):
        return "index-unreadable", "has a damaged header"
    if metric != 0 or metric2 != 0:  # 0: METRIC_INNER_PRODUCT
        return "index-foreign", "compares vectors by another metric than the inner product"
    if dim is not None and d != dim:
        return "index-dimension", f"has dimension {d}, the library's encoder {dim}"
    table = 8 + 8 * ntotal
    if _HEADS + table > size:
        return "index-unreadable", f"is truncated or damaged (it claims {ntotal} vectors in {size} bytes)"
    fh.seek(size - table)
    (count,) = struct.unpack("<Q", fh.read(8))
    if count != ntotal:
        return "index-unreadable", "is truncated or its id table is damaged"
    if inner == _FOURCC_FLAT_IP:
        fh.seek(_HEADS)
        (floats,) = struct.unpack("<Q", fh.read(8))  # the vectors, counted in float32 values
        if floats != ntotal * d or size != _HEADS + 8 + 4 * floats + table:
            return "index-unreadable", "is truncated or damaged (its sizes do not add up)"
    return None
