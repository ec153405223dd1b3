"""What a running service holds: the library's encoder and index as one immutable snapshot, and
the search operations the API exposes.

Consistency: a request takes the current ``Snapshot`` once and uses only it: the encoder that
embeds an upload and the index it is searched in always belong together. A reload (an ingest
elsewhere bumped the library's generation; ``engine reindex --model`` switched the library to
another encoder) builds a complete new snapshot off to the side, loading the new encoder only when
the library's model identity differs from the loaded one, then replaces the snapshot reference in
one assignment; requests already running finish on the old one. So no request ever sees an index
half-way between two states, nor vectors of one model compared with those of another. Vectors
read from the database at request time (search by id, refine, an upload of indexed bytes) are
checked against the snapshot's embeddings epoch.

Ranking: every search goes through ``engine.expansion.rank_expanded`` with the library's query
expansion setting, as ``engine query`` does (and so through ``engine.filters.rank_hits`` and its
exact re-ranking): the service ranks exactly as the in-process search. The setting is read when the
service opens and again on every watcher tick, so a change is picked up within about a second.

Threads: decoding and the encoder run on ``infer``, a pool of ``ServiceConfig.inference_workers()``
threads with ``torch_threads()`` torch threads each (together no more than the cores); the index,
the database and reloads run on the caller's thread (the app's thread pool); a new encoder is
built on an inference thread. Every thread that embeds or searches first gets that many OpenMP
threads too (``pin_threads``): OpenMP's thread count is per thread, so a request thread would
otherwise search with a team as wide as the machine.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence, TypeVar

import numpy as np

from engine.errors import IndexMissingError
from engine.loader import hash_bytes
from engine.query import Comparison, Hit
from engine.service.errors import NotFound, Unavailable, Unprocessable
from engine.service.feedback import rocchio
from engine.service.settings import ServiceConfig
from engine.service.thumbnails import ThumbnailCache
from engine.service.uploads import decode_upload

if TYPE_CHECKING:
    from pathlib import Path

    from db.store import ImageRecord
    from engine.encoder import Encoder
    from engine.expansion import Expansion
    from engine.filters import HitFilter
    from engine.index import VectorIndex
    from engine.library import Library

log = logging.getLogger(__name__)

T = TypeVar("T")
INFER_PREFIX = "engine-infer"
RELOAD_TRIES = 3


def pin_threads(count: int) -> None:
    """Give the calling thread ``count`` intra-op threads for torch and for FAISS.

    OpenMP keeps its thread count per thread: ``torch.set_num_threads`` in ``SearchState.open``
    sets it for the calling thread, and torch sets it again in another thread only once that
    thread runs a parallel torch operation; until then (and for ever in a request thread that
    only searches) FAISS got a team of one thread per core. Its spinning members fought the
    inference workers and the event loop for the cores (measured on 2 busy cores: the 80-image
    search 0.16 ms on a pinned thread, 25 ms unpinned). Checking costs about a microsecond."""
    import faiss

    if faiss.omp_get_max_threads() == count:
        return
    import torch

    torch.set_num_threads(count)
    faiss.omp_set_num_threads(count)


def limit_blas_threads(count: int) -> Any:
    """Limit every BLAS library loaded (numpy's OpenBLAS, FAISS's) to ``count`` threads, process
    wide, with threadpoolctl; returns its controller (``restore_original_limits()`` undoes it).

    By default each uses one thread per core, and on a busy machine a small product spends its
    time spinning for the second thread: the 80 x 1280 shortlist products of query expansion took
    100 ms with two threads and 0.09 ms with one on the 2-core development machine (load 10)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=count, user_api="blas")


class StaleSnapshot(Unavailable):
    """Vectors read from the database belong to another encoder than the request's snapshot (a
    model switch committed meanwhile). ``SearchState.consistent`` reloads and retries once."""


