"""Helpers of the reindex tests (tests/test_reindex.py, tests/test_crash_reindex.py): what a
library answers, what its live state is, and whether a reindex converged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from db.vectors import TOLERANCE
from engine.embedding import embed_files
from engine.encoder import load_checkpoint
from engine.library import Library
from engine.query import search_library
from ingest.doctor import check_library

Answers = list[tuple[str, list[int], list[float]]]


def answers(home: Path, queries: Sequence[str | Path], k: int = 100) -> Answers:
    """Every query's hits (ids and L2 distances, best first) as a fresh process would see them."""
    lib = Library(home, device="cpu")
    try:
        results = search_library(lib, [str(q) for q in queries], k=k)
    finally:
        lib.close()
    return [(r.query, [h.id for h in r.hits], [h.distance for h in r.hits]) for r in results]


def assert_same_answers(got: Answers, expected: Answers, *, exact: bool = False) -> None:
    """Same queries, same ids in the same order, same distances: bit for bit with ``exact`` (the
    same stored vectors and index), else as cosine scores to 1e-5 (vectors embedded again in other
    batches differ in the last bits, which a distance near 0 magnifies: sqrt(2 - 2 * score))."""
    assert [(q, ids) for q, ids, _ in got] == [(q, ids) for q, ids, _ in expected]
    for (q, _, d1), (_, _, d2) in zip(got, expected):
        if exact:
            assert d1 == d2, q
        else:
            np.testing.assert_allclose(1 - np.square(d1) / 2, 1 - np.square(d2) / 2, atol=1e-5, err_msg=q)


def live_state(home: Path) -> dict[str, Any]:
    """What queries read: rows, aliases, stored vectors (bytes), model, generation, index type, and
    the bytes of the encoder, index and index state files."""
    lib = Library(home, device="cpu")
    try:
        store, info = lib.store, lib.model_info()
        ids = store.image_ids()
        _, vectors = store.get_embeddings(ids, info.dim)
        paths = lib.paths
        return {"ids": ids.tolist(), "paths": sorted(store.iter_paths()), "vectors": vectors.tobytes(),
                "model": info, "generation": store.generation(), "factory": lib.index_config().factory,
                "files": {p.name: p.read_bytes() for p in (paths.encoder, paths.index, paths.index_state)}}
    finally:
        lib.close()


def assert_converged(home: Path, model: str, ids: list[int], *, factory: str = "Flat") -> None:
    """The reindex to ``model`` is complete: the same rows (``ids``), each stored vector equal to a
    fresh embedding of its file by ``model``, the index (of type ``factory``; the library's
    configured type is ``auto`` for Flat, which the engine picks at this size, else ``factory``)
    holding exactly those ids, built in the current epoch, nothing staged or left beside the
    encoder, and doctor without a finding."""
    lib = Library(home, device="cpu")
    try:
        store, info = lib.store, lib.model_info()
        encoder = load_checkpoint(model, "cpu")
        assert info.identity == encoder.identity() and info.dim == encoder.dim
        assert store.image_ids().tolist() == ids and store.embedding_ids().tolist() == ids
        records = sorted(store.get_images(ids).values(), key=lambda r: r.id)
        fresh = embed_files(encoder, [r.path for r in records], workers=0)
        assert len(fresh.failures) == 0
        _, stored = store.get_embeddings(ids, info.dim)
        np.testing.assert_allclose(stored, fresh.embeddings, atol=TOLERANCE)  # stored as float16
        assert store.pending_record() is None and len(store.pending_ids()) == 0
        assert not lib.paths.encoder_pending.exists()
        assert load_checkpoint(lib.paths.encoder, "cpu").identity() == info.identity
        index = lib.read_index()
        assert index.dim == info.dim and sorted(index.ids().tolist()) == ids
        state = json.loads(lib.paths.index_state.read_text())
        assert (state["epoch"], state["model"], state["factory"]) == (store.embeddings_epoch(), info.identity, factory)
        assert lib.index_config().factory == ("auto" if factory == "Flat" else factory)
        report = check_library(lib)
        assert report.ok and report.findings == [], report.lines()
    finally:
        lib.close()


def assert_self_found(found: Answers, photos: Sequence[Path]) -> None:
    """Each indexed photo's best hit is itself (distance ~0): the answers come from vectors of one
    encoder, whichever it is."""
    by_query = {q: (ids, dists) for q, ids, dists in found}
    for photo in photos:
        ids, dists = by_query[str(photo)]
        assert dists[0] < 1e-3, (photo, dists[:3])
