"""What a running service holds: the library's encoder and an immutable snapshot of its index,
and the search operations the API exposes.

Consistency: a request takes the current ``Snapshot`` once and uses only it. A reload (an ingest
elsewhere bumped the library's generation) builds a complete new index off to the side, then
replaces the snapshot reference in one assignment; requests already running finish on the old
one. So no request ever sees an index half-way between two states.

Threads: decoding and the encoder run on ``infer``, a pool of ``ServiceConfig.inference_workers()``
threads with ``torch_threads()`` torch threads each (together no more than the cores); the index,
the database and reloads run on the caller's thread (the app's thread pool).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from engine.errors import IndexMissingError
from engine.loader import hash_bytes
from engine.query import Comparison, Hit
from engine.service.errors import NotFound, Unprocessable
from engine.service.feedback import rocchio
from engine.service.settings import ServiceConfig
from engine.service.thumbnails import ThumbnailCache
from engine.service.uploads import decode_upload

if TYPE_CHECKING:
    from pathlib import Path

    from db.store import ImageRecord
    from engine.encoder import Encoder
    from engine.filters import HitFilter
    from engine.index import VectorIndex
    from engine.library import Library

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Snapshot:
    """One consistent state of the library: ``index`` reflects at least database ``generation``;
    ``images`` is the number of vectors it holds. Never mutated after it is built."""

    index: VectorIndex
    generation: int
    images: int
    loaded_at: float


@dataclass(frozen=True)
class Ranking:
    """The hits of one search, best first, and the snapshot that produced them."""

    hits: list[Hit]
    snapshot: Snapshot


class SearchState:
    """The service's library, encoder and index snapshot. ``open()`` loads them (blocking);
    ``close()`` stops the inference threads and restores torch's thread count."""

    def __init__(self, library: Library, config: ServiceConfig = ServiceConfig()):
        self.library = library
        self.config = config
        self.instance = secrets.token_hex(8)
        self.thumbnails = ThumbnailCache(library.paths.home / "thumbnails")
        self.infer: ThreadPoolExecutor | None = None
        self._encoder: Encoder | None = None
        self._transform: Callable[[Any], Any] | None = None
        self._draft_size: int | None = None
        self._threshold: float | None = None
        self._snapshot: Snapshot | None = None
        self._reload_lock = threading.Lock()
        self._torch_threads: int | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    def open(self) -> None:
        """Load the encoder and the index once. Raises IndexMissingError for a library that was
        never set up (nothing ingested)."""
        import torch

        from engine.preprocess import build_transform, draft_size_for

        if not self.library.exists():
            raise IndexMissingError(f"no library in {self.library.paths.home} yet; run `engine ingest PATH` first")
        self._torch_threads = torch.get_num_threads()
        torch.set_num_threads(self.config.torch_threads())
        self.infer = ThreadPoolExecutor(self.config.inference_workers(), thread_name_prefix="engine-infer")
        # Built on an inference thread, so that torch's OpenMP threads exist only for those: a
        # second team on the main thread makes libgomp throttle every team (measured: a single
        # query 12 ms -> 20 ms on 2 cores).
        encoder = self.infer.submit(self.library.encoder).result()
        self._encoder = encoder
        self._transform = build_transform(encoder.data_config)
        self._draft_size = draft_size_for(encoder.data_config)
        self._threshold = encoder.decision_threshold
        self._snapshot = self._load_snapshot()

    def close(self) -> None:
        if self.infer is not None:
            self.infer.shutdown(wait=True, cancel_futures=True)
            self.infer = None
        if self._torch_threads is not None:
            import torch

            torch.set_num_threads(self._torch_threads)
            self._torch_threads = None
        self.library.close()

    @property
    def snapshot(self) -> Snapshot:
        if self._snapshot is None:
            raise IndexMissingError("the service has not loaded its library yet")
        return self._snapshot

    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            raise IndexMissingError("the service has not loaded its encoder yet")
        return self._encoder

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def _load_snapshot(self) -> Snapshot:
        store = self.library.store
        generation = store.generation()  # read first: the index opened next holds at least this
        index = self.library.open_index(required=False)
        if index is None:
            raise IndexMissingError(f"no index in {self.library.paths.home} yet; run `engine ingest PATH` first")
        return Snapshot(index, generation, index.ntotal, time.time())

    def refresh(self) -> bool:
        """Reload the index when the library's generation moved on (an ingest, a removal); True
        when a new snapshot was installed. Concurrent callers wait for one reload, not several."""
        current = self.snapshot
        if self.library.store.generation() == current.generation:
            return False
        with self._reload_lock:
            if self._snapshot is not current:  # another caller reloaded while we waited
                return True
            fresh = self._load_snapshot()
            self._snapshot = fresh  # one reference assignment: requests see old or new, never between
        log.info("index reloaded: generation %d, %d images", fresh.generation, fresh.images)
        return True

    # -- vectors -------------------------------------------------------------------------------
    def stored_vectors(self, ids: Sequence[int]) -> np.ndarray:
        """Stored vectors float32 [len(ids), D] in the order of ``ids``. Raises NotFound naming
        the ids the library does not hold."""
        wanted = [int(i) for i in ids]
        got_ids, vectors = self.library.store.get_embeddings(wanted, self.dim)
        rows = {int(i): v for i, v in zip(got_ids, vectors)}
        unknown = [i for i in wanted if i not in rows]
        if unknown:
            raise NotFound(f"no indexed image with id {', '.join(map(str, unknown))}")
        return np.stack([rows[i] for i in wanted]) if wanted else np.zeros((0, self.dim), np.float32)

    def indexed_vector(self, data: bytes) -> np.ndarray | None:
        """The stored vector float32 [D] of an indexed file with exactly these bytes, else None
        (an indexed photo searched by upload costs no decode, as ``engine query`` on it)."""
        found = self.library.store.lookup_hashes([hash_bytes(data)])
        if not found:
            return None
        got_ids, vectors = self.library.store.get_embeddings(list(found.values()), self.dim)
        return vectors[0] if len(got_ids) else None

    def embed_uploads(self, uploads: Sequence[tuple[str, bytes]]) -> np.ndarray:
        """Decode and embed uploads ``(field, bytes)`` as one batch: float32 [N, D]. Blocking: run
        it on ``infer``. Raises a ServiceError for the first upload that does not decode."""
        import torch

        assert self._transform is not None
        tensors = [self._transform(decode_upload(data, field, self._draft_size)) for field, data in uploads]
        return self.encoder.embed(torch.stack(tensors))

    def query_vector(self, data: bytes, field: str = "image") -> np.ndarray:
        """The vector float32 [D] of an uploaded image: the stored one when the library indexed
        the same bytes, else embedded now. Blocking: run it on ``infer``."""
        stored = self.indexed_vector(data)
        if stored is not None:
            return stored
        return self.embed_uploads([(field, data)])[0]

    # -- searches ------------------------------------------------------------------------------
    def resolve_threshold(self, threshold: float | str | None) -> float | None:
        """None, a distance, or ``"model"``: the encoder's calibrated threshold (else the default)."""
        if threshold is None:
            return None
        if threshold == "model":
            return self._threshold
        try:
            value = float(threshold)
        except ValueError:
            raise Unprocessable(f"threshold must be a number or 'model', not {threshold!r}") from None
        if not np.isfinite(value):
            raise Unprocessable("threshold must be finite")
        return value

    def search_vector(self, vector: np.ndarray, k: int, *, threshold: float | None = None,
                      exclude: Sequence[int] = (), hit_filter: HitFilter | None = None) -> Ranking:
        """The ``k`` nearest indexed images to ``vector`` (float32 [D]) in the current snapshot that
        pass ``hit_filter`` (engine.filters: the k best that pass, none lost to the filter),
        leaving out ``exclude`` ids and images removed since the snapshot was taken."""
        from engine.filters import NO_FILTER, rank_hits

        snapshot = self.snapshot
        hits = rank_hits(self.library.store, snapshot.index, np.asarray(vector, np.float32)[None, :], k,
                         hit_filter=hit_filter or NO_FILTER, exclude=[exclude], label_threshold=threshold)[0]
        return Ranking(hits, snapshot)

    def own_ids(self, paths: Sequence[str]) -> list[int]:
        """The ids of the indexed images recorded at any of ``paths`` (``exclude_path``). A
        database lookup only: a path from a request is never resolved on this machine's disk
        (the client sends the real path beside the given one)."""
        known = self.library.store.lookup_paths(sorted(set(paths)))
        return sorted({state.image_id for state in known.values()})

    def refine(self, positive: Sequence[int], negative: Sequence[int], query: np.ndarray | None,
               k: int) -> tuple[Ranking, np.ndarray]:
        """Rocchio feedback: the ranking of the refined query (``negative`` ids left out) and that
        query vector float32 [D]."""
        vector = rocchio(query, self.stored_vectors(positive), self.stored_vectors(negative))
        return self.search_vector(vector, k, exclude=negative), vector

    def compare(self, a: bytes, b: bytes, threshold: float | None) -> Comparison:
        """Distance and verdict of two uploads, embedded together as ``engine compare`` embeds
        two files. Blocking: run it on ``infer``."""
        va, vb = self.embed_uploads([("a", a), ("b", b)])
        distance = float(np.sqrt(max(0.0, float(np.sum((va - vb) ** 2)))))
        limit = self._threshold if threshold is None else threshold
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
