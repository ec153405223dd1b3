"""The vector index: FAISS with ids equal to database row ids (``IDMap2``), inner product on
L2-normalised vectors (cosine similarity), saved atomically.

An index file is derived data and is read as untrusted: before FAISS parses it, its size, headers
and id table are checked (so a damaged size field cannot make FAISS allocate gigabytes) and its
checksum can be compared with the one recorded when it was saved; after, its kind (row ids, inner
product, dimension, index type) is checked. Every failure is an ``IndexFileError`` saying why.

FAISS is imported on first use, so importing this module costs nothing at start-up.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Collection, Iterable

import numpy as np

from engine.atomic import atomic_path
from engine.errors import CorruptFileError, EngineError

if TYPE_CHECKING:
    import faiss as faiss_module


def _faiss():
    import faiss

    return faiss


def _as_vectors(embeddings: np.ndarray, dim: int) -> np.ndarray:
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != dim:
        raise EngineError(f"vectors of shape {x.shape} do not fit an index of dimension {dim}")
    return x


def _as_ids(ids: Iterable[int] | np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int64)


@dataclass(frozen=True)
class IndexFileInfo:
    """What identifies one saved index file: its size in bytes, modification time (ns) and
    checksum (``crc32:XXXXXXXX`` of its bytes). Recorded beside the index when it is saved."""

    bytes: int
    mtime_ns: int
    checksum: str

    def to_dict(self) -> dict[str, Any]:
        return {"bytes": self.bytes, "mtime_ns": self.mtime_ns, "checksum": self.checksum}


class IndexFileError(CorruptFileError):
    """An index file that cannot be used. ``code``: ``index-missing``, ``index-unverified`` (no
    checksum was recorded for it), ``index-unreadable`` (damaged: checksum, size or structure),
    ``index-foreign`` (a FAISS index of another kind), ``index-dimension`` or ``index-duplicates``.
    ``identity``: (bytes, mtime_ns) of the file that was read, None when there was none."""

    def __init__(self, message: str, *, code: str, identity: tuple[int, int] | None = None):
        super().__init__(message)
        self.code = code
        self.identity = identity


def file_identity(path: str | os.PathLike) -> tuple[int, int] | None:
    """(bytes, mtime_ns) of ``path``, None when it does not exist: enough to tell whether a file was
    replaced (an atomic save keeps the size and time the file was written with)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return int(st.st_size), int(st.st_mtime_ns)


def _checksum(fh: Any, chunk: int = 16 << 20) -> str:
    fh.seek(0)
    crc = 0
    while True:
        block = fh.read(chunk)
        if not block:
            return f"crc32:{crc:08x}"
        crc = zlib.crc32(block, crc)


def describe_file(path: str | os.PathLike) -> IndexFileInfo:
    """The IndexFileInfo of the file at ``path`` (reads it whole for the checksum)."""
    with open(path, "rb") as fh:
        st = os.fstat(fh.fileno())
        return IndexFileInfo(int(st.st_size), int(st.st_mtime_ns), _checksum(fh))


# FAISS's layout of an IDMap2 index: fourcc, header, the inner index (fourcc, header, payload),
# then the id table (count, ids). Header: d, ntotal, two dummies (always 1 << 20), is_trained, metric.
_HEADER = struct.Struct("<iqqqBi")
_FOURCC_IDMAP2 = b"IxM2"
_FOURCC_FLAT_IP = b"IxFI"
_DUMMY = 1 << 20
_HEADS = 2 * (4 + _HEADER.size)  # outer and inner fourcc + header
_MAX_DIM = 1 << 16
_FOREIGN_IDMAPS = {b"IxMp": "row ids it cannot give back (IDMap, not IDMap2)"}


def _layout_problem(fh: Any, size: int, dim: int | None) -> tuple[str, str] | None:
    """(code, reason) when the bytes cannot be an index of ours, else None. Reads the headers and
    the id table's count only, so nothing a damaged file claims is allocated before it is checked;
    for a Flat index (the default type) every size in the file is checked."""
    if size == 0:
        return "index-unreadable", "is empty"
    head = fh.read(_HEADS)
    magic = head[:4]
    if magic != _FOURCC_IDMAP2:
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


