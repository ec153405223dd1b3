"""FAISS index types compared as the engine builds them: build time, recall against exact search,
queries/s, single-query latency and bytes per vector, on synthetic vectors.

Each index is built through ``VectorIndex``, saved with its ``save`` and read back from the file,
as ``engine query`` does; the index type in the table is read back from that file (FAISS's
``reverse_index_factory``), not taken from the factory string that was asked for.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bench.errors import BenchError
from bench.synthetic import SyntheticEmbeddings, exact_neighbours, recall_at_k
from bench.timing import percentiles

DEFAULT_FACTORIES = ("Flat", "HNSW32", "IVF1024,Flat", "IVF1024,PQ32")
DEFAULT_SEARCH_PARAMS = ("nprobe=16", "efSearch=64")


def fit_factory(factory: str, n: int, *, polysemous: bool = True) -> str:
    """``factory`` with IVF list counts lowered to what ``n`` training vectors support (FAISS wants
    about 39 per list): ``IVF1024`` stays for n >= 39,936, and halves until it fits. With
    ``polysemous=False``, ``PQm`` becomes ``PQmnp``: FAISS's factory turns on polysemous training
    for PQ codes by default, which alone takes minutes on two cores whatever ``n`` is."""
    def shrink(match: re.Match) -> str:
        nlist = int(match.group(1))
        while nlist > 16 and n < 39 * nlist:
            nlist //= 2
        return f"IVF{nlist}"

    out = re.sub(r"IVF(\d+)", shrink, factory)
    if not polysemous:
        out = re.sub(r"(?<![A-Za-z])PQ(\d+(?:x\d+)?)(?=,|$)", r"PQ\1np", out)
    return out


def index_type(index: Any) -> str:
    """The factory string of a FAISS index object as FAISS reads it back from its structure
    (``faiss.contrib.factory_tools.reverse_index_factory``), without the ``IDMap``/``IDMap2`` id
    wrapper every engine index has. PQ sizes come back explicit (``PQ32x8``); a training option
    such as ``np`` (no polysemous training) is not stored in an index and does not come back.
    A type FAISS cannot name is given by its class name."""
    import faiss
    from faiss.contrib.factory_tools import reverse_index_factory

    held = [faiss.downcast_index(index)]  # the wrappers own what they wrap: keep them alive meanwhile
    while isinstance(held[-1], faiss.IndexIDMap):  # IndexIDMap2 derives from it
        held.append(faiss.downcast_index(held[-1].index))
    try:
        return reverse_index_factory(held[-1])
    except (NotImplementedError, KeyError):
        return type(held[-1]).__name__


def saved_index_type(path: str | os.PathLike) -> str:
    """The index type of an index file (see ``index_type``), read from the file itself."""
    import faiss

    return index_type(faiss.read_index(os.fspath(path)))


def factory_type(factory: str, dim: int) -> str:
    """What ``index_type`` reads back from an empty index built from ``factory`` by FAISS: the
    same spelling as a read-back, so an asked-for factory and a built index can be compared."""
    import faiss

    return index_type(faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT))


def bench_index_types(n: int = 100_000, dim: int = 1280, factories: Sequence[str] = DEFAULT_FACTORIES, *,
                      k: int = 10, n_queries: int = 1000, seed: int = 0, polysemous: bool = True,
                      search_params: Sequence[str] = ()) -> dict[str, Any]:
    """Per FAISS index type, on ``n`` synthetic unit vectors float32 [n, dim]: build time (train +
    add through ``VectorIndex``), recall@k against exact search, batch queries/s, single-query p50
    and bytes per vector of the saved file. Searches run on the index as loaded back from that
    file, with the defaults it was saved with. Factories are adapted by ``fit_factory``
    (``factory_used``); ``index_type`` is read back from the saved file, and a read-back that
    differs from what FAISS makes of ``factory_used`` raises BenchError.

    ``search_params``: FAISS ParameterSpace strings (``"nprobe=16"``, ``"efSearch=64"``) tried on
    each index after its default row, in order; each that applies adds a row (same build, other
    search)."""
    from engine.errors import EngineError
    from engine.index import VectorIndex

    gen = SyntheticEmbeddings(dim, seed)
    database = np.concatenate(list(gen.chunks(n, seed + 1)))
    queries = gen.sample(n_queries, seed + 999)
    ids = np.arange(n, dtype=np.int64)
    truth = exact_neighbours(database, queries, k)
    rows = []
    with tempfile.TemporaryDirectory(prefix="engine-bench-") as tmp:
        for number, factory in enumerate(factories):
            used = fit_factory(factory, n, polysemous=polysemous)
            built = VectorIndex.build(dim, used)
            t0 = time.perf_counter()
            built.train(database)
            built.add(database, ids)
            build_s = time.perf_counter() - t0
            path = built.save(Path(tmp) / f"{number}.faiss")
            del built
            kind = saved_index_type(path)
            if kind != factory_type(used, dim):
                raise BenchError(f"asked for {used!r}, the saved index is {kind!r}")
            index = VectorIndex.load(path, kind)
            size = round(path.stat().st_size / n, 1)
            for params in ("", *search_params):
                if params:
                    try:
                        index.set_search_parameters(params)
                    except EngineError:  # not a parameter of this index type: no row
                        continue
                t0 = time.perf_counter()
                _, found = index.search(queries, k)
                batch_s = time.perf_counter() - t0
                single = []
                for q in queries[:50]:
                    t1 = time.perf_counter()
                    index.search(q[None], k)
                    single.append(time.perf_counter() - t1)
                rows.append({"factory": factory, "factory_used": used, "index_type": kind,
                             "params": params or "default", "build_s": round(build_s, 2),
                             f"recall@{k}": round(recall_at_k(found, truth), 4),
                             "queries_per_s": round(n_queries / batch_s, 1),
                             "single_p50_ms": percentiles(single)["p50_ms"], "bytes_per_vector": size})
            del index
            path.unlink()
    return {"n": n, "dim": dim, "k": k, "queries": n_queries, "data": "synthetic clustered unit vectors",
            "rows": rows}
