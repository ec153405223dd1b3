"""Which index a library should have: chosen from its row count, its vectors' dimension and a
memory budget, never by hand (``engine reindex --index-type`` remains for those who choose).

The ladder, each rung measured on this project's machine (README "Index choice";
``benchmarks/index_rungs.py`` measures one rung through a real library):

1. **Flat** (exact) while a query scans at most ``FLAT_MAX_ELEMENTS`` floats (n x dim): about
   15 ms on one core; past that a Flat query grows with the library (1.2 s at 1M x 1280).
2. **IVF-Flat** (``IVF{lists},Flat``: exact scores, lists ~ 4 sqrt(n), a power of two) where its
   full float32 copy of each vector fits the per-photo disk target and the memory budget: small
   dimensions only (at 1280-d a float32 copy is 5 KB, over the whole 4 KB a photo may cost).
3. **IVF-SQ8 with exact re-ranking** (``IVF{lists},SQ8``: a byte a dimension) where that fits:
   close enough to exact that re-ranking the top 10-20 candidates from the stored vectors
   (``engine.rerank``) restores full precision. At 1280-d its 1.3 KB would put a photo over 4 KB.
4. **IVF-PQ with exact re-ranking** (``IVF{lists},PQ{m}np``: 8-bit codes, m = dim/8 bytes a
   vector, smaller while the budget is short). Tuning (``engine.index_tuning``) buys back with
   nprobe and the re-ranking depth what the codes lose.
   Measured through a library on 100k densified real 1280-d embeddings (README "The index chooses
   and tunes itself"), tuned to recall@10 0.95 with re-ranking (a candidate costs a database
   fetch, about 5 us): PQ160 (234 B a vector) searches in 0.81 ms p50, SQ4 (701 B) in 1.81 ms,
   with the same build time; in a sweep of families, 4-bit fast-scan PQ64 never reached 0.95
   within 320 candidates (PQ128x4fs needed 160), and OPQ64's rotation alone took 28 minutes to
   train. So SQ8 where it fits, else PQ. Reproduced by
   ``.venv/bin/python benchmarks/index_rungs.py --n 100000 --dim 1280 --memory-budget 40000000``
   (PQ160; SQ4 with ``--index-type "IVF1024,SQ4"``) and the sweep by
   ``.venv/bin/python benchmarks/index_families.py --n 100000`` (PQ128np, PQ160np and
   PCAR512-SQ8 with ``--factories "IVF1024,PQ128np;IVF1024,PQ160np;PCAR512,IVF1024,SQ8"``),
   FAISS on one thread.
5. **HNSW** only when the caller says the library never removes vectors (``allow_graph``): a graph
   cannot remove, so every removal would rebuild it, and at the sizes where a rebuild is cheap,
   Flat is already fast; and its float32 copy plus links (5.4 KB at 1280-d) is over the target.

Every inverted file's coarse quantiser becomes an HNSW graph from 4096 lists on.

Past Flat the index never holds a full float32 copy of high-dimensional vectors: the stored
vectors (float16 in the database) are the one exact copy.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

FLAT_MAX_ELEMENTS = 1 << 25  # n x dim a Flat query scans within a few tens of ms (see the docstring)
PHOTO_BYTES_TARGET = 4096  # all of a photo on disk: database row, stored vector, index share
ROW_BYTES = 512  # a photo's database row besides its vector (path, hash, facts, SQLite's own cost)
STORED_BYTES_PER_DIM = 2  # the stored vector, float16
MIN_INDEX_BYTES = 48  # what the smallest compressed rung costs a vector: the floor of the cap
MEMORY_SHARE = 0.25  # of this machine's RAM, the default budget for the index
TRAIN_PER_LIST = 39  # FAISS wants this many training vectors per list (it warns below)
PQ_DIMS_PER_CODE = 8  # dimensions a PQ sub-quantiser (of 256 centroids) describes
# lists from which the coarse quantiser is a graph: at 1M x 1280-d with 4096 lists, the flat one took
# 0.51 ms of a 0.83 ms single query (12 lists scanned), an HNSW32 over the same centroids 0.077 ms,
# finding 99.9 % of the same lists
GRAPH_QUANTIZER_FROM = 4096
MAX_LISTS = 1 << 16
SHRINK_FACTOR = 4  # a library that shrinks this much below what its index was built for moves down
DEFAULT_BUDGET_ENV = "ENGINE_INDEX_MEMORY"  # bytes (or 4G, 512M ...): overrides the default budget
FLAT_MAX_ENV = "ENGINE_INDEX_FLAT_MAX"  # n x dim: overrides FLAT_MAX_ELEMENTS (a faster machine, or tests)

_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


@dataclass(frozen=True)
class IndexPlan:
    """The index a library of ``rows`` vectors of ``dim`` dimensions should have.

    factory: the FAISS factory string (what ``VectorIndex.build`` takes); search_params: the
    search settings to start from (``nprobe=...``; tuning then raises them to the recall target);
    rerank: whether the index's scores are compressed, so the search re-scores its top candidates
    exactly from the stored vectors; rung: ``flat``, ``ivf-flat``, ``ivf-sq8``, ``ivf-pq`` or ``hnsw``;
    bytes_per_vector: what the index costs a vector, on disk and in memory (estimated);
    reason: one line saying why."""

    factory: str
    search_params: str
    rerank: bool
    rung: str
    bytes_per_vector: int
    reason: str


def machine_memory() -> int:
    """Bytes of RAM this machine (or its container's limit, when smaller) has; 8 GiB when
    neither can be read. Fixed for the machine, unlike the memory available now, so the same
    library gets the same plan from one run to the next."""
    found: list[int] = []
    try:
        found.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        pass
    for path in _CGROUP_LIMITS:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # "max" or a huge number: no limit
            found.append(int(text))
            break
    return min(found) if found else 8 << 30


def parse_bytes(text: str) -> int:
    """``4G``, ``512M``, ``1.5GiB``, ``2000000000`` -> bytes (powers of 1024 for the suffixes).
    Raises ValueError for anything else."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise ValueError(f"not a size in bytes: {text!r} (use e.g. 4G, 512M or a number of bytes)")
    value = float(match.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[match.group(2).lower()]
    if value < 1:
        raise ValueError(f"a memory budget must be at least one byte, not {text!r}")
    return int(value)


def default_memory_budget() -> int:
    """The index's memory budget when none is given: ``$ENGINE_INDEX_MEMORY`` when set, else
    ``MEMORY_SHARE`` of this machine's RAM."""
    env = os.environ.get(DEFAULT_BUDGET_ENV)
    if env:
        try:
            return parse_bytes(env)
        except ValueError:
            pass
    return int(machine_memory() * MEMORY_SHARE)


def flat_max_elements() -> int:
    """The largest n x dim kept exact: ``$ENGINE_INDEX_FLAT_MAX`` when set to a whole number, else
    ``FLAT_MAX_ELEMENTS``."""
    env = os.environ.get(FLAT_MAX_ENV, "")
    return int(env) if env.isdigit() else FLAT_MAX_ELEMENTS


def index_bytes_cap(dim: int) -> int:
    """What the index may cost a vector so that a photo stays within ``PHOTO_BYTES_TARGET`` on
    disk beside its database row and its stored float16 vector (never below
    ``MIN_INDEX_BYTES``: at very large dimensions the target cannot be met, only approached)."""
    return max(MIN_INDEX_BYTES, PHOTO_BYTES_TARGET - ROW_BYTES - STORED_BYTES_PER_DIM * int(dim))


def list_count(rows: int) -> int:
    """Inverted lists for ``rows`` vectors: 4 sqrt(rows) rounded to a power of two, no more than
    the rows can train (``TRAIN_PER_LIST`` each), between 1 and ``MAX_LISTS``."""
    if rows < 1:
        return 1
    lists = 2 ** round(math.log2(4 * math.sqrt(rows)))
    trainable = 2 ** int(math.floor(math.log2(max(1, rows // TRAIN_PER_LIST))))
    return int(max(1, min(lists, trainable, MAX_LISTS)))


def _quantizer(lists: int) -> str:
    return f"IVF{lists}_HNSW32" if lists >= GRAPH_QUANTIZER_FROM else f"IVF{lists}"


def _pq_size(dim: int, cap: int) -> int | None:
    """Sub-quantisers (bytes a code) for 8-bit PQ of ``dim`` dimensions within ``cap`` bytes a
    vector (code and 8-byte id): the largest divisor of ``dim`` giving at least ``PQ_DIMS_PER_CODE``
    dimensions each; None when none fits."""
    fits = [m for m in range(1, dim + 1) if dim % m == 0 and dim // m >= PQ_DIMS_PER_CODE and m + 8 <= cap]
    return max(fits) if fits else None


def _smaller_pq(dim: int, m: int) -> int | None:
    """The next smaller sub-quantiser count (about half) that divides ``dim``; None below 1."""
    smaller = [d for d in range(1, m // 2 + 1) if dim % d == 0]
    return max(smaller) if smaller else None


def choose_index(rows: int, dim: int, memory_budget_bytes: int | None = None, *,
                 allow_graph: bool = False) -> IndexPlan:
    """The index for ``rows`` vectors of ``dim`` dimensions within ``memory_budget_bytes`` (default
    ``default_memory_budget()``); see the module's docstring for the ladder. allow_graph: the
    library never removes vectors, so an HNSW graph may be chosen where it fits."""
    rows, dim = max(0, int(rows)), int(dim)
    budget = default_memory_budget() if memory_budget_bytes is None else int(memory_budget_bytes)
    cap = index_bytes_cap(dim)
    flat_bytes = 4 * dim + 8
    if rows * dim <= flat_max_elements() and rows * flat_bytes <= budget:
        return IndexPlan("Flat", "", False, "flat", flat_bytes,
                         f"{rows} x {dim} floats: an exact scan stays within a few tens of ms")
    lists = list_count(rows)
    quantizer = _quantizer(lists)
    centroids = lists * dim * 4
    probe = f"nprobe={max(1, lists // 64)}"
    if allow_graph:
        graph_bytes = 4 * dim + 2 * 32 * 4 + 8
        if graph_bytes <= cap and rows * graph_bytes <= budget:
            return IndexPlan("HNSW32", "efSearch=64", False, "hnsw", graph_bytes,
                             f"no removals and {graph_bytes} B a vector fit: a graph answers fastest")
    if flat_bytes <= cap and rows * flat_bytes + centroids <= budget:
        return IndexPlan(f"{quantizer},Flat", probe, False, "ivf-flat", flat_bytes,
                         f"{rows} vectors: {lists} inverted lists of exact vectors ({flat_bytes} B a vector fits "
                         f"the {cap} B per photo the index may use)")
    sq_bytes = dim + 8
    if sq_bytes <= cap and rows * sq_bytes + centroids <= budget:
        return IndexPlan(f"{quantizer},SQ8", probe, True, "ivf-sq8", sq_bytes,
                         f"{rows} vectors: {lists} lists of 8-bit scalar codes ({sq_bytes} B a vector within {cap} B), "
                         "candidates re-ranked exactly from the stored vectors")
    m = _pq_size(dim, cap) or 1
    # smaller codes while the budget is short: the re-ranking recovers what they lose
    while rows * (m + 8) + centroids > budget and _smaller_pq(dim, m) is not None:
        m = _smaller_pq(dim, m)
    code = m + 8
    over = "" if rows * code + centroids <= budget else f"; over the {budget} B memory budget even so"
    return IndexPlan(f"{quantizer},PQ{m}np", probe, True, "ivf-pq", code,
                     f"{rows} x {dim}: {lists} lists of {m}-byte product-quantiser codes, candidates re-ranked "
                     f"exactly from the stored vectors ({code} B a vector within {cap} B{over})")


def training_size(factory: str, rows: int) -> int:
    """How many vectors (a random sample) to train ``factory`` on, out of ``rows``: 40 per
    inverted list (FAISS warns below 39), and at least 20,000 (the codebooks), where there are."""
    match = re.search(r"IVF(\d+)", factory)
    lists = int(match.group(1)) if match else 1
    return int(min(rows, max(20000, (TRAIN_PER_LIST + 1) * lists)))


def next_plan(factory: str, built_rows: int, rows: int, dim: int, memory_budget_bytes: int | None = None, *,
              allow_graph: bool = False) -> IndexPlan | None:
    """The plan to move to when an index of type ``factory`` built for ``built_rows`` vectors now
    serves ``rows``; None while it should stay. A library moves up when it grew into another
    rung (or list count), and down only when it shrank below 1/``SHRINK_FACTOR`` of what the
    index was built for, so rebuilds come at geometric steps: each vector is rebuilt into a new
    index a bounded number of times, whatever the library's size."""
    plan = choose_index(rows, dim, memory_budget_bytes, allow_graph=allow_graph)
    if plan.factory == factory:
        return None
    if rows >= built_rows or rows * SHRINK_FACTOR < built_rows:
        return plan
    return None