class VectorIndex:
    """A FAISS index keyed by int64 ids. Scores are inner products (cosine on unit vectors)."""

    def __init__(self, index: "faiss_module.Index", factory: str):
        """index: a FAISS ``IndexIDMap2`` over the real index; factory: the factory string after
        ``IDMap2`` (what is recorded beside the file)."""
        self._index = index
        self.factory = factory
        self._removable: bool | None = None  # probed once, on first question
        self.source: IndexFileInfo | None = None  # the file it was read from or last saved to

    @classmethod
    def build(cls, dim: int, factory: str = "Flat") -> "VectorIndex":
        """An empty index of ``dim`` dimensions from a FAISS factory string (``Flat``, ``HNSW32``,
        ``IVF1024,Flat``, ``IVF1024,PQ32`` ...), wrapped in ``IDMap2`` so ids are ours."""
        faiss = _faiss()
        try:
            index = faiss.index_factory(int(dim), f"IDMap2,{factory}", faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise EngineError(f"bad index type {factory!r}: {str(exc).splitlines()[0]}") from None
        return cls(index, factory)

    @classmethod
    def load(cls, path: str | os.PathLike, factory: str = "Flat", *, dim: int | None = None,
             checksums: Collection[str] | Callable[[], Collection[str]] | None = None,
             check_type: bool = False) -> "VectorIndex":
        """Read and check an index file; the result's ``source`` describes the file read.

        factory: the factory string recorded for it; with check_type, the file must be of the
        FAISS class that string builds (so ``IVF64,Flat`` accepts any IVF-flat file). dim: the
        dimension it must have. checksums: the checksums recorded
        for it when it was saved (or a callable giving them, called once the file has been hashed,
        so a save that lands meanwhile is seen); the file's must be among them, and an empty
        collection means none was recorded. None skips that check.

        Raises IndexFileError (a CorruptFileError) naming the file and the reason, before FAISS
        sees the file whenever the reason can be told from its checksum, size and headers."""
        name = os.fspath(path)

        def fail(code: str, reason: str, identity: tuple[int, int] | None = None) -> IndexFileError:
            return IndexFileError(f"index file {name} {reason}; it is derived from the database: `engine doctor "
                                  "--repair` sets it aside and rebuilds it from the stored embeddings (queries "
                                  "rebuild it too)", code=code, identity=identity)

        try:
            fh = open(name, "rb")
        except FileNotFoundError:
            raise fail("index-missing", "is missing") from None
        except OSError as exc:
            raise fail("index-unreadable", f"cannot be opened ({exc.strerror or exc})") from None
        with fh:
            st = os.fstat(fh.fileno())
            identity = (int(st.st_size), int(st.st_mtime_ns))
            checksum = _checksum(fh)
            if checksums is not None:
                recorded = checksums() if callable(checksums) else checksums
                if not recorded:
                    raise fail("index-unverified", "has no checksum recorded beside it (saved by an older engine, or "
                               "index.json is lost), so it is not trusted", identity)
                if checksum not in recorded:
                    raise fail("index-unreadable", "is damaged: its checksum differs from the one recorded when it "
                               "was saved", identity)
            fh.seek(0)
            problem = _layout_problem(fh, identity[0], dim)
            if problem is not None:
                raise fail(*problem, identity)
            # the same open file (not the name, which a save may have moved on) where the OS allows
            source = f"/proc/self/fd/{fh.fileno()}" if os.path.isdir("/proc/self/fd") else name
            faiss = _faiss()
            try:
                index = faiss.read_index(source)
            except Exception as exc:  # RuntimeError, MemoryError (std::bad_alloc) ...: damaged all the same
                first = str(exc).splitlines()[-1] if str(exc) else type(exc).__name__
                raise fail("index-unreadable", f"cannot be read ({first.strip()})", identity) from None
        problem = _kind_problem(index, factory if check_type else None, dim)
        if problem is not None:
            raise fail(*problem, identity)
        loaded = cls(index, factory)
        loaded.source = IndexFileInfo(identity[0], identity[1], checksum)
        return loaded

    @property
    def dim(self) -> int:
        return int(self._index.d)

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    @property
    def is_trained(self) -> bool:
        return bool(self._index.is_trained)

    def train(self, embeddings: np.ndarray) -> None:
        """Train the quantiser of IVF/PQ indexes (no-op for Flat/HNSW); embeddings float32 [N, D].
        Raises EngineError when FAISS refuses (too few vectors for the number of centroids)."""
        if self._index.is_trained:
            return
        x = _as_vectors(embeddings, self.dim)
        try:
            self._index.train(x)
        except RuntimeError as exc:
            raise EngineError(f"cannot train index {self.factory!r} on {len(x)} vectors: "
                              f"{str(exc).splitlines()[0]}") from None

    def add(self, embeddings: np.ndarray, ids: np.ndarray) -> None:
        """Add float32 [N, D] unit vectors under int64 [N] ids (the database row ids)."""
        x = _as_vectors(embeddings, self.dim)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(ids) != len(x):
            raise EngineError(f"{len(ids)} ids for {len(x)} vectors")
        if len(x):
            self._index.add_with_ids(x, ids)

    @property
    def supports_removal(self) -> bool:
        """Whether vectors can be removed by id. Graph indexes (HNSW) cannot: an index of that type
        is rebuilt instead. Asked of FAISS itself, by removing nothing from the inner index."""
        if self._removable is None:
            faiss = _faiss()
            inner = faiss.downcast_index(self._index.index)
            try:
                inner.remove_ids(faiss.IDSelectorRange(0, 0))
            except RuntimeError:
                self._removable = False
            else:
                self._removable = True
        return self._removable

    @property
    def is_exact(self) -> bool:
        """True for a flat index, which holds the vectors as added (so they can be compared with
        the stored ones); the others hold them lossily or search approximately."""
        faiss = _faiss()
        return isinstance(faiss.downcast_index(self._index.index), faiss.IndexFlat)

    def remove(self, ids: Iterable[int] | np.ndarray) -> int:
        """Remove vectors by id (int64 [N]; unknown ids are ignored); returns how many were removed.
        Raises EngineError when this index type cannot remove (see ``supports_removal``)."""
        ids = _as_ids(ids)
        if not len(ids):
            return 0
        if not self.supports_removal:
            raise EngineError(f"an index of type {self.factory!r} cannot remove vectors; rebuild it instead")
        return int(self._index.remove_ids(ids))

    def replace_with(self, other: "VectorIndex") -> None:
        """Take over ``other``'s vectors and type in place, so every holder of this object sees the
        replacement (a rebuilt index standing in for one that could not remove)."""
        self._index, self.factory, self._removable = other._index, other.factory, other._removable
        self.source = other.source

    def reconstruct(self, ids: Iterable[int] | np.ndarray) -> np.ndarray:
        """The vectors held under ``ids`` (int64 [N], each held): float32 [N, D]. Exact only for a
        flat index (``is_exact``). Raises EngineError for an id not held."""
        ids = _as_ids(ids)
        if not len(ids):
            return np.zeros((0, self.dim), np.float32)
        try:
            return np.asarray(self._index.reconstruct_batch(ids), np.float32).reshape(len(ids), self.dim)
        except RuntimeError as exc:
            raise EngineError(f"cannot read vectors back from the index: {str(exc).splitlines()[0]}") from None

    def set_search_parameters(self, params: str) -> None:
        """Set search-time parameters in FAISS ``ParameterSpace`` syntax (``nprobe=16``,
        ``efSearch=64``, comma-separated). Raises EngineError for one this index type lacks."""
        faiss = _faiss()
        try:
            faiss.ParameterSpace().set_index_parameters(self._index, params)
        except RuntimeError as exc:
            raise EngineError(f"index {self.factory!r} does not take {params!r}: {str(exc).splitlines()[0]}") from None

    def ids(self) -> np.ndarray:
        """All ids held, int64 [ntotal] (insertion order)."""
        faiss = _faiss()
        return faiss.vector_to_array(self._index.id_map).astype(np.int64)

    def search(self, embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product: returns (scores float32 [Q, k], ids int64 [Q, k]); slots past
        the number of stored vectors have id -1 and score -inf."""
        x = _as_vectors(embeddings, self.dim)
        k = max(1, int(k))
        if self.ntotal == 0:
            return np.full((len(x), k), -np.inf, np.float32), np.full((len(x), k), -1, np.int64)
        D, I = self._index.search(x, k)
        D = D.astype(np.float32)
        D[I < 0] = -np.inf
        return D, I.astype(np.int64)

    @property
    def filters_exactly(self) -> bool:
        """True when ``search_among`` can restrict a search to given ids exactly (a Flat index)."""
        faiss = _faiss()
        return isinstance(faiss.downcast_index(self._index.index), faiss.IndexFlat)

    def search_among(self, embeddings: np.ndarray, k: int,
                     ids: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Exact top-k restricted to ``ids`` (int64), as ``search`` returns it, for index types
        whose search takes an id filter exactly (Flat); None for the others (graph and inverted-list
        indexes would lose hits to the filter), so the caller searches deeper and filters."""
        if not self.filters_exactly:
            return None
        faiss = _faiss()
        x = _as_vectors(embeddings, self.dim)
        k = max(1, int(k))
        if self.ntotal == 0 or len(ids) == 0:
            return np.full((len(x), k), -np.inf, np.float32), np.full((len(x), k), -1, np.int64)
        selector = faiss.IDSelectorBatch(_as_ids(ids))
        params = faiss.SearchParameters(sel=selector)
        # The C entry point: faiss.contrib.torch_utils (imported by pytorch-metric-learning) replaces
        # Index.search in the whole process with a version that takes no search parameters.
        D = np.empty((len(x), k), np.float32)
        I = np.empty((len(x), k), np.int64)
        self._index.search_c(len(x), faiss.swig_ptr(x), k, faiss.swig_ptr(D), faiss.swig_ptr(I), params)
        D[I < 0] = -np.inf
        return D, I.astype(np.int64)

    def save(self, path: str | os.PathLike, *,
             before_replace: Callable[[IndexFileInfo], None] | None = None) -> Path:
        """Write atomically: a temporary file in the same folder, fsynced, then renamed over the
        old one, so a crash leaves either the old index or the new one, never half of one.

        before_replace(info): called with the new file's IndexFileInfo after it is written and
        before it replaces the old one (where the library records its checksum). ``source`` is
        set to that info."""
        faiss = _faiss()
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:  # written by Python: a full disk raises OSError (FAISS's own
                writer = faiss.PyCallbackIOWriter(fh.write)  # file writer only prints the error)
                faiss.write_index(self._index, writer)
                del writer
            info = describe_file(tmp)  # a rename keeps size and mtime: these describe the final file
            if before_replace is not None:
                before_replace(info)
        self.source = info
        return Path(path)

    def memory_bytes(self) -> int:
        """Serialised size of the index in bytes (what it costs on disk and, roughly, in RAM)."""
        faiss = _faiss()
        return int(faiss.serialize_index(self._index).nbytes)


def _kind_problem(index: Any, factory: str | None, dim: int | None) -> tuple[str, str] | None:
    """(code, reason) when a FAISS index read from a file is not what the library needs: row ids
    (IDMap2), inner product, ``dim`` dimensions, the type ``factory`` builds (when given), one id
    per vector."""
    faiss = _faiss()
    if not isinstance(index, faiss.IndexIDMap2):
        return "index-foreign", "holds no row ids"
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        return "index-foreign", "compares vectors by another metric than the inner product"
    if dim is not None and index.d != dim:
        return "index-dimension", f"has dimension {index.d}, the library's encoder {dim}"
    inner = faiss.downcast_index(index.index)
    if inner.ntotal != index.ntotal or index.id_map.size() != index.ntotal or (index.ntotal and not inner.is_trained):
        return "index-unreadable", "is damaged (its parts disagree on what it holds)"
    expected = type(inner)
    if factory is not None:
        try:
            model = VectorIndex.build(index.d, factory)  # held while its inner index is looked at
        except EngineError:  # a type this FAISS cannot build: nothing to compare with
            pass
        else:
            expected = type(faiss.downcast_index(model._index.index))
    if not (isinstance(inner, expected) or issubclass(expected, type(inner))):  # IndexFlatIP is an IndexFlat
        return "index-foreign", f"is a {type(inner).__name__}, not the library's index type {factory!r}"
    ids = faiss.vector_to_array(index.id_map)
    if len(ids) and (ids.min() < 0 or len(np.unique(ids)) != len(ids)):
        return "index-duplicates", "holds duplicate or negative row ids"
    return None
