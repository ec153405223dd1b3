"""Query expansion on stored vectors: alpha-QE and database-side augmentation (Radenović, Tolias and
Chum, "Fine-tuning CNN image retrieval with no human annotation", 2018).

alpha-QE replaces a query q (a unit vector) by

    q' = normalise(q + sum over its n nearest stored vectors x_i of  max(q . x_i, 0) ** alpha * x_i)

and searches again with q'. The neighbours' own weights fall fast with alpha (0.7 ** 3 = 0.34), so
a wrong neighbour that is only fairly close pulls little. Database-side augmentation (DBA) does the
same to database vectors, each with its own n nearest (itself left out). Done to the whole gallery
it would have to be redone on every ingest, so the engine does it inside the shortlist: the best
``SHORTLIST_DEPTH`` hits of q' are augmented among themselves and re-ranked by q'
(``augment_shortlists``; ``rank_expanded`` in a library, ``ShortlistRescorer`` in ``engine eval``).
``augment_database`` (the whole gallery) is kept for the benchmark that compares the two.

Nothing is decoded: the neighbours' vectors are the ones the library stores. ``engine query`` and
``engine eval`` take ``--expand N``; a library keeps its own default (``library_expansion``,
``save_library_expansion``), which the service's search uses too (``rank_expanded``).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Collection, Sequence

import numpy as np

from engine.errors import EngineError

if TYPE_CHECKING:
    from db.store import MetadataStore
    from engine.filters import HitFilter
    from engine.index import VectorIndex
    from engine.library import Library
    from engine.query import Hit

log = logging.getLogger(__name__)

# The key of a library's own setting in its database's meta table.
SETTING_KEY = "query_expansion"
# Set to a whole number: the neighbours every library expands queries with, whatever it saved.
EXPAND_ENV = "ENGINE_EXPAND"
# Queries expanded per block: bounds the [block, n, D] gather of neighbour vectors.
_BLOCK = 1024
# The hits of the expanded query that are augmented among themselves and re-ranked (at least k).
SHORTLIST_DEPTH = 100


@dataclass(frozen=True)
class Expansion:
    """How queries are expanded. n: nearest stored vectors added to the query (0: no expansion);
    alpha: the power of their cosine similarity that weighs each (0: a plain average)."""

    n: int = 0
    alpha: float = 3.0

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, (int, np.integer)) or self.n < 0:
            raise EngineError(f"query expansion takes a whole number of neighbours >= 0, not {self.n!r}")
        try:
            alpha = float(self.alpha)
        except (TypeError, ValueError):
            raise EngineError(f"the expansion weight alpha must be a number, not {self.alpha!r}") from None
        if not math.isfinite(alpha) or alpha < 0:
            raise EngineError(f"the expansion weight alpha must be a finite number >= 0, not {self.alpha!r}")
        object.__setattr__(self, "n", int(self.n))
        object.__setattr__(self, "alpha", alpha)

    @property
    def enabled(self) -> bool:
        return self.n > 0

    def to_dict(self) -> dict[str, float]:
        return {"n": self.n, "alpha": self.alpha}

    def describe(self) -> str:
        return f"alpha-QE n={self.n} alpha={self.alpha:g}" if self.enabled else "off"


# What a library does when nothing was set, measured on photos, faces and characters of classes no
# lever saw (README, "Quality"; DBA inside the shortlist, as the engine ranks): n=1, alpha=3 raised
# MAP@R on all three (caltech101-dev held-out classes +0.021, all 50 classes +0.051, orl-faces
# +0.078, omniglot +0.031) and lowered neither Recall@1 nor 20-way one-shot accuracy anywhere.
# n=2 and n=3 gain more MAP@R on photos but lose Recall@1 on faces (n=3 also on characters, and
# one-shot accuracy there: an episode holds one image per class, so a second neighbour is always
# of another class); alpha=1 loses Recall@1 on characters.
DEFAULT_EXPANSION = Expansion(n=1, alpha=3.0)
NO_EXPANSION = Expansion()


# --------------------------------------------------------------------------------------------------
# the arithmetic


def _normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


def expand_from(queries: np.ndarray, gallery: np.ndarray, neighbour_ids: np.ndarray, alpha: float) -> np.ndarray:
    """alpha-QE of each query with the gallery rows it names.

    queries float32 [Q, D] and gallery float32 [N, D], unit rows; neighbour_ids int64 [Q, n] indexes
    into gallery (-1: no neighbour, weight 0). Returns float32 [Q, D], unit rows. Each weight is
    max(cosine, 0) ** alpha, computed here from the vectors themselves.
    """
    queries = np.asarray(queries, np.float32)
    out = np.empty_like(queries)
    ids = np.asarray(neighbour_ids, np.int64).reshape(len(queries), -1)
    for start in range(0, len(queries), _BLOCK):
        q = queries[start:start + _BLOCK]
        block = ids[start:start + _BLOCK]
        found = block >= 0
        neighbours = gallery[np.where(found, block, 0)]  # [b, n, D]
        cosine = np.einsum("bd,bnd->bn", q, neighbours)
        weights = np.where(found, np.clip(cosine, 0.0, None) ** alpha, 0.0).astype(np.float32)
        out[start:start + _BLOCK] = q + np.einsum("bn,bnd->bd", weights, neighbours)
    return _normalise(out)


def expand_queries(queries: np.ndarray, gallery: np.ndarray, expansion: Expansion, *,
                   leave_out_self: bool = False) -> np.ndarray:
    """alpha-QE of queries float32 [Q, D] with their ``expansion.n`` nearest gallery rows (float32
    [N, D], unit rows; exact search). leave_out_self: the queries are the gallery (leave-one-out),
    and row q never takes itself. Returns float32 [Q, D], unit rows (the queries themselves when
    expansion is off)."""
    if not expansion.enabled:
        return np.asarray(queries, np.float32)
    from engine.metrics import knn

    n = min(expansion.n, len(gallery) - (1 if leave_out_self else 0))
    if n < 1:
        return np.asarray(queries, np.float32)
    _, ids = knn(queries, gallery, n, exclude_self=leave_out_self)
    return expand_from(queries, gallery, ids, expansion.alpha)


def augment_database(gallery: np.ndarray, expansion: Expansion) -> np.ndarray:
    """Database-side augmentation: every row of gallery float32 [N, D] expanded with its own
    ``expansion.n`` nearest other rows. Returns float32 [N, D], unit rows."""
    return expand_queries(gallery, gallery, expansion, leave_out_self=True)


def augment_shortlists(shortlists: np.ndarray, expansion: Expansion) -> np.ndarray:
    """Database-side augmentation inside each shortlist: shortlists float32 [Q, M, D] (unit rows;
    rows of zeros pad a shorter list) -> float32 [Q, M, D], each row expanded with its n nearest
    other rows of the same shortlist (unit rows; zero rows stay zero)."""
    q, m, _ = shortlists.shape
    n = min(expansion.n, m - 1)
    if n < 1:
        return shortlists.astype(np.float32)
    shortlists = np.ascontiguousarray(shortlists, np.float32)
    # contiguous operands: numpy hands stacked matmuls to BLAS only then (a transposed view is ~100x slower)
    cosine = shortlists @ np.ascontiguousarray(shortlists.transpose(0, 2, 1))  # [Q, M, M]
    cosine[:, np.arange(m), np.arange(m)] = -np.inf
    nearest = np.argpartition(-cosine, n - 1, axis=2)[:, :, :n]  # [Q, M, n], any order
    weights = np.zeros((q, m, m), np.float32)  # row i: the weights of i's neighbours, zero elsewhere
    np.put_along_axis(weights, nearest, np.clip(np.take_along_axis(cosine, nearest, axis=2), 0.0, None)
                      ** expansion.alpha, axis=2)
    out = shortlists + weights @ shortlists
    norms = np.linalg.norm(out, axis=2, keepdims=True)
    return np.where(norms > 0, out / np.maximum(norms, 1e-12), 0.0).astype(np.float32)


class ShortlistRescorer:
    """What ``engine eval --expand`` ranks by, as ``engine query --expand`` does: the top
    ``depth`` gallery items of each expanded query, re-scored against that query after
    augmentation inside the shortlist (``augment_shortlists``), ahead of every other item.

    Called by engine.metrics on each block of similarities (float32 [c, N], expanded queries of
    rows ``start..start+c`` against the gallery, the query's own column already -inf) and changes
    it in place: shortlisted items get 3 + their new score (above any cosine), the rest keep theirs.
    """

    def __init__(self, queries: np.ndarray, gallery: np.ndarray, expansion: Expansion, depth: int):
        self.queries = np.asarray(queries, np.float32)
        self.gallery = np.asarray(gallery, np.float32)
        self.expansion = expansion
        self.depth = depth

    def __call__(self, sims: np.ndarray, start: int) -> None:
        m = min(self.depth, sims.shape[1])
        if not self.expansion.enabled or m < 2:
            return
        for lo in range(0, len(sims), 64):  # bounds the [64, M, M] and [64, M, n, D] blocks
            block = sims[lo:lo + 64]
            short = np.argpartition(-block, m - 1, axis=1)[:, :m]
            usable = np.isfinite(np.take_along_axis(block, short, axis=1))  # the query itself is not
            lists = np.where(usable[..., None], self.gallery[short], 0.0).astype(np.float32)
            augmented = augment_shortlists(lists, self.expansion)
            rows = self.queries[start + lo:start + lo + len(block)]
            scores = np.einsum("qd,qmd->qm", rows, augmented) + 3.0
            np.put_along_axis(block, short, np.where(usable, scores, -np.inf).astype(block.dtype), axis=1)


# --------------------------------------------------------------------------------------------------
# a library's setting


def library_expansion(library: Library) -> Expansion:
    """The expansion ``library`` queries with: its saved setting, else ``DEFAULT_EXPANSION``, with
    ``n`` from ``$ENGINE_EXPAND`` when that is set. A saved setting that does not parse (the database
    is read as untrusted input) is ignored with a warning. Raises EngineError for a bad
    ``$ENGINE_EXPAND``."""
    raw = library.store.get_meta(SETTING_KEY) if library.exists() else None
    expansion = DEFAULT_EXPANSION
    if raw is not None:
        try:
            expansion = Expansion(n=raw["n"], alpha=raw["alpha"])
        except (EngineError, KeyError, TypeError, IndexError):
            log.warning("ignoring the library's query expansion setting %.80r: not {n, alpha}", raw)
    forced = os.environ.get(EXPAND_ENV, "").strip()
    if forced:
        if not forced.isdigit():
            raise EngineError(f"${EXPAND_ENV} must be a whole number of neighbours >= 0, not {forced!r}")
        expansion = replace(expansion, n=int(forced))
    return expansion


def save_library_expansion(library: Library, expansion: Expansion) -> None:
    """Make ``expansion`` the library's default for every later query (``engine query``, the
    service). Raises ReadOnlyError for a library opened read-only, IndexMissingError for none."""
    from engine.errors import IndexMissingError

    library.require_writable()
    if not library.exists():
        raise IndexMissingError(f"no library in {library.paths.home} yet; run `engine ingest PATH` first")
    library.store.set_meta(SETTING_KEY, expansion.to_dict())


# --------------------------------------------------------------------------------------------------
# expanded search in a library


def expand_in_index(store: MetadataStore, index: VectorIndex, vectors: np.ndarray, expansion: Expansion, *,
                    exclude: Sequence[Collection[int]] | None = None) -> np.ndarray:
    """alpha-QE of query vectors float32 [Q, D] with their n nearest indexed images, each query's
    ``exclude`` ids (its own file) left out. The neighbours' vectors and weights come from the
    stored embeddings, so an approximate index only chooses them. Returns float32 [Q, D] unit rows."""
    if not expansion.enabled or index.ntotal == 0 or len(vectors) == 0:
        return np.asarray(vectors, np.float32)
    excluded = [set(int(i) for i in e) for e in exclude] if exclude is not None else [set()] * len(vectors)
    depth = min(index.ntotal, expansion.n + max((len(e) for e in excluded), default=0))
    _, found = index.search(np.ascontiguousarray(vectors, np.float32), depth)
    chosen = [[int(i) for i in row if i >= 0 and int(i) not in excluded[q]][:expansion.n]
              for q, row in enumerate(found)]
    wanted = sorted({i for row in chosen for i in row})
    stored_ids, stored = store.get_embeddings(wanted, vectors.shape[1]) if wanted else ([], None)
    position = {int(i): p for p, i in enumerate(stored_ids)}  # rows removed since the search are missing
    ids = np.full((len(vectors), expansion.n), -1, np.int64)
    for q, row in enumerate(chosen):
        kept = [position[i] for i in row if i in position]
        ids[q, :len(kept)] = kept
    if stored is None or len(position) == 0:
        return np.asarray(vectors, np.float32)
    return expand_from(vectors, np.asarray(stored, np.float32), ids, expansion.alpha)


def rank_expanded(store: MetadataStore, index: VectorIndex, vectors: np.ndarray, k: int, expansion: Expansion, *,
                  hit_filter: HitFilter | None = None, exclude: Sequence[Collection[int]] | None = None,
                  own: Sequence[Collection[int]] | None = None,
                  label_threshold: float | None = None) -> list[list[Hit]]:
    """``engine.filters.rank_hits`` with expansion: each query vector (float32 [Q, D]) is expanded
    (``expand_in_index``), its best ``max(k, SHORTLIST_DEPTH)`` hits that pass the filter are
    augmented among themselves (``augment_shortlists``) and re-ranked by the expanded query; the
    best k come back. ``engine eval --expand`` measures exactly this (``ShortlistRescorer``).

    Each hit's score and distance are those of the query itself (from the stored vectors), so
    ``label_threshold`` and a distance limit keep their meaning, the distance between the two
    images: with a distance limit the shortlist is the images within it, nearest first.
    own: per query, the ids of its own file, which never expand it (default: ``exclude``); it may
    still be a hit unless ``exclude`` says otherwise.
    """
    from engine.filters import NO_FILTER, rank_hits

    hit_filter = hit_filter or NO_FILTER
    if not expansion.enabled:
        return rank_hits(store, index, vectors, k, hit_filter=hit_filter, exclude=exclude,
                         label_threshold=label_threshold)
    vectors = np.asarray(vectors, np.float32)
    expanded = expand_in_index(store, index, vectors, expansion, exclude=own if own is not None else exclude)
    depth = max(k, SHORTLIST_DEPTH)
    by_distance = hit_filter.max_distance is not None
    shortlists = rank_hits(store, index, vectors if by_distance else expanded, depth, hit_filter=hit_filter,
                           exclude=exclude)
    return [_rerank(store, vectors[q], expanded[q], hits, k, expansion, label_threshold)
            for q, hits in enumerate(shortlists)]


_BLAS: list = []  # the threadpoolctl controller, made on first use (it scans the loaded libraries)


def _one_blas_thread() -> Any:
    """A context in which BLAS runs on one thread. A query's products are small (100 x 1280), and
    right after a FAISS search BLAS's own threads wait on FAISS's still-spinning OpenMP threads:
    measured on 2 cores, 57 ms per query with the default threads, under 1 ms with one."""
    from threadpoolctl import ThreadpoolController

    if not _BLAS:
        _BLAS.append(ThreadpoolController())
    return _BLAS[0].limit(limits=1, user_api="blas")


def _rerank(store: MetadataStore, query: np.ndarray, expanded: np.ndarray, shortlist: list[Hit], k: int,
            expansion: Expansion, label_threshold: float | None) -> list[Hit]:
    """The best k of ``shortlist`` by the expanded query float32 [D] after augmentation inside the
    shortlist, re-scored against the plain query float32 [D] and ranked from 1 again."""
    from engine.query import score_to_distance

    if not shortlist:
        return []
    ids, stored = store.get_embeddings([h.id for h in shortlist], len(query))
    by_id = {int(i): v for i, v in zip(ids, stored)}
    kept = [h for h in shortlist if h.id in by_id]  # an image removed in between is no hit
    if not kept:
        return []
    lists = np.stack([by_id[h.id] for h in kept]).astype(np.float32)[None]
    with _one_blas_thread():
        scores = augment_shortlists(lists, expansion)[0] @ expanded
    order = sorted(range(len(kept)), key=lambda n: (-float(scores[n]), n))
    out = []
    for rank, n in enumerate(order[:k], start=1):
        score = float(by_id[kept[n].id] @ query)
        distance = score_to_distance(score)
        similar = None if label_threshold is None else distance <= label_threshold
        out.append(replace(kept[n], rank=rank, score=score, distance=distance, similar=similar))
    return out