@dataclass(frozen=True)
class Model:
    """An encoder and what embedding an upload through it needs: ``transform`` (PIL image ->
    float32 tensor [3, H, W]), the decoder's draft size, the calibrated threshold, its identity."""

    encoder: Encoder
    identity: str
    transform: Callable[[Any], Any]
    draft_size: int | None
    threshold: float | None

    @classmethod
    def of(cls, encoder: Encoder) -> Model:
        from engine.preprocess import build_transform, draft_size_for

        return cls(encoder, encoder.identity(), build_transform(encoder.data_config),
                   draft_size_for(encoder.data_config), encoder.decision_threshold)

    @property
    def dim(self) -> int:
        return self.encoder.dim


class SizeFilter:
    """The byte sizes of the files a snapshot's library indexed, so that an upload whose size no
    indexed file has skips the content-hash lookup (a hash and a database query, ~0.3 ms). Filled
    once, off the request path (by the reload that made the snapshot, or the next watcher tick);
    until then ``may_hold`` says True and the lookup is done. Sizes read after the snapshot was
    taken: a superset of its files' sizes, less those removed since (no longer indexed)."""

    def __init__(self) -> None:
        self._sizes: np.ndarray | None = None

    @property
    def ready(self) -> bool:
        return self._sizes is not None

    def fill(self, library: Library) -> None:
        sizes = np.unique(np.fromiter((size for _, size, _ in library.store.file_stats()), np.int64))
        self._sizes = sizes  # one reference assignment: readers see None or the whole array

    def may_hold(self, size: int) -> bool:
        sizes = self._sizes
        if sizes is None:
            return True
        at = int(np.searchsorted(sizes, size))
        return at < len(sizes) and int(sizes[at]) == size


@dataclass(frozen=True)
class Snapshot:
    """One consistent state of the library: ``index`` reflects at least database ``generation``
    and holds vectors of ``model`` (embeddings ``epoch``); ``images`` is the number of vectors it
    holds. Never mutated after it is built."""

    model: Model
    index: VectorIndex
    generation: int
    epoch: int
    images: int
    loaded_at: float
    sizes: SizeFilter

    @property
    def dim(self) -> int:
        return self.model.dim


@dataclass(frozen=True)
class Ranking:
    """The hits of one search, best first, and the snapshot that produced them."""

    hits: list[Hit]
    snapshot: Snapshot


