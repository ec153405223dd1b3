"""Filtered ranking: the k best hits that pass a filter, without losing any to it.

A filter on what ingest already extracted (capture time, camera, folder) is turned into the set of
image ids that pass it, by one SQL query. A Flat index (the default) then searches among those
ids only, which is exact. Other index types cannot filter inside their search without losing
hits, so the search goes deeper instead (first as deep as the filter's share of the library
suggests, then four times deeper each round) until k hits pass, the distance limit is crossed, or
the whole index was searched. Hits excluded by id (the query's own file) and images removed since
the index was read are skipped the same way. An index with compressed scores (IVF-PQ and the like)
has its candidates re-scored exactly from the stored vectors (``engine.rerank``), so every score,
distance and distance limit here is exact. ``engine query`` and the service's search use this.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Collection, Sequence

import numpy as np

from engine.errors import EngineError
from engine.query import Hit, score_to_distance
from engine.rerank import search_exact

if TYPE_CHECKING:
    from db.store import ImageRecord, MetadataStore
    from engine.index import VectorIndex


@dataclass(frozen=True)
class HitFilter:
    """Which hits a search keeps (every field given must pass).

    max_distance: L2 distance at most this (a hit further away is dropped, never relabelled).
    taken_after / taken_before: capture time (EXIF) at or after / strictly before; a photo
        without a capture time passes neither.
    camera: text the camera make or model contains, case-insensitive.
    under: folders (made absolute) the hit's file, or one of its byte-identical copies, lies in.
    """

    max_distance: float | None = None
    taken_after: datetime | None = None
    taken_before: datetime | None = None
    camera: str | None = None
    under: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_distance is not None and (not math.isfinite(self.max_distance) or self.max_distance < 0):
            raise EngineError(f"the distance limit must be a finite number >= 0, not {self.max_distance!r}")
        if self.taken_after and self.taken_before and self.taken_after >= self.taken_before:
            raise EngineError(f"--taken-after {self.taken_after:%Y-%m-%d %H:%M} is not before --taken-before "
                              f"{self.taken_before:%Y-%m-%d %H:%M}: no photo can pass both")
        object.__setattr__(self, "camera", (self.camera or "").strip() or None)
        object.__setattr__(self, "under", tuple(os.path.abspath(os.path.expanduser(os.fspath(u))) for u in self.under))

    @property
    def on_metadata(self) -> bool:
        """True when a filter on the database's facts (time, camera, folder) is set."""
        return bool(self.taken_after or self.taken_before or self.camera or self.under)

    def to_query(self) -> dict[str, Any]:
        """The filter as the service's search query parameters (only those set)."""
        out: dict[str, Any] = {}
        if self.max_distance is not None:
            out["max_distance"] = repr(float(self.max_distance))
        if self.taken_after:
            out["taken_after"] = self.taken_after.isoformat()
        if self.taken_before:
            out["taken_before"] = self.taken_before.isoformat()
        if self.camera:
            out["camera"] = self.camera
        if self.under:
            out["under"] = list(self.under)
        return out


NO_FILTER = HitFilter()


def allowed_ids(store: MetadataStore, hit_filter: HitFilter) -> np.ndarray | None:
    """Ids (int64, ascending) passing the filter's metadata part; None when it has none."""
    if not hit_filter.on_metadata:
        return None
    return store.ids_matching(taken_after=hit_filter.taken_after, taken_before=hit_filter.taken_before,
                              camera=hit_filter.camera, under=hit_filter.under)


def rank_hits(store: MetadataStore, index: VectorIndex, vectors: np.ndarray, k: int, *,
              hit_filter: HitFilter = NO_FILTER, exclude: Sequence[Collection[int]] | None = None,
              label_threshold: float | None = None) -> list[list[Hit]]:
    """The best ``k`` hits per query vector (float32 [Q, D]) that pass ``hit_filter`` and are not
    in that query's ``exclude`` ids, best first, ranked from 1, each with its record and its
    byte-identical aliases. label_threshold: mark each hit similar when its distance is at most
    this. Fewer than k hits come back only when fewer pass (or lie within the distance limit)."""
    n_queries = len(vectors)
    excluded = [frozenset(int(i) for i in e) for e in exclude] if exclude is not None else [frozenset()] * n_queries
    allowed = allowed_ids(store, hit_filter)
    total = index.ntotal
    if total == 0 or n_queries == 0 or (allowed is not None and allowed.size == 0):
        return [[] for _ in range(n_queries)]
    extra = max((len(e) for e in excluded), default=0)
    depth = min(total, k + extra)
    exact = allowed is not None and index.filters_exactly
    if allowed is not None and not exact:  # as deep as the filter's share of the library suggests
        depth = min(total, max(depth, math.ceil(depth * total / allowed.size)))
    limit = allowed.size if exact else total
    chosen: list[list[tuple[int, float]] | None] = [None] * n_queries
    records: dict[int, ImageRecord] = {}
    pending = list(range(n_queries))
    while pending:
        sub = vectors[pending]
        scores, ids = index.search_among(sub, depth, allowed) if exact else search_exact(store, index, sub, depth)
        keep = _candidates(scores, ids, [excluded[q] for q in pending], None if exact else allowed,
                           hit_filter.max_distance)
        wanted = {i for row in keep for i, _ in row[0]} - records.keys()
        records.update(store.get_images(wanted))
        still = []
        for q, (row, stopped) in zip(pending, keep):
            found = [(i, s) for i, s in row if i in records][:k]
            if len(found) >= k or stopped or depth >= limit:
                chosen[q] = found
            else:
                still.append(q)
        pending = still
        depth = min(limit, depth * 4)
    aliases = store.aliases_of({i for row in chosen if row for i, _ in row})
    out: list[list[Hit]] = []
    for row in chosen:
        hits = []
        for rank, (image_id, score) in enumerate(row or [], start=1):
            dist = score_to_distance(score)
            record = records[image_id]
            hits.append(Hit(rank, image_id, record.path, score, dist, record,
                            None if label_threshold is None else dist <= label_threshold,
                            tuple(sorted(aliases.get(image_id, [])))))
        out.append(hits)
    return out


def _candidates(scores: np.ndarray, ids: np.ndarray, excluded: Sequence[frozenset[int]],
                allowed: np.ndarray | None, max_distance: float | None
                ) -> list[tuple[list[tuple[int, float]], bool]]:
    """Per row: the (id, score) pairs that pass in rank order, and whether the row is complete
    (the results ran out, or the distance limit was crossed, so no deeper search can add one)."""
    passes = ids >= 0
    if allowed is not None:
        passes &= np.isin(ids, allowed)
    out = []
    for r in range(len(ids)):
        stopped = bool((ids[r] < 0).any())
        row = []
        for image_id, score, ok in zip(ids[r].tolist(), scores[r].tolist(), passes[r].tolist()):
            if max_distance is not None and score_to_distance(score) > max_distance:
                stopped = True
                break
            if ok and image_id not in excluded[r]:
                row.append((image_id, float(score)))
        out.append((row, stopped))
    return out
