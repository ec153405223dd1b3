"""Retrieval and verification metrics over embeddings (numpy and faiss only).

Two families:

* retrieval: every query ranks a gallery by cosine similarity (inner product of unit vectors) and is
  scored against the class labels: recall@K, precision@K, R-precision, MAP@R and full-ranking AP.
* verification: pairs of images get a distance and a 0/1 "same class" label; the rule "similar iff
  distance <= threshold" is scored with ROC AUC, equal error rate, accuracy, precision, recall, F1.

Ranking ties (equal similarity) are broken by gallery position, lowest first, so every figure is
deterministic; "map" alone follows scikit-learn's average precision and scores tied items as one
group. Queries whose class has no other item in the gallery (R = 0) cannot be scored and are left
out of every retrieval average.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable, Sequence

import numpy as np

from engine.errors import DataError

log = logging.getLogger(__name__)

# Elements of a [chunk, N] similarity block handled at once: with the packed sort keys, the labels
# and the running counts this bounds the working set to a few hundred MB whatever N is.
_BLOCK_ELEMENTS = 1 << 22

# rescore(sims float32 [c, N], start): re-ranks a block of query rows in place (see _score_queries).
Rescore = Callable[[np.ndarray, int], None]


# --------------------------------------------------------------------------------------------------
# input checks


def _as_embeddings(x, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise DataError(f"{name} must be a 2-D array [N, D], got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise DataError(f"{name} is empty: nothing to evaluate")
    if arr.shape[1] == 0:
        raise DataError(f"{name} has zero dimensions")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise DataError(f"{name} holds NaN or infinite values")
    return arr


def _as_labels(y, n: int, name: str) -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise DataError(f"{name} must be a 1-D array of {n} labels, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.issubdtype(arr.dtype, np.floating) or not np.all(arr == np.round(arr)):
            raise DataError(f"{name} must hold integer class labels")
    return arr.astype(np.int64)


def _as_ks(ks: Iterable[int]) -> tuple[int, ...]:
    out = tuple(int(k) for k in ks)
    if not out or any(k < 1 for k in out):
        raise DataError(f"ks must be positive integers, got {out}")
    return out


def _check_dims(a: np.ndarray, b: np.ndarray, an: str, bn: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise DataError(f"{an} has {a.shape[1]} dimensions but {bn} has {b.shape[1]}")


# --------------------------------------------------------------------------------------------------
# nearest neighbours


def knn(queries: np.ndarray, gallery: np.ndarray, k: int, *, exclude_self: bool = False,
        chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Top-k gallery items by inner product (cosine similarity for unit vectors), exact, via faiss.

    queries: float32 [Q, D]; gallery: float32 [N, D]; k >= 1.
    exclude_self: queries is the gallery (Q == N) and row q must not return item q. One extra
        neighbour is searched and the column holding q is dropped; when q is not among them (more
        than k exact duplicates of q) the last column goes instead, so the answer is still k items.
    chunk: queries searched per faiss call, which bounds the [chunk, k] result buffers.

    Returns (scores float32 [Q, k], ids int64 [Q, k]) best first. Columns beyond the gallery size
    are padded with score -inf and id -1. Raises DataError for empty or mismatched input.
    """
    import faiss

    queries = _as_embeddings(queries, "queries")
    gallery = _as_embeddings(gallery, "gallery")
    _check_dims(queries, gallery, "queries", "gallery")
    k = int(k)
    if k < 1:
        raise DataError(f"k must be at least 1, got {k}")
    n_query, n_gallery = queries.shape[0], gallery.shape[0]
    if exclude_self and n_query != n_gallery:
        raise DataError(f"exclude_self needs queries to be the gallery, got {n_query} queries and {n_gallery} items")
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(gallery)
    available = n_gallery - 1 if exclude_self else n_gallery
    search_k = min(k + 1 if exclude_self else k, n_gallery)
    keep = min(k, available)
    scores = np.full((n_query, k), -np.inf, dtype=np.float32)
    ids = np.full((n_query, k), -1, dtype=np.int64)
    step = max(1, int(chunk))
    for start in range(0, n_query, step):
        stop = min(start + step, n_query)
        d, i = index.search(queries[start:stop], search_k)
        if exclude_self:
            if keep == 0:
                continue
            drop = i == np.arange(start, stop, dtype=np.int64)[:, None]
            missing = ~drop.any(axis=1)
            drop[missing, -1] = True
            d = d[~drop].reshape(stop - start, keep)
            i = i[~drop].reshape(stop - start, keep)
        scores[start:stop, :keep] = d[:, :keep]
        ids[start:stop, :keep] = i[:, :keep]
    return scores, ids


