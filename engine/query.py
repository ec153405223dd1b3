"""Queries against a library, and pair comparison.

engine.embedding (and with it torch) is imported only where a query image has to be decoded:
querying files that are already indexed needs the stored vectors and the index, not the model.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from engine.errors import EngineError, ImageError, IndexMissingError
from engine.files import find_images
from engine.preprocess import image_suffixes

if TYPE_CHECKING:
    from db.store import ImageRecord
    from engine.filters import HitFilter
    from engine.progress import ProgressFn
    from engine.encoder import Encoder
    from engine.library import Library
    from engine.scripted import ScriptedEncoder


def score_to_distance(score: float) -> float:
    """Cosine similarity of unit vectors -> their L2 distance (0 = identical, 2 = opposite)."""
    return math.sqrt(max(0.0, 2.0 - 2.0 * float(score)))


@dataclass(frozen=True)
class Hit:
    """One neighbour: rank from 1, its row id, path, cosine score and L2 distance, its database
    record, (when a threshold was given) whether the distance counts as similar, and the paths of
    byte-identical copies of it (aliases)."""

    rank: int
    id: int
    path: str
    score: float
    distance: float
    record: ImageRecord
    similar: bool | None = None
    aliases: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out = {"rank": self.rank, "id": self.id, "path": self.path, "score": round(self.score, 6),
               "distance": round(self.distance, 6)}
        if self.similar is not None:
            out["similar"] = self.similar
        rec = self.record.to_dict()
        for key in ("width", "height", "format", "bytes", "taken_at", "camera"):
            out[key] = rec[key]
        out["aliases"] = list(self.aliases)
        return out


@dataclass(frozen=True)
class QueryResult:
    """The hits of one query image, best first, or the error that stopped it."""

    query: str
    hits: list[Hit] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"query": self.query, "hits": [h.to_dict() for h in self.hits]}
        if self.error:
            out["error"] = self.error
        return out


def check_k(k: object) -> int:
    """``k`` as a neighbour count: a whole number >= 1 (an int, or a float or string holding one
    exactly); anything else raises EngineError saying why."""
    if isinstance(k, bool):
        raise EngineError(f"k must be a whole number of neighbours, not {k!r}")
    if isinstance(k, int):
        value = k
    else:
        try:
            value = int(str(k).strip()) if isinstance(k, str) else int(k)  # type: ignore[call-overload]
        except (TypeError, ValueError, OverflowError):
            raise EngineError(f"k must be a whole number of neighbours, not {k!r}") from None
        if isinstance(k, float) and value != k:
            raise EngineError(f"k must be a whole number of neighbours, not {k!r}")
    if value < 1:
        raise EngineError(f"k must be at least 1 (got {value})")
    return value


def check_threshold(threshold: object) -> float:
    """``threshold`` as an L2 distance: a finite number >= 0; anything else (NaN, infinity, a
    negative number, text) raises EngineError saying why."""
    try:
        value = float(threshold)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise EngineError(f"threshold must be a number (an L2 distance), not {threshold!r}") from None
    if not math.isfinite(value):
        raise EngineError(f"threshold must be a finite L2 distance, not {threshold!r}")
    if value < 0:
        raise EngineError(f"threshold is an L2 distance, never negative (got {value:g})")
    return value


def _stored_vectors(library: Library, paths: Sequence[str], dim: int) -> dict[str, np.ndarray]:
    """Vectors (float32 [D] each) of query paths that are already indexed and unchanged on disk
    (no decode needed), by path."""
    known = library.store.lookup_paths(paths)
    ids: dict[int, list[str]] = {}
    for path, state in known.items():
        try:
            st = os.stat(path)
        except OSError:
            continue
        if st.st_size == state.bytes and st.st_mtime == state.mtime:
            ids.setdefault(state.image_id, []).append(path)
    if not ids:
        return {}
    got_ids, vectors = library.store.get_embeddings(list(ids), dim)
    return {p: v for i, v in zip(got_ids, vectors) for p in ids[int(i)]}


def embed_queries(library: Library, paths: Sequence[str], *, batch_size: int = 32,
                  progress: ProgressFn | None = None) -> tuple[np.ndarray, list[str | None]]:
    """Query vectors float32 [Q, D] in the order of ``paths`` (a zero row where decoding failed),
    and per query the error text or None. Indexed, unchanged files reuse their stored vector.
    progress(done, total): files embedded, reported only when more than a batch must be.
    Nothing of the model is imported or loaded when every query is indexed; a few files go through
    the library's TorchScript copy of its encoder when it has one (``Library.query_encoder``)."""
    info = library.model_info()
    if info is None:
        raise IndexMissingError(f"no index in {library.paths.home} yet; run `engine ingest PATH` first")
    dim = info.dim
    stored = _stored_vectors(library, paths, dim)
    todo = [p for p in paths if p not in stored]
    vectors = np.zeros((len(paths), dim), np.float32)
    errors: list[str | None] = [None] * len(paths)
    fresh: dict[str, np.ndarray] = {}
    failed: dict[str, str] = {}
    if todo:
        from engine.embedding import embed_files

        many = len(todo) > batch_size
        if many and progress:
            progress(0, len(todo))
        done = embed_files(library.query_encoder(len(todo)), todo, batch_size=batch_size, workers=None if many else 0,
                           progress=progress if many else None)
        fresh = {todo[int(pos)]: vec for pos, vec in zip(done.positions, done.embeddings)}
        failed = dict(done.failures)
    for i, p in enumerate(paths):
        if p in stored:
            vectors[i] = stored[p]
        elif p in fresh:
            vectors[i] = fresh[p]
        else:
            errors[i] = failed.get(p, "cannot decode image")
    return vectors, errors