class SearchState:
    """The service's library and its (encoder, index) snapshot. ``open()`` loads them (blocking);
    ``close()`` stops the inference threads and restores torch's thread count."""

    def __init__(self, library: Library, config: ServiceConfig = ServiceConfig()):
        self.library = library
        self.config = config
        self.instance = secrets.token_hex(8)
        self.thumbnails = ThumbnailCache(library.paths.home / "thumbnails")
        self.infer: ThreadPoolExecutor | None = None
        self._snapshot: Snapshot | None = None
        self._expansion: Expansion | None = None
        self._reload_lock = threading.Lock()
        self._torch_threads: int | None = None
        self._blas_limits: Any = None

    # -- lifecycle -----------------------------------------------------------------------------
    def open(self) -> None:
        """Load the encoder and the index once. Raises IndexMissingError for a library that was
        never set up (nothing ingested)."""
        import torch

        if not self.library.exists():
            raise IndexMissingError(f"no library in {self.library.paths.home} yet; run `engine ingest PATH` first")
        self._torch_threads = torch.get_num_threads()
        torch.set_num_threads(self.config.torch_threads())
        self._blas_limits = limit_blas_threads(self.config.torch_threads())
        self.infer = ThreadPoolExecutor(self.config.inference_workers(), thread_name_prefix=INFER_PREFIX)
        self._snapshot = self._load_snapshot(None)
        self._snapshot.sizes.fill(self.library)
        self.read_expansion()

    def close(self) -> None:
        if self.infer is not None:
            self.infer.shutdown(wait=True, cancel_futures=True)
            self.infer = None
        if self._torch_threads is not None:
            import torch

            torch.set_num_threads(self._torch_threads)
            self._torch_threads = None
        if self._blas_limits is not None:
            self._blas_limits.restore_original_limits()
            self._blas_limits = None
        self.library.close()

    @property
    def snapshot(self) -> Snapshot:
        if self._snapshot is None:
            raise IndexMissingError("the service has not loaded its library yet")
        return self._snapshot

    @property
    def encoder(self) -> Encoder:
        return self.snapshot.model.encoder

    @property
    def expansion(self) -> Expansion:
        """The query expansion every search uses: the library's setting (``library_expansion``)."""
        if self._expansion is None:
            return self.read_expansion()
        return self._expansion

    def read_expansion(self) -> Expansion:
        """Read the library's query expansion setting again (a database read); raises EngineError
        for a bad ``$ENGINE_EXPAND``, as ``engine query`` does."""
        from engine.expansion import library_expansion

        self._expansion = library_expansion(self.library)
        return self._expansion

    @property
    def dim(self) -> int:
        return self.snapshot.dim

    def _load_model(self) -> Model:
        """The library's current encoder, read again from its home. Built on an inference thread,
        so that torch's OpenMP threads exist only for those: a second team on another thread makes
        libgomp throttle every team (measured: a single query 12 ms -> 20 ms on 2 cores)."""
        def build() -> Model:
            self.library.forget_encoder()
            return Model.of(self.library.encoder())

        if self.infer is None or threading.current_thread().name.startswith(INFER_PREFIX):
            return build()
        return self.infer.submit(build).result()

    def _load_snapshot(self, current: Snapshot | None) -> Snapshot:
        """A complete new snapshot: the loaded model kept when the library's model identity is
        still its own, else the new encoder loaded; then the index. Retried when a model switch
        commits while it loads, so that model, index and epoch always belong together."""
        store = self.library.store
        model = current.model if current is not None else None
        for _ in range(RELOAD_TRIES):
            info = self.library.model_info()
            if info is None:
                raise IndexMissingError(f"no library in {self.library.paths.home} yet; run `engine ingest PATH` first")
            if model is None or model.identity != info.identity:
                model = self._load_model()
                log.info("encoder loaded: %s (%s)", model.identity, info.spec)
            generation, epoch = store.generation(), store.embeddings_epoch()  # read first: the index holds at least this
            index = self.library.open_index(required=False)
            if index is None:
                raise IndexMissingError(f"no index in {self.library.paths.home} yet; run `engine ingest PATH` first")
            after = self.library.model_info()
            if store.embeddings_epoch() == epoch and after is not None and after.identity == model.identity \
                    and index.dim == model.dim:
                return Snapshot(model, index, generation, epoch, index.ntotal, time.time(), SizeFilter())
            model = None if after is None or after.identity != model.identity else model
        raise Unavailable("the library's encoder kept changing while the service reloaded it; try again")

    def refresh(self, *, fill_sizes: bool = True) -> bool:
        """Reload when the library's generation moved on (an ingest, a removal, a model switch);
        True when a new snapshot was installed. Concurrent callers wait for one reload, not several.
        fill_sizes: then also fill the snapshot's SizeFilter (a scan of the file table; the
        watcher does it, a request that has to reload does not). Reads the library's query
        expansion setting again too."""
        self.read_expansion()
        current = self.snapshot
        if self.library.store.generation() == current.generation:
            if fill_sizes and not current.sizes.ready:
                current.sizes.fill(self.library)
            return False
        with self._reload_lock:
            if self._snapshot is not current:  # another caller reloaded while we waited
                return True
            fresh = self._load_snapshot(current)
            self._snapshot = fresh  # one reference assignment: requests see old or new, never between
        log.info("index reloaded: generation %d, %d images", fresh.generation, fresh.images)
        if fill_sizes:
            fresh.sizes.fill(self.library)
        return True

    def consistent(self, fn: Callable[[Snapshot], T]) -> T:
        """``fn(snapshot)`` on the current snapshot; when it finds the database's vectors newer than
        that snapshot (StaleSnapshot: a model switch), once more on a reloaded one. Blocking: not
        on an inference thread when a new encoder may have to be loaded."""
        try:
            return fn(self.snapshot)
        except StaleSnapshot:
            self.refresh(fill_sizes=False)
            return fn(self.snapshot)

    # -- vectors -------------------------------------------------------------------------------
    def _check_epoch(self, snapshot: Snapshot) -> None:
        """Raise StaleSnapshot when the stored vectors just read may not be ``snapshot``'s: the
        epoch only grows, so an unchanged epoch read after them means no switch came between."""
        if self.library.store.embeddings_epoch() != snapshot.epoch:
            raise StaleSnapshot("the library switched to another encoder during this request; try again")

    def stored_vectors(self, ids: Sequence[int], snapshot: Snapshot | None = None) -> np.ndarray:
        """Stored vectors float32 [len(ids), D] in the order of ``ids``, made by ``snapshot``'s
        encoder (default: the current one). Raises NotFound naming the ids the library does not
        hold, StaleSnapshot when the library switched encoders since ``snapshot``."""
        snapshot = snapshot or self.snapshot
        wanted = [int(i) for i in ids]
        if not wanted:
            return np.zeros((0, snapshot.dim), np.float32)
        got_ids, vectors = self.library.store.get_embeddings(wanted, snapshot.dim)
        self._check_epoch(snapshot)
        rows = {int(i): v for i, v in zip(got_ids, vectors)}
        unknown = [i for i in wanted if i not in rows]
        if unknown:
            raise NotFound(f"no indexed image with id {', '.join(map(str, unknown))}")
        return np.stack([rows[i] for i in wanted])

    def indexed_match(self, data: bytes, snapshot: Snapshot | None = None) -> tuple[int, np.ndarray] | None:
        """(id, stored vector float32 [D]) of the indexed image whose file has exactly these bytes,
        else None (an indexed photo searched by upload costs no decode, as ``engine query`` on it).
        None too when that vector is not of ``snapshot``'s encoder: the caller then embeds the bytes."""
        snapshot = snapshot or self.snapshot
        if not snapshot.sizes.may_hold(len(data)):  # no indexed file has this size: skip hash and query
            return None
        found = self.library.store.lookup_hashes([hash_bytes(data)])
        if not found:
            return None
        got_ids, vectors = self.library.store.get_embeddings(list(found.values()), snapshot.dim)
        if not len(got_ids) or self.library.store.embeddings_epoch() != snapshot.epoch:
            return None
        return int(got_ids[0]), vectors[0]

    def embed_uploads(self, uploads: Sequence[tuple[str, bytes]], snapshot: Snapshot | None = None) -> np.ndarray:
        """Decode and embed uploads ``(field, bytes)`` as one batch with ``snapshot``'s encoder:
        float32 [N, D]. Blocking: run it on ``infer``. Raises a ServiceError for the first upload
        that does not decode."""
        import torch

        pin_threads(self.config.torch_threads())
        model = (snapshot or self.snapshot).model
        tensors = [model.transform(decode_upload(data, field, model.draft_size)) for field, data in uploads]
        return model.encoder.embed(torch.stack(tensors))

    def query_vector(self, data: bytes, field: str = "image",
                     snapshot: Snapshot | None = None) -> tuple[np.ndarray, int | None]:
        """The vector float32 [D] of an uploaded image in ``snapshot``'s terms, and the id of the
        indexed image with the same bytes (None when there is none): the stored vector when the
        library indexed the same bytes, else embedded now. Blocking: run it on ``infer``."""
        snapshot = snapshot or self.snapshot
        match = self.indexed_match(data, snapshot)
        if match is not None:
            return match[1], match[0]
        return self.embed_uploads([(field, data)], snapshot)[0], None

    # -- searches ------------------------------------------------------------------------------
    def resolve_threshold(self, threshold: float | str | None, snapshot: Snapshot | None = None) -> float | None:
        """None, a distance, or ``"model"``: the encoder's calibrated threshold (else the default)."""
        if threshold is None:
            return None
        if threshold == "model":
            return (snapshot or self.snapshot).model.threshold
        try:
            value = float(threshold)
        except ValueError:
            raise Unprocessable(f"threshold must be a number or 'model', not {threshold!r}") from None
        if not np.isfinite(value):
            raise Unprocessable("threshold must be finite")
        return value

    def search_vector(self, vector: np.ndarray, k: int, *, threshold: float | None = None,
                      exclude: Sequence[int] = (), own: Sequence[int] | None = None,
                      hit_filter: HitFilter | None = None, snapshot: Snapshot | None = None) -> Ranking:
        """The ``k`` best indexed images for ``vector`` (float32 [D], of ``snapshot``'s encoder)
        in ``snapshot`` (default: the current one) that pass ``hit_filter``, ranked as ``engine
        query`` ranks them (``rank_expanded`` with the library's expansion: the k best that pass,
        none lost to the filter), leaving out ``exclude`` ids and images removed since the
        snapshot was taken. own: the ids of the query's own file, which never expand it (default:
        ``exclude``)."""
        from engine.expansion import rank_expanded
        from engine.filters import NO_FILTER

        pin_threads(self.config.torch_threads())
        snapshot = snapshot or self.snapshot
        hits = rank_expanded(self.library.store, snapshot.index, np.asarray(vector, np.float32)[None, :], k,
                             self.expansion, hit_filter=hit_filter or NO_FILTER, exclude=[exclude],
                             own=None if own is None else [own], label_threshold=threshold)[0]
        return Ranking(hits, snapshot)

    def own_ids(self, paths: Sequence[str]) -> list[int]:
        """The ids of the indexed images recorded at any of ``paths`` (``exclude_path``). A
        database lookup only: a path from a request is never resolved on this machine's disk
        (the client sends the real path beside the given one)."""
        known = self.library.store.lookup_paths(sorted(set(paths)))
        return sorted({state.image_id for state in known.values()})

    def upload_own_ids(self, paths: Sequence[str], indexed_id: int | None) -> list[int] | None:
        """The ids of an upload's own file, which never expand its query (None when the library
        does not expand queries: nothing to look up). With ``paths`` (the client's query file, as
        ``engine query`` sends it) those indexed at any of them, looked up as ``engine query``
        looks up its query file; else the indexed image with the upload's bytes, if any."""
        if not self.expansion.enabled:
            return None
        if paths:
            return self.own_ids(paths)
        return [] if indexed_id is None else [indexed_id]

    def refine(self, positive: Sequence[int], negative: Sequence[int], query: np.ndarray | None,
               k: int, snapshot: Snapshot | None = None) -> tuple[Ranking, np.ndarray]:
        """Rocchio feedback in ``snapshot``: the ranking of the refined query (``negative`` ids
        left out) and that query vector float32 [D]."""
        snapshot = snapshot or self.snapshot
        vector = rocchio(query, self.stored_vectors(positive, snapshot), self.stored_vectors(negative, snapshot))
        return self.search_vector(vector, k, exclude=negative, snapshot=snapshot), vector

    def compare(self, a: bytes, b: bytes, threshold: float | None) -> Comparison:
        """Distance and verdict of two uploads, embedded together as ``engine compare`` embeds
        two files, judged by the same snapshot's threshold. Blocking: run it on ``infer``."""
        snapshot = self.snapshot
        va, vb = self.embed_uploads([("a", a), ("b", b)], snapshot)
        distance = float(np.sqrt(max(0.0, float(np.sum((va - vb) ** 2)))))
        limit = snapshot.model.threshold if threshold is None else threshold
        assert limit is not None
        return Comparison("a", "b", distance, float(limit), distance <= limit)

    # -- records and files ---------------------------------------------------------------------
    def record(self, image_id: int) -> ImageRecord:
        found = self.library.store.get_images([image_id]).get(int(image_id))
        if found is None:
            raise NotFound(f"no indexed image with id {image_id}")
        return found

    def aliases(self, image_id: int) -> list[str]:
        return self.library.store.aliases_of([image_id]).get(int(image_id), [])

    def thumbnail(self, image_id: int, size: int) -> Path:
        """The cached JPEG thumbnail of an indexed image (made from its indexed file on first use).
        Blocking: run it on ``infer``."""
        cached = self.thumbnails.path_for(image_id, size)
        if cached.exists():
            return cached
        record = self.record(image_id)
        return self.thumbnails.get(image_id, size, [record.path, *self.aliases(image_id)])

    def describe(self) -> dict[str, Any]:
        """What ``engine info --json`` prints."""
        from engine.info import describe_library

        return describe_library(self.library)