# --------------------------------------------------------------------------------------------------
# retrieval


def _rank(sims: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row of sims float32 [c, N] by descending score, ties by ascending position.

    Returns (order int64 [c, N], keys int64 [c, N]) where keys are order-preserving integer images
    of the sorted scores (equal keys = equal scores). Each score's bits and its column are packed into
    one int64 so a plain sort of distinct keys does what a stable argsort would, several times faster.
    """
    negated = -sims + np.float32(0.0)  # + 0.0 turns -0.0 into 0.0, so the two tie as they should
    bits = negated.view(np.int32)
    # Flipping the magnitude bits of negative floats makes signed-integer order equal float order.
    keys = bits ^ ((bits >> 31) & np.int32(0x7FFFFFFF))
    packed = (keys.astype(np.int64) << 32) | np.arange(sims.shape[1], dtype=np.int64)
    packed.sort(axis=1)
    return packed & 0xFFFFFFFF, packed >> 32


def _tied_average_precision(relevant: np.ndarray, keys: np.ndarray, hits: np.ndarray,
                            n_relevant: np.ndarray) -> np.ndarray:
    """scikit-learn AP per row: tied scores enter the ranking together, so each relevant item is
    credited with the precision at the end of its tie group. relevant bool [c, M] in ranked order;
    keys int64 [c, M] equal where scores tie; hits int [c, M] the running count of relevant items;
    n_relevant int [c] (> 0). Returns float64 [c]."""
    c, m = relevant.shape
    ranks = np.arange(1, m + 1)
    ap = (hits / ranks * relevant).sum(axis=1) / n_relevant
    tied_next = keys[:, 1:] == keys[:, :-1]
    rows = np.flatnonzero(tied_next.any(axis=1))
    if rows.size == 0:
        return ap
    # Only rows with ties need the group ends: the smallest group-closing position at or after each.
    last_of_group = np.ones((rows.size, m), dtype=bool)
    last_of_group[:, :-1] = ~tied_next[rows]
    end = np.where(last_of_group, np.arange(m), m)
    end = np.minimum.accumulate(end[:, ::-1], axis=1)[:, ::-1]
    precision_at_end = np.take_along_axis(hits[rows], end, axis=1) / (end + 1.0)
    ap[rows] = (precision_at_end * relevant[rows]).sum(axis=1) / n_relevant[rows]
    return ap


def _score_queries(query_emb: np.ndarray, query_labels: np.ndarray, gallery_emb: np.ndarray,
                   gallery_labels: np.ndarray, ks: tuple[int, ...],
                   self_index: np.ndarray | None, rescore: Rescore | None = None) -> dict[str, np.ndarray]:
    """Per-query figures. self_index int64 [Q]: the gallery item each query must skip (LOO), or None.
    rescore(sims, start): changes a block of similarities (float32 [c, N], query rows start..start+c)
    in place before ranking (engine.expansion.ShortlistRescorer).

    Returns float64 arrays [Q] keyed like the summary plus "relevant" (R) and "top1" (label of the
    best hit, -1 without one); rows with R = 0 hold NaN.
    """
    n_query, n_gallery = query_emb.shape[0], gallery_emb.shape[0]
    length = n_gallery - 1 if self_index is not None else n_gallery
    out = {f"recall@{k}": np.full(n_query, np.nan) for k in ks}
    out.update({f"precision@{k}": np.full(n_query, np.nan) for k in ks})
    for key in ("map@r", "map", "r_precision"):
        out[key] = np.full(n_query, np.nan)
    out["relevant"] = np.zeros(n_query)
    out["top1"] = np.full(n_query, -1.0)
    if length == 0:
        return out
    step = max(1, _BLOCK_ELEMENTS // n_gallery)
    for start in range(0, n_query, step):
        stop = min(start + step, n_query)
        sims = query_emb[start:stop] @ gallery_emb.T
        if self_index is not None:
            # -inf sorts last, and the ranking is cut one short, so the query never sees itself.
            sims[np.arange(stop - start), self_index[start:stop]] = -np.inf
        if rescore is not None:
            rescore(sims, start)
        order, keys = _rank(sims)
        order, keys = order[:, :length], keys[:, :length]
        relevant = gallery_labels[order] == query_labels[start:stop, None]
        n_rel = relevant.sum(axis=1)
        rows = slice(start, stop)
        out["relevant"][rows] = n_rel
        out["top1"][rows] = gallery_labels[order[:, 0]]
        ok = n_rel > 0
        if not ok.any():
            continue
        if ok.all():
            rel, kk, r, idx = relevant, keys, n_rel, np.arange(start, stop)
        else:
            rel, kk, r, idx = relevant[ok], keys[ok], n_rel[ok], np.arange(start, stop)[ok]
        hits = np.cumsum(rel, axis=1)
        for k in ks:
            within = hits[:, min(k, length) - 1]
            out[f"recall@{k}"][idx] = within > 0
            out[f"precision@{k}"][idx] = within / k
        out["r_precision"][idx] = hits[np.arange(len(r)), r - 1] / r
        # MAP@R only looks at the first R places, so the columns past the largest R can be skipped.
        top = int(r.max())
        ranks = np.arange(1, top + 1)
        first_r = ranks[None, :] <= r[:, None]
        out["map@r"][idx] = ((hits[:, :top] / ranks) * rel[:, :top] * first_r).sum(axis=1) / r
        out["map"][idx] = _tied_average_precision(rel, kk, hits, r)
    return out


def _summarise(per_query: dict[str, np.ndarray], ks: tuple[int, ...]) -> dict[str, float]:
    used = per_query["relevant"] > 0
    n_used = int(used.sum())
    if n_used == 0:
        raise DataError("no query has another image of its class in the gallery: "
                        "every class needs at least two images")
    summary: dict[str, float] = {}
    for k in ks:
        summary[f"recall@{k}"] = float(per_query[f"recall@{k}"][used].mean())
    for k in ks:
        summary[f"precision@{k}"] = float(per_query[f"precision@{k}"][used].mean())
    for key in ("map@r", "map", "r_precision"):
        summary[key] = float(per_query[key][used].mean())
    summary["queries"] = n_used
    return summary


def _loo_per_query(embeddings, labels, ks, queries_mask, query_vectors=None,
                   rescore=None) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    emb = _as_embeddings(embeddings, "embeddings")
    searched = emb if query_vectors is None else _as_embeddings(query_vectors, "query vectors")
    if searched.shape != emb.shape:
        raise DataError(f"query vectors must be shaped like the embeddings {emb.shape}, got {searched.shape}")
    lab = _as_labels(labels, emb.shape[0], "labels")
    ks = _as_ks(ks)
    if queries_mask is None:
        query_index = np.arange(emb.shape[0], dtype=np.int64)
    else:
        mask = np.asarray(queries_mask, dtype=bool)
        if mask.shape != (emb.shape[0],):
            raise DataError(f"queries_mask must be a bool array of {emb.shape[0]} entries, got shape {mask.shape}")
        query_index = np.flatnonzero(mask).astype(np.int64)
        if query_index.size == 0:
            raise DataError("queries_mask selects no query")
    if rescore is not None and queries_mask is not None:
        raise DataError("rescore works on every query (no queries_mask)")
    per_query = _score_queries(searched[query_index], lab[query_index], emb, lab, ks, query_index, rescore)
    return per_query, lab[query_index], query_index


def retrieval_metrics(embeddings: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5, 10), *,
                      queries_mask: np.ndarray | None = None, query_vectors: np.ndarray | None = None,
                      rescore: Rescore | None = None) -> dict[str, float]:
    """Leave-one-out retrieval: each image queries all the others.

    embeddings: float32 [N, D] (unit rows for cosine); labels: int64 [N]; ks: cut-offs K.
    queries_mask: bool [N] choosing which images act as queries (all stay in the gallery).
    query_vectors: float32 [N, D], what image i searches with in place of its embedding (an
        expanded query, engine.expansion); it still skips itself and is scored by its label.
    rescore: re-ranks each block of similarities in place (see ``_score_queries``).

    Returns, averaged over the queries that have R > 0 other images of their class:
      "recall@K"     share of queries with at least one same-class item in the top K;
      "precision@K"  mean of (same-class items in the top K) / K, K the denominator even when the
                     gallery holds fewer than K items;
      "r_precision"  mean of (same-class items in the top R) / R;
      "map@r"        MAP@R (Musgrave et al. 2020): (1/R) * sum over i <= R of precision@i * rel(i);
      "map"          mean average precision over the full ranking, scikit-learn style (ties grouped);
      "queries"      how many queries were averaged.
    Raises DataError on empty or malformed input or when no query has R > 0.
    """
    per_query, _, _ = _loo_per_query(embeddings, labels, ks, queries_mask, query_vectors, rescore)
    return _summarise(per_query, _as_ks(ks))


def retrieval_metrics_split(query_emb: np.ndarray, query_labels: np.ndarray, gallery_emb: np.ndarray,
                            gallery_labels: np.ndarray, ks: Sequence[int] = (1, 5, 10), *,
                            rescore: Rescore | None = None) -> dict[str, float]:
    """``retrieval_metrics`` for separate sets: query_emb float32 [Q, D] with query_labels int64 [Q]
    rank gallery_emb float32 [N, D] with gallery_labels int64 [N]; R counts the gallery items of the
    query's class. Same keys; queries with R = 0 are left out."""
    q, ql, g, gl, ks = _split_inputs(query_emb, query_labels, gallery_emb, gallery_labels, ks)
    return _summarise(_score_queries(q, ql, g, gl, ks, None, rescore), ks)


def _split_inputs(query_emb, query_labels, gallery_emb, gallery_labels, ks):
    q = _as_embeddings(query_emb, "query embeddings")
    g = _as_embeddings(gallery_emb, "gallery embeddings")
    _check_dims(q, g, "query embeddings", "gallery embeddings")
    ql = _as_labels(query_labels, q.shape[0], "query labels")
    gl = _as_labels(gallery_labels, g.shape[0], "gallery labels")
    return q, ql, g, gl, _as_ks(ks)


def _class_rows(per_query: dict[str, np.ndarray], query_labels: np.ndarray, all_labels: np.ndarray,
                class_names: Sequence[str] | None) -> list[dict]:
    rows = []
    for label in np.unique(all_labels):
        mine = query_labels == label
        used = mine & (per_query["relevant"] > 0)
        name = class_names[label] if class_names is not None and 0 <= label < len(class_names) else str(label)
        row = {
            "class": str(name),
            "label": int(label),
            "images": int((all_labels == label).sum()),
            "queries": int(used.sum()),
            "recall@1": float(per_query["recall@1"][used].mean()) if used.any() else None,
            "map@r": float(per_query["map@r"][used].mean()) if used.any() else None,
        }
        # The class most often mistaken for this one says more than the score alone.
        wrong = per_query["top1"][mine & (per_query["top1"] != label) & (per_query["top1"] >= 0)].astype(np.int64)
        if wrong.size:
            confused = int(np.bincount(wrong).argmax())
            row["confused_with"] = (str(class_names[confused]) if class_names is not None
                                    and confused < len(class_names) else str(confused))
        else:
            row["confused_with"] = None
        rows.append(row)
    # Worst first; classes that could not be scored go last.
    rows.sort(key=lambda r: (r["map@r"] is None, r["map@r"] or 0.0, r["recall@1"] or 0.0, r["class"]))
    return rows


def per_class_metrics(embeddings: np.ndarray, labels: np.ndarray, class_names: Sequence[str] | None = None, *,
                      queries_mask: np.ndarray | None = None, query_vectors: np.ndarray | None = None,
                      rescore: Rescore | None = None) -> list[dict]:
    """Leave-one-out recall@1 and MAP@R per class, worst first.

    embeddings float32 [N, D]; labels int64 [N]; class_names indexed by label (else the label).
    Returns rows {"class", "label", "images", "queries", "recall@1", "map@r", "confused_with"} sorted
    by map@r then recall@1 ascending; a class with one image has queries 0, None scores and comes
    last. "confused_with" is the class most often ranked first for this class's wrong queries.
    """
    per_query, query_labels, _ = _loo_per_query(embeddings, labels, (1,), queries_mask, query_vectors, rescore)
    return _class_rows(per_query, query_labels, _as_labels(labels, len(labels), "labels"), class_names)


def per_class_metrics_split(query_emb: np.ndarray, query_labels: np.ndarray, gallery_emb: np.ndarray,
                            gallery_labels: np.ndarray, class_names: Sequence[str] | None = None, *,
                            rescore: Rescore | None = None) -> list[dict]:
    """``per_class_metrics`` for separate query and gallery sets ("images" counts both)."""
    q, ql, g, gl, _ = _split_inputs(query_emb, query_labels, gallery_emb, gallery_labels, (1,))
    per_query = _score_queries(q, ql, g, gl, (1,), None, rescore)
    rows = _class_rows(per_query, ql, np.concatenate([ql, gl]), class_names)
    return rows


def oneshot_accuracy(query_emb: np.ndarray, query_labels: np.ndarray, support_emb: np.ndarray,
                     support_labels: np.ndarray) -> float:
    """N-way one-shot accuracy: the share of queries whose most similar support item (ties: the
    lowest support position) has the query's label.

    query_emb float32 [Q, D], query_labels int64 [Q], support_emb float32 [S, D], support_labels
    int64 [S]. Raises DataError when a query's class has no support item.
    """
    q, ql, s, sl, _ = _split_inputs(query_emb, query_labels, support_emb, support_labels, (1,))
    unknown = np.setdiff1d(ql, sl)
    if unknown.size:
        raise DataError(f"query classes without a support item: {unknown[:10].tolist()}")
    correct = 0
    step = max(1, _BLOCK_ELEMENTS // s.shape[0])
    for start in range(0, q.shape[0], step):
        sims = q[start:start + step] @ s.T
        correct += int((sl[np.argmax(sims, axis=1)] == ql[start:start + step]).sum())
    return correct / q.shape[0]


# --------------------------------------------------------------------------------------------------
# pairs and verification


def pair_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """L2 distance between paired unit vectors: a, b float32 [P, D] -> float32 [P] = sqrt(2 - 2 cos),
    clipped at 0 so rounding never yields NaN. 0 means identical, 2 opposite."""
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    if a.ndim != 2 or a.shape != b.shape:
        raise DataError(f"pair embeddings must be two arrays of equal shape [P, D], got {a.shape} and {b.shape}")
    cos = np.einsum("ij,ij->i", a, b, dtype=np.float64)
    return np.sqrt(np.clip(2.0 - 2.0 * cos, 0.0, None)).astype(np.float32)


def sample_pairs(labels: np.ndarray, n_pairs: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw balanced image pairs: ceil(n/2) same-class and floor(n/2) different-class, i != j always.

    labels int64 [N]. A positive picks i uniformly among images whose class has two or more, then
    j uniformly among the other images of that class; a negative picks i uniformly, then j uniformly
    among the images of other classes. Draws are with replacement (small sets repeat pairs) and the
    pairs come shuffled. Same seed, same pairs.

    Returns (i int64 [P], j int64 [P], same int64 [P] in {0, 1}). Raises DataError when no class has
    two images or there is only one class.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise DataError("sample_pairs needs a non-empty 1-D array of labels")
    labels = _as_labels(labels, labels.size, "labels")
    n_pairs = int(n_pairs)
    if n_pairs < 2:
        raise DataError(f"n_pairs must be at least 2 (one similar, one dissimilar), got {n_pairs}")
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    if classes.size < 2:
        raise DataError("pairs need at least two classes: all images share one label")
    if counts.max() < 2:
        raise DataError("pairs need a class with at least two images: every class has one")
    rng = np.random.default_rng(seed)
    n_pos = (n_pairs + 1) // 2
    n_neg = n_pairs - n_pos
    # Members of each class, contiguous, so a draw within a class is an offset into its block.
    members = np.argsort(inverse, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])

    eligible = np.flatnonzero(counts[inverse] >= 2)
    pi = eligible[rng.integers(0, eligible.size, n_pos)]
    cls = inverse[pi]
    # Draw among the class's other members: an offset in [0, count-1), skipping i's own slot.
    own_slot = np.empty_like(members)
    own_slot[members] = np.arange(members.size) - starts[inverse[members]]
    offset = rng.integers(0, counts[cls] - 1)
    offset = offset + (offset >= own_slot[pi])
    pj = members[starts[cls] + offset]

    ni = rng.integers(0, labels.size, n_neg)
    ncls = inverse[ni]
    others = labels.size - counts[ncls]
    # Index into the images outside i's class: skip over its contiguous block in class order.
    pos = rng.integers(0, others)
    pos = pos + np.where(pos >= starts[ncls], counts[ncls], 0)
    nj = members[pos]

    i = np.concatenate([pi, ni]).astype(np.int64)
    j = np.concatenate([pj, nj]).astype(np.int64)
    same = np.concatenate([np.ones(n_pos, np.int64), np.zeros(n_neg, np.int64)])
    order = rng.permutation(n_pairs)
    return i[order], j[order], same[order]


def _pair_inputs(distances, labels) -> tuple[np.ndarray, np.ndarray]:
    d = np.asarray(distances, dtype=np.float64)
    y = np.asarray(labels)
    if d.ndim != 1 or y.shape != d.shape:
        raise DataError(f"distances and labels must be 1-D arrays of one length, got {d.shape} and {y.shape}")
    if d.size == 0:
        raise DataError("no pairs to score")
    if not np.isfinite(d).all():
        raise DataError("distances hold NaN or infinite values")
    if not np.isin(y, (0, 1)).all():
        raise DataError("pair labels must be 0 (dissimilar) or 1 (similar)")
    y = y.astype(np.int64)
    if y.min() == y.max():
        raise DataError("pairs need both labels: at least one similar (1) and one dissimilar (0) pair")
    return d, y


def _cuts(d: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct distances ascending, and the positives / negatives at or below each."""
    values, inverse = np.unique(d, return_inverse=True)
    pos = np.cumsum(np.bincount(inverse, weights=y, minlength=values.size))
    neg = np.cumsum(np.bincount(inverse, weights=1 - y, minlength=values.size))
    return values, pos, neg


def roc_curve(distances: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC of the rule "similar iff distance <= threshold"; smaller distance means similar (label 1).

    distances float [P]; labels int {0, 1} [P]. Returns (fpr, tpr, thresholds), float64 [T+1] for T
    distinct distances: thresholds[0] = -inf (nothing called similar: fpr = tpr = 0), then each
    distinct distance ascending (the last gives fpr = tpr = 1).
    """
    d, y = _pair_inputs(distances, labels)
    values, pos, neg = _cuts(d, y)
    tpr = np.concatenate([[0.0], pos / pos[-1]])
    fpr = np.concatenate([[0.0], neg / neg[-1]])
    return fpr, tpr, np.concatenate([[-np.inf], values])


def precision_recall_curve(distances: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pair-verification precision and recall for each threshold of "similar iff distance <=
    threshold". Returns (precision, recall, thresholds) float64 [T] over the T distinct distances
    ascending (recall rises to 1)."""
    d, y = _pair_inputs(distances, labels)
    values, pos, neg = _cuts(d, y)
    return pos / (pos + neg), pos / pos[-1], values


def roc_auc(distances: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC: the probability that a random similar pair is closer than a random
    dissimilar pair, ties counted half (Mann-Whitney U / (n_pos * n_neg))."""
    d, y = _pair_inputs(distances, labels)
    _, inverse, counts = np.unique(d, return_inverse=True, return_counts=True)
    # Average 1-based rank of each tie group, ascending distance.
    upper = np.cumsum(counts)
    mid_rank = upper - (counts - 1) / 2.0
    ranks = mid_rank[inverse]
    n_pos = float(y.sum())
    n_neg = float(y.size - n_pos)
    # Dissimilar pairs should rank high (far): U counts (similar, dissimilar) pairs in the right order.
    u = ranks[y == 0].sum() - n_neg * (n_neg + 1) / 2.0
    return float(u / (n_pos * n_neg))


def equal_error_rate(distances: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """The error rate where false-accept rate (FPR) equals false-reject rate (1 - TPR), linearly
    interpolated between ROC points, and the distance threshold there (interpolated likewise;
    the first finite threshold when the crossing lies before it). Returns (eer, threshold)."""
    fpr, tpr, thresholds = roc_curve(distances, labels)
    gap = (1.0 - tpr) - fpr  # falls from 1 to -1 as the threshold grows
    p = int(np.argmax(gap <= 0))  # >= 1: gap[0] is 1
    if gap[p] == 0:
        return float(fpr[p]), float(thresholds[p])
    alpha = gap[p - 1] / (gap[p - 1] - gap[p])
    eer = fpr[p - 1] + alpha * (fpr[p] - fpr[p - 1])
    if np.isfinite(thresholds[p - 1]):
        threshold = thresholds[p - 1] + alpha * (thresholds[p] - thresholds[p - 1])
    else:
        threshold = thresholds[p]
    return float(eer), float(threshold)


def calibrate_threshold(distances: np.ndarray, labels: np.ndarray) -> float:
    """The threshold of "similar iff distance <= threshold" with the highest accuracy on these pairs.

    Candidates are the midpoints between neighbouring distinct sorted distances, plus one just below
    the smallest (all dissimilar) and the largest itself (all similar); among equally accurate
    candidates the smallest wins, which favours fewer false matches.
    """
    d, y = _pair_inputs(distances, labels)
    values, pos, neg = _cuts(d, y)
    total_neg = neg[-1]
    # Correct calls for "cut after group g": positives at or below plus negatives above.
    correct = np.concatenate([[total_neg], pos + (total_neg - neg)])
    best = int(np.argmax(correct))
    if best == 0:
        return float(np.nextafter(values[0], -np.inf))
    if best == values.size:
        return float(values[-1])
    return float((values[best - 1] + values[best]) / 2.0)


def verification_metrics(distances: np.ndarray, labels: np.ndarray, threshold: float | None = None) -> dict:
    """Score pair verification.

    distances float [P] (smaller = more similar); labels int {0, 1} [P]; threshold: the operating
    point to judge, None to use the calibrated best one.

    Returns {"roc_auc", "eer", "eer_threshold", "threshold" (the one judged), "best_threshold"
    (calibrate_threshold), "best_accuracy", "accuracy", "precision", "recall", "f1" (at threshold;
    precision is 0 when nothing is called similar), "pairs", "positives"}.
    """
    d, y = _pair_inputs(distances, labels)
    best = calibrate_threshold(d, y)
    used = best if threshold is None else float(threshold)
    eer, eer_threshold = equal_error_rate(d, y)

    def at(t: float) -> tuple[float, float, float, float]:
        called = d <= t
        tp = float((called & (y == 1)).sum())
        fp = float((called & (y == 0)).sum())
        fn = float((~called & (y == 1)).sum())
        accuracy = float((called == (y == 1)).mean())
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return accuracy, precision, recall, f1

    accuracy, precision, recall, f1 = at(used)
    return {
        "roc_auc": roc_auc(d, y),
        "eer": eer,
        "eer_threshold": eer_threshold,
        "threshold": used,
        "best_threshold": best,
        "best_accuracy": at(best)[0],
        "accuracy": accuracy,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "pairs": int(y.size),
        "positives": int(y.sum()),
    }