def search_library(library: Library, images: Sequence[str | os.PathLike], k: int = 10, *,
                   threshold: float | None = None, batch_size: int = 32, hit_filter: HitFilter | None = None,
                   exclude_self: bool = False, progress: ProgressFn | None = None,
                   expand: int | None = None) -> list[QueryResult]:
    """Rank the library's images by similarity to each query image.

    images: files or folders; folders are walked exactly as ingest walks them
    (engine.files.find_images: image suffixes, hidden entries skipped). Returns one QueryResult per
    query image, in walk order, after one per given path that does not exist; an unreadable or
    missing query carries its error instead of hits. With ``threshold`` (an L2 distance), each hit
    says whether it counts as similar.

    ``k`` is capped at the number of indexed vectors (asking for more costs nothing more: each
    result then holds every image). threshold: a finite L2 distance >= 0.

    hit_filter (engine.filters.HitFilter): keep only hits within a distance, a capture-time range,
    a camera or folders; the k best that pass come back (the search goes deeper, nothing is lost
    to the filter). exclude_self: leave out each query's own file (the indexed image its path, or
    its real path, is recorded as, with its byte-identical copies). expand: query expansion with
    this many stored neighbours (engine.expansion; 0 = off); None = the library's setting. The
    query's own file never expands it.

    Raises IndexMissingError when nothing is indexed (without creating the library folder),
    EngineError when ``k`` is not a whole number >= 1, ``threshold`` is not a finite distance,
    or the given folders hold no image at all.
    """
    k = check_k(k)
    if threshold is not None:
        threshold = check_threshold(threshold)
    if not library.exists():
        raise IndexMissingError(f"no index in {library.paths.home} yet; run `engine ingest PATH` first")
    found = find_images(images, image_suffixes())
    missing = [QueryResult(path, error=reason) for path, reason in found.missing]
    if not found.files and not missing:
        raise EngineError("no image files under " + ", ".join(os.fspath(p) for p in images))
    if not found.files:
        return missing
    index = library.open_index()
    paths = found.files
    vectors, errors = embed_queries(library, paths, batch_size=batch_size, progress=progress)
    ok = [i for i, e in enumerate(errors) if e is None]
    results: list[QueryResult | None] = [None] * len(paths)
    for i, e in enumerate(errors):
        if e is not None:
            results[i] = QueryResult(paths[i], error=e)
    if ok:
        from engine.expansion import library_expansion, rank_expanded
        from engine.filters import HitFilter

        expansion = library_expansion(library)
        if expand is not None:
            expansion = replace(expansion, n=expand)
        own = _own_ids(library, [paths[i] for i in ok]) if exclude_self or expansion.enabled else None
        ranked = rank_expanded(library.store, index, vectors[ok], min(k, max(1, index.ntotal)), expansion,
                               hit_filter=hit_filter or HitFilter(), exclude=own if exclude_self else None,
                               own=own, label_threshold=threshold)
        for i, hits in zip(ok, ranked):
            results[i] = QueryResult(paths[i], hits)
    return missing + [r for r in results if r is not None]


def _own_ids(library: Library, paths: Sequence[str]) -> list[set[int]]:
    """Per query path, the ids of the indexed images recorded at that path or its real path."""
    real = {p: os.path.realpath(p) for p in paths}
    known = library.store.lookup_paths(sorted(set(paths) | set(real.values())))
    return [{known[q].image_id for q in (p, real[p]) if q in known} for p in paths]


@dataclass(frozen=True)
class Comparison:
    """Verdict on a pair: L2 distance of the two embeddings against the threshold."""

    a: str
    b: str
    distance: float
    threshold: float
    similar: bool

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "distance": round(self.distance, 6), "threshold": round(self.threshold, 6),
                "verdict": "similar" if self.similar else "different"}


def compare_images(encoder: Encoder | ScriptedEncoder, a: str, b: str, *, threshold: float | None = None) -> Comparison:
    """Embed ``a`` and ``b`` with ``encoder`` and judge them by ``threshold`` (default: the
    encoder's calibrated one, else the pretrained default). Raises ImageError for an unreadable file."""
    from engine.embedding import embed_files

    if threshold is not None:
        threshold = check_threshold(threshold)
    done = embed_files(encoder, [a, b], workers=0)
    if done.failures:
        path, reason = done.failures[0]
        raise ImageError(f"{path}: {reason}")
    va, vb = done.embeddings
    distance = float(np.sqrt(max(0.0, float(np.sum((va - vb) ** 2)))))
    if threshold is None:
        threshold = encoder.decision_threshold
    return Comparison(a, b, distance, float(threshold), distance <= threshold)
