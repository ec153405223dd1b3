"""The vector index: FAISS with ids equal to database row ids, inner product on L2-normalised
vectors (cosine similarity), saved atomically.

Flat and graph types are wrapped in ``IDMap2`` (they number vectors by position); inverted-file
types (``IVF...``, with or without a pre-transform such as ``OPQ``) keep the row ids in their own
lists, as FAISS designed them to: ``IDMap2`` over an IVF index gives the wrong ids back after a
removal (it compacts its id table, the lists keep the old positions).

An index file is derived data and is read as untrusted: before FAISS parses it, its size, headers
and id table are checked (so a damaged size field cannot make FAISS allocate gigabytes) and its
checksum can be compared with the one recorded when it was saved; after, its kind (row ids, inner
product, dimension, index type) is checked. Every failure is an ``IndexFileError`` saying why.

FAISS is imported on first use, so importing this module costs nothing at start-up.
"""

from __future__ import annotations

import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Collection, Iterable

import numpy as np

from engine.atomic import atomic_path
from engine.errors import CorruptFileError, EngineError
from engine.index_layout import layout_problem

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


@dataclass(frozen=True)
class SearchSettings:
    """How an index is searched, as tuned after it was built (``engine.index_tuning``) and
    recorded beside it: ``params`` in FAISS ``ParameterSpace`` syntax (``nprobe=32``,
    ``efSearch=64``; empty for none); ``rerank``: for a search of ``k`` hits, how many candidates
    (at least) are re-scored exactly from the stored vectors (0: the index's scores are exact);
    ``recall``: recall@``k`` of the whole search (re-ranking included) measured against exact
    search on ``queries`` held-out stored vectors when the index held ``rows`` vectors, for the
    ``target`` asked (None: not measured)."""

    params: str = ""
    rerank: int = 0
    recall: float | None = None
    target: float | None = None
    k: int = 10
    queries: int = 0
    rows: int = 0

    def rerank_depth(self, k: int) -> int:
        """Candidates to re-rank for a search of ``k`` hits: ``rerank`` scaled to ``k`` (never
        fewer than ``k``); 0 when the index's own scores are exact."""
        if self.rerank <= 0:
            return 0
        return max(int(k), self.rerank, -(-self.rerank * int(k) // max(1, self.k)))

    def to_dict(self) -> dict[str, Any]:
        return {"params": self.params, "rerank": self.rerank, "recall": self.recall, "target": self.target,
                "k": self.k, "queries": self.queries, "rows": self.rows}

    @classmethod
    def from_dict(cls, raw: Any) -> "SearchSettings | None":
        """The settings recorded in ``raw`` (a parsed ``index.json`` entry), None when they are
        missing or malformed (the file is untrusted: nothing there may raise)."""
        if not isinstance(raw, dict):
            return None
        try:
            params = raw.get("params", "")
            recall, target = raw.get("recall"), raw.get("target")
            out = cls(params=params if isinstance(params, str) else "", rerank=max(0, int(raw.get("rerank", 0))),
                      recall=None if recall is None else float(recall), target=None if target is None else float(target),
                      k=max(1, int(raw.get("k", 10))), queries=max(0, int(raw.get("queries", 0))),
                      rows=max(0, int(raw.get("rows", 0))))
        except (TypeError, ValueError, OverflowError):
            return None
        return out if re.fullmatch(r"[A-Za-z_]+=[0-9.]+(,[A-Za-z_]+=[0-9.]+)*|", out.params) else None


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


class VectorIndex:
    """A FAISS index keyed by int64 ids. Scores are inner products (cosine on unit vectors).

    ``settings``: how it is searched (applied with ``apply``; recorded beside the saved file);
    ``built_rows``: how many vectors it was built for (the library moves it to another type when
    the row count outgrows that, see ``engine.index_policy``)."""

    def __init__(self, index: "faiss_module.Index", factory: str):
        """index: a FAISS ``IndexIDMap2`` over the real index, or an inverted-file index (possibly
        under a pre-transform) that holds the row ids itself; factory: the factory string (after
        ``IDMap2`` for a wrapped one: what is recorded beside the file)."""
        self._index = index
        self.factory = factory
        self._removable: bool | None = None  # probed once, on first question
        self.source: IndexFileInfo | None = None  # the file it was read from or last saved to
        self.settings = SearchSettings()
        self.built_rows = 0

    @classmethod
    def build(cls, dim: int, factory: str = "Flat") -> "VectorIndex":
        """An empty index of ``dim`` dimensions from a FAISS factory string (``Flat``, ``HNSW32``,
        ``IVF1024,Flat``, ``OPQ64_256,IVF1024,PQ64x4fs`` ...). Inverted-file types hold the row ids
        in their lists; the others are wrapped in ``IDMap2`` so ids are ours."""
        faiss = _faiss()
        try:
            index = faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
            if _native_ivf(index) is None:
                index = faiss.index_factory(int(dim), f"IDMap2,{factory}", faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise EngineError(f"bad index type {factory!r}: {str(exc).splitlines()[0]}") from None
        return cls(index, factory)

    @classmethod
    def load(cls, path: str | os.PathLike, factory: str | None = "Flat", *, dim: int | None = None,
             checksums: Collection[str] | Callable[[], Collection[str]] | None = None,
             check_type: bool = False) -> "VectorIndex":
        """Read and check an index file; the result's ``source`` describes the file read.

        factory: the factory string recorded for it (None: unknown, read from the file's structure);
        with check_type, the file must be of the FAISS classes that string builds (so ``IVF64,Flat``
        accepts any IVF-flat file). dim: the
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
            problem = layout_problem(fh, identity[0], dim)
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
        loaded = cls(index, factory if factory is not None else _factory_of(index))
        loaded.source = IndexFileInfo(identity[0], identity[1], checksum)
        loaded.built_rows = loaded.ntotal
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
    def _mapped(self) -> bool:
        """True when ids are kept by an ``IDMap2`` wrapper (Flat, HNSW, ...), False when the index
        holds them itself (inverted files)."""
        return isinstance(self._index, _faiss().IndexIDMap2)

    @property
    def supports_removal(self) -> bool:
        """Whether vectors can be removed by id. Graph indexes (HNSW) cannot: an index of that type
        is rebuilt instead. Asked of FAISS itself, by removing nothing from the inner index."""
        if self._removable is None:
            faiss = _faiss()
            inner = faiss.downcast_index(self._index.index) if self._mapped else self._index
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
        return self._mapped and isinstance(faiss.downcast_index(self._index.index), faiss.IndexFlat)

    @property
    def exact_scores(self) -> bool:
        """True when the scores a search returns are exact inner products of the full vectors
        (Flat, HNSW over flat storage, IVF-Flat); False for compressed codes (PQ, SQ) and reduced
        dimensions (PCA, OPQ), whose candidates the search path re-scores from the stored
        vectors (see ``engine.rerank``)."""
        faiss = _faiss()
        if self._mapped:
            return isinstance(faiss.downcast_index(self._index.index), (faiss.IndexFlat, faiss.IndexHNSWFlat))
        return isinstance(faiss.downcast_index(self._index), faiss.IndexIVFFlat)

    def apply(self, settings: SearchSettings) -> None:
        """Search with ``settings`` from now on (their FAISS parameters are set on the index).
        Raises EngineError for parameters this index type lacks."""
        if settings.params:
            self.set_search_parameters(settings.params)
        self.settings = settings

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
        """Take over ``other``'s vectors, type and settings in place, so every holder of this object
        sees the replacement (a rebuilt index standing in for one that could not remove)."""
        self._index, self.factory, self._removable = other._index, other.factory, other._removable
        self.source, self.settings, self.built_rows = other.source, other.settings, other.built_rows

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
        """All ids held, int64 [ntotal] (insertion order for a wrapped index; list by list for an
        inverted file)."""
        return _held_ids(self._index)

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
        return self.is_exact

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


def _native_ivf(index: Any) -> Any | None:
    """The inverted-file index that holds the row ids of ``index`` itself (an IVF index, or one
    under a pre-transform), downcast; None for any other kind (an ``IDMap2`` wrapper included)."""
    faiss = _faiss()
    top = faiss.downcast_index(index)
    if isinstance(top, faiss.IndexPreTransform):
        top = faiss.downcast_index(top.index)
    return top if isinstance(top, faiss.IndexIVF) else None


def _held_ids(index: Any) -> np.ndarray:
    """The ids ``index`` holds, int64 [ntotal]: an ``IDMap2``'s table, or the ids of every list of
    an inverted file."""
    faiss = _faiss()
    if isinstance(index, faiss.IndexIDMap2):
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    ivf = _native_ivf(index)
    lists = ivf.invlists
    parts = []
    for number in range(lists.nlist):
        size = lists.list_size(number)
        if size:
            pointer = lists.get_ids(number)
            parts.append(faiss.rev_swig_ptr(pointer, size).copy())
            lists.release_ids(number, pointer)
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def _structure(index: Any) -> list[type]:
    """The FAISS classes ``index`` is made of, outermost first: wrappers, transforms, the index,
    an inverted file's coarse quantiser (what a factory string decides)."""
    faiss = _faiss()
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexIDMap2):
        return [type(index), *_structure(index.index)]
    if isinstance(index, faiss.IndexPreTransform):
        steps = [type(faiss.downcast_VectorTransform(index.chain.at(i))) for i in range(index.chain.size())]
        return [type(index), *steps, *_structure(index.index)]
    if isinstance(index, faiss.IndexIVF):
        return [type(index), type(faiss.downcast_index(index.quantizer))]
    return [type(index)]


def _factory_of(index: Any) -> str:
    """The factory string FAISS reads back from ``index``'s structure (without an ``IDMap2``
    wrapper); its class name when FAISS cannot name it."""
    from faiss.contrib.factory_tools import reverse_index_factory

    faiss = _faiss()
    held = [faiss.downcast_index(index)]  # a wrapper owns what it wraps: keep it alive meanwhile
    if isinstance(held[0], faiss.IndexIDMap2):
        held.append(faiss.downcast_index(held[0].index))
    try:
        return reverse_index_factory(held[-1])
    except (NotImplementedError, KeyError, RuntimeError, AttributeError):
        return type(held[-1]).__name__


def _same_kind(found: list[type], expected: list[type]) -> bool:
    """Whether the classes of a read index fit those a factory string builds (a subclass either
    way: ``IndexFlatIP`` is an ``IndexFlat``)."""
    return len(found) == len(expected) and all(issubclass(a, b) or issubclass(b, a) for a, b in zip(found, expected))


def _kind_problem(index: Any, factory: str | None, dim: int | None) -> tuple[str, str] | None:
    """(code, reason) when a FAISS index read from a file is not what the library needs: row ids
    (IDMap2, or an inverted file's own), inner product, ``dim`` dimensions, the type ``factory``
    builds (when given), one id per vector."""
    faiss = _faiss()
    native = _native_ivf(index)
    if not isinstance(index, faiss.IndexIDMap2) and native is None:
        return "index-foreign", "holds no row ids"
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        return "index-foreign", "compares vectors by another metric than the inner product"
    if dim is not None and index.d != dim:
        return "index-dimension", f"has dimension {index.d}, the library's encoder {dim}"
    if native is None:
        inner = faiss.downcast_index(index.index)
        if inner.ntotal != index.ntotal or index.id_map.size() != index.ntotal or (index.ntotal and not inner.is_trained):
            return "index-unreadable", "is damaged (its parts disagree on what it holds)"
        if _native_ivf(inner) is not None:  # an older engine's file: a removal would scramble its ids
            return "index-foreign", "is an inverted file under an id table (whose ids a removal scrambles)"
    elif native.ntotal != index.ntotal or (index.ntotal and not index.is_trained):
        return "index-unreadable", "is damaged (its parts disagree on what it holds)"
    if factory is not None:
        try:
            model = VectorIndex.build(index.d, factory)  # held while its structure is looked at
        except EngineError:  # a type this FAISS cannot build: nothing to compare with
            pass
        else:
            if not _same_kind(_structure(index), _structure(model._index)):
                inner = index.index if native is None else index
                return "index-foreign", f"is a {type(faiss.downcast_index(inner)).__name__}, not the library's index " \
                                        f"type {factory!r}"
    ids = _held_ids(index)
    if len(ids) != index.ntotal:
        return "index-unreadable", "is damaged (its parts disagree on what it holds)"
    ordered = np.sort(ids)  # sorting finds repeats in 6 ms at 1M ids, np.unique took 400
    if len(ids) and (ordered[0] < 0 or bool((ordered[1:] == ordered[:-1]).any())):
        return "index-duplicates", "holds duplicate or negative row ids"
    return None
