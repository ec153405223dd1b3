"""Near-duplicate groups of a library (``engine duplicates``), from its stored vectors.

Nothing is decoded and no all-pairs loop runs: every stored vector asks the index for its nearest
neighbours (in chunks), the pairs within ``threshold`` (an L2 distance between unit vectors) become
edges, and the connected groups of that graph are the duplicate groups. A photo whose every
neighbour so far lies within the threshold is asked again, deeper, so that with an exact index
(``Flat``, the engine's choice for small libraries) each photo's whole neighbourhood within the
threshold is found and the groups equal those of the brute-force all-pairs graph. Past Flat the
candidates are re-scored from the stored vectors (``engine.rerank.search_exact``), so every
distance is exact; a pair the compressed index does not put among the candidates can be missed.
Byte-identical files (aliases) are members of their image's group, so an image that only has
identical copies is a group too.

Grouping is transitive: A near B and B near C put A, B and C in one group even when A and C are
further apart than the threshold (a burst drifting shot by shot).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from engine.errors import EngineError, IndexMissingError
from engine.rerank import search_exact

if TYPE_CHECKING:
    from collections.abc import Callable

    from engine.library import Library
    from engine.progress import ProgressFn

    SearchFn = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]

# "Same shot" for the pretrained encoder: calibrated by benchmarks/near_duplicates.py on altered
# copies (crop, resize, recompress, small rotation) of caltech101-dev photos among photos without
# copies: the largest distance whose pairwise precision stayed >= 0.95 on both seeds measured
# (0.971 and 0.952; recall 0.844 and 0.862); see the README. Precision is chosen over recall: a
# false group invites deleting a photo that has no copy. The verification threshold
# (DEFAULT_THRESHOLD, about 1.15) means "same kind of thing", far looser.
DEFAULT_DUPLICATE_THRESHOLD = 0.525


@dataclass(frozen=True)
class DuplicateConfig:
    """threshold: L2 distance at or below which two photos count as the same shot; neighbours: the
    first k-NN depth asked per photo (deepened where all of them are within the threshold);
    batch: vectors searched per index call."""

    threshold: float = DEFAULT_DUPLICATE_THRESHOLD
    neighbours: int = 8
    batch: int = 2048

    def __post_init__(self) -> None:
        if not np.isfinite(self.threshold) or self.threshold < 0:
            raise EngineError(f"--threshold must be a distance >= 0, got {self.threshold}")
        if self.neighbours < 1 or self.batch < 1:
            raise EngineError("neighbours and batch must be at least 1")


@dataclass(frozen=True)
class DuplicateMember:
    """One file of a group. id: its image (aliases share their image's id); nearest: the L2
    distance to the closest other member (0.0 for a byte-identical copy); identical_to: for a
    byte-identical copy, the indexed path it duplicates."""

    id: int
    path: str
    nearest: float
    identical_to: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "path": self.path, "nearest": round(self.nearest, 6)}
        if self.identical_to is not None:
            out["identical_to"] = self.identical_to
        return out


@dataclass(frozen=True)
class DuplicateGroup:
    """Files that are the same shot, sorted by path (aliases right after their image)."""

    members: list[DuplicateMember]

    @property
    def paths(self) -> list[str]:
        return [m.path for m in self.members]

    @property
    def max_nearest(self) -> float:
        return max((m.nearest for m in self.members), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {"size": len(self.members), "members": [m.to_dict() for m in self.members]}


@dataclass(frozen=True)
class DuplicateReport:
    """The groups, largest first; photos: vectors searched; threshold: the distance used."""

    threshold: float
    photos: int
    groups: list[DuplicateGroup] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def files_in_groups(self) -> int:
        return sum(len(g.members) for g in self.groups)


def scores_to_distances(scores: np.ndarray) -> np.ndarray:
    """Cosine scores of unit vectors (any shape) -> L2 distances float32 of the same shape."""
    return np.sqrt(np.maximum(0.0, 2.0 - 2.0 * np.asarray(scores, np.float64))).astype(np.float32)


def near_pairs(search: SearchFn, total: int, ids: np.ndarray, vectors: np.ndarray, threshold: float,
               neighbours: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Edges of the threshold graph found from these query vectors.

    search(queries float32 [Q, D], depth) -> (scores float32 [Q, depth], ids int64 [Q, depth]),
    best first, over ``total`` vectors (``engine.rerank.search_exact``: exact scores even past
    Flat, so a pair's distance is the true one). ids int64 [N] and vectors float32 [N, D]: stored
    vectors (each searchable under its id). Returns (a int64 [P], b int64 [P], distance float32
    [P]) with a != b and distance <= threshold. A row whose deepest neighbour is still within the
    threshold is searched again four times as deep, until one falls outside or all ``total`` were
    returned."""
    out_a: list[np.ndarray] = []
    out_b: list[np.ndarray] = []
    out_d: list[np.ndarray] = []
    rows = np.arange(len(ids))
    depth = min(total, neighbours + 1)
    while rows.size and depth > 0:
        scores, found = search(vectors[rows], depth)
        dist = scores_to_distances(scores)
        keep = (found >= 0) & (found != ids[rows][:, None]) & (dist <= threshold)
        full = (dist[:, -1] <= threshold) & (found[:, -1] >= 0) & (depth < total)
        done = ~full
        r, c = np.nonzero(keep & done[:, None])
        out_a.append(ids[rows][r])
        out_b.append(found[r, c])
        out_d.append(dist[r, c])
        rows = rows[full]
        depth = min(total, depth * 4)
    if not out_a:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return (np.concatenate(out_a).astype(np.int64), np.concatenate(out_b).astype(np.int64),
            np.concatenate(out_d).astype(np.float32))


def connected_groups(a: np.ndarray, b: np.ndarray) -> list[np.ndarray]:
    """Connected components (of two or more nodes) of the undirected graph with edges a[i]-b[i]
    (int64 [P] each): a list of int64 arrays of node ids, each sorted ascending."""
    if a.size == 0:
        return []
    nodes, inverse = np.unique(np.concatenate([a, b]), return_inverse=True)
    ia, ib = inverse[:a.size], inverse[a.size:]
    labels = _components(nodes.size, ia, ib)
    order = np.argsort(labels, kind="stable")
    cuts = np.flatnonzero(np.diff(labels[order])) + 1
    return [np.sort(nodes[part]) for part in np.split(order, cuts) if part.size > 1]


def _components(n: int, ia: np.ndarray, ib: np.ndarray) -> np.ndarray:
    """Component label per node 0..n-1 (int [n]): scipy's connected_components when installed,
    else a union-find with path halving."""
    try:
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components
    except ImportError:
        return _union_find(n, ia, ib)
    graph = coo_matrix((np.ones(ia.size, np.int8), (ia, ib)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def _union_find(n: int, ia: np.ndarray, ib: np.ndarray) -> np.ndarray:
    parent = list(range(n))

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for x, y in zip(ia.tolist(), ib.tolist()):
        rx, ry = root(x), root(y)
        if rx != ry:
            parent[max(rx, ry)] = min(rx, ry)
    return np.asarray([root(x) for x in range(n)], np.int64)


def find_duplicates(library: Library, config: DuplicateConfig = DuplicateConfig(), *,
                    progress: ProgressFn | None = None) -> DuplicateReport:
    """The library's near-duplicate groups (see the module docstring), largest first.

    progress(done, total): stored vectors searched so far, of all of them. Raises
    IndexMissingError for a library with nothing in it."""
    started = time.perf_counter()
    if not library.exists():  # asked before anything opens the store, which would create the folder
        raise IndexMissingError(f"no index in {library.paths.home} yet; run `engine ingest PATH` first")
    if progress:
        progress(0, None)  # the slow part begins (opening, perhaps reconciling, the index)
    index = library.open_index()
    info = library.model_info()
    store = library.store
    total = store.count_embeddings()
    if progress:
        progress(0, total)
    parts_a, parts_b, parts_d = [], [], []
    done = 0

    def search(queries: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
        return search_exact(store, index, queries, depth)

    for ids, vectors in store.iter_embeddings(info.dim, batch=config.batch):
        a, b, d = near_pairs(search, index.ntotal, ids, vectors, config.threshold, config.neighbours)
        parts_a.append(a)
        parts_b.append(b)
        parts_d.append(d)
        done += len(ids)
        if progress:
            progress(done, total)
    a = np.concatenate(parts_a) if parts_a else np.zeros(0, np.int64)
    b = np.concatenate(parts_b) if parts_b else np.zeros(0, np.int64)
    d = np.concatenate(parts_d) if parts_d else np.zeros(0, np.float32)
    groups = _build_groups(library, a, b, d)
    return DuplicateReport(float(config.threshold), int(done), groups, round(time.perf_counter() - started, 3))


def _build_groups(library: Library, a: np.ndarray, b: np.ndarray, d: np.ndarray) -> list[DuplicateGroup]:
    """Groups of image ids joined by edges (a, b, distance), plus every image with byte-identical
    aliases, as DuplicateGroups with paths; images removed meanwhile are left out."""
    store = library.store
    aliases = store.alias_map()
    components = connected_groups(a, b)
    grouped = {int(i) for comp in components for i in comp}
    components += [np.asarray([i], np.int64) for i in sorted(aliases) if i not in grouped]
    nearest: dict[int, float] = {}
    for x, y, dist in zip(a.tolist(), b.tolist(), d.tolist()):
        for node in (x, y):
            if dist < nearest.get(node, np.inf):
                nearest[node] = dist
    records = store.get_images(int(i) for comp in components for i in comp)
    groups = []
    for comp in components:
        members: list[DuplicateMember] = []
        for image_id in comp.tolist():
            record = records.get(image_id)
            if record is None:
                continue
            copies = sorted(aliases.get(image_id, []))
            own = 0.0 if copies else nearest.get(image_id, 0.0)
            members.append(DuplicateMember(image_id, record.path, float(own)))
            members.extend(DuplicateMember(image_id, p, 0.0, identical_to=record.path) for p in copies)
        if len(members) > 1:
            groups.append(DuplicateGroup(_ordered(members)))
    groups.sort(key=lambda g: (-len(g.members), g.members[0].path))
    return groups


def _ordered(members: Sequence[DuplicateMember]) -> list[DuplicateMember]:
    """Indexed files by path, each followed by its byte-identical copies."""
    heads = sorted((m for m in members if m.identical_to is None), key=lambda m: m.path)
    out: list[DuplicateMember] = []
    for head in heads:
        out.append(head)
        out.extend(m for m in members if m.identical_to == head.path)
    return out
