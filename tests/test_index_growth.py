"""A library's index growing with it (``Library.update_index``, ``engine.index_growth``): rung
changes while queries run, ids and removal on every rung, and kill -9 during a rung change.

Scale-free: a small Flat limit (``$ENGINE_INDEX_FLAT_MAX``) and memory budget put a few thousand
32-d synthetic clustered vectors through every rung (Flat, IVF-Flat, IVF-SQ8, IVF-PQ) that a
million 1280-d photos climb. Rows are committed as ingest commits them (rows and vectors in one
transaction, then the index, then ``update_index``)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from bench.synthetic import SyntheticEmbeddings
from engine.index import VectorIndex
from engine.index_policy import FLAT_MAX_ENV, choose_index
from engine.library import Library
from engine.rerank import search_exact

DIM = 32
FLAT_MAX = DIM * 600  # Flat up to 600 rows
BUDGET = 120_000  # bytes: then IVF-Flat (past 600 rows), SQ8 (1,000), PQ (3,000)
ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def _vectors(start: int, stop: int) -> np.ndarray:
    """Rows start..stop of one fixed seeded clustered collection: float32 [stop - start, DIM]."""
    gen = SyntheticEmbeddings(DIM, seed=0, clusters=48, intrinsic=12)
    return gen.sample(stop, seed=1)[start:stop]


def new_library(home: str | Path) -> Library:
    """A library of DIM-d vectors whose encoder is never needed (vectors are committed directly)."""
    lib = Library(home, device="cpu")
    if lib.model_info() is None:
        lib.store.set_meta("model", {"spec": "pretrained", "identity": "synthetic", "backbone": "none", "dim": DIM,
                                     "input_size": [3, 8, 8]})
        lib.set_index_options(factory="auto", memory_budget=BUDGET)
    return lib


def grow(home: str, stop: int, batch: int = 250, save_every_s: float = 0) -> None:
    """Commit rows 0..stop (those not stored yet: a rerun resumes) batch by batch as ingest does,
    keeping one index object up to date and calling ``update_index`` after each batch (a save
    whenever one is due: by default always) and at the end."""
    lib = new_library(home)
    with lib.write_lock():
        index = lib.open_index(required=False)
        if index is None or index.ntotal == 0 and not index.is_trained:
            index = VectorIndex.build(DIM, "Flat")
        for start in range(0, stop, batch):
            paths = [f"/photos/{i:06d}.jpg" for i in range(start, min(stop, start + batch))]
            known = lib.store.lookup_paths(paths)
            fresh = [n for n, p in enumerate(paths) if p not in known]
            if not fresh:
                continue
            vectors = _vectors(start, start + len(paths))[fresh]
            rows = [{"path": paths[n], "content_hash": f"{start + n:064x}", "bytes": 1, "mtime": 1.0} for n in fresh]
            ids, _ = lib.store.write_batch(rows, vectors)
            index.add(vectors, np.asarray(ids, np.int64))
            lib.update_index(index, synced=True, final=False, min_interval_s=save_every_s)
        lib.update_index(index, synced=True)
    lib.close()


@pytest.fixture()
def small_rungs(monkeypatch):
    monkeypatch.setenv(FLAT_MAX_ENV, str(FLAT_MAX))


def _assert_converged(home: Path, rows: int) -> VectorIndex:
    """The saved index holds exactly the stored ids, is of the type the policy gives for ``rows``,
    was tuned to the target, and every stored vector finds itself first."""
    lib = new_library(home)
    try:
        stored = lib.store.embedding_ids()
        assert len(stored) == rows
        index = lib.read_index()  # the file itself: checksum recorded, type as recorded
        assert sorted(index.ids().tolist()) == stored.tolist()
        assert index.factory == choose_index(rows, DIM, BUDGET).factory
        state = json.loads(lib.paths.index_state.read_text())
        assert state["ntotal"] == rows and state["generation"] == lib.store.generation()
        if not index.is_exact:
            assert index.settings.recall >= 0.95 and index.settings.queries > 0
        picked, vectors = lib.store.get_embeddings(stored[::97], DIM)
        _, found = search_exact(lib.store, index, vectors, 1)
        assert np.mean(found[:, 0] == picked) >= 0.98
        assert not list(home.glob(".*.tmp"))
        return index
    finally:
        lib.close()


def test_the_index_climbs_every_rung_while_queries_run(tmp_path, small_rungs):
    home = tmp_path / "home"
    new_library(home).close()
    seen: list[tuple[str, int]] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def read() -> None:
        rng = np.random.default_rng(3)
        while not done.is_set():
            lib = Library(home, device="cpu")
            try:
                index = lib.open_index(required=False)
                if index is None or index.ntotal == 0:
                    continue
                held = index.ids()
                stored = lib.store.embedding_ids()
                assert set(held.tolist()) <= set(stored.tolist())  # nothing half-added, nothing foreign
                picked, q = lib.store.get_embeddings(rng.choice(held, size=min(20, len(held)), replace=False), DIM)
                scores, found = search_exact(lib.store, index, q, 5)
                again = dict(zip(*lib.store.get_embeddings(found[:, 0], DIM)))
                exact = [float(q[r] @ again[i]) for r, i in enumerate(found[:, 0].tolist())]
                np.testing.assert_allclose(scores[:, 0], exact, rtol=1e-5)  # the scores are exact
                assert np.mean(found[:, 0] == picked) >= 0.8
                seen.append((index.factory, index.ntotal))
            except BaseException as exc:  # noqa: BLE001 (reported by the main thread)
                errors.append(exc)
                return
            finally:
                lib.close()

    reader = threading.Thread(target=read)
    reader.start()
    try:
        grow(str(home), 3500)
    finally:
        done.set()
        reader.join(60)
    assert not errors, errors[0]
    index = _assert_converged(home, 3500)
    assert "PQ" in index.factory
    kinds = {f.split(",")[-1].rstrip("np") for f, _ in seen}
    assert len(seen) >= 5 and len(kinds) >= 2, seen  # the readers searched across rung changes


@pytest.mark.parametrize("factory", ["Flat", "IVF32,Flat", "IVF32,SQ8", "IVF32,SQ4", "IVF32,PQ8np", "HNSW16"])
def test_ids_are_kept_and_removal_works_on_every_rung(tmp_path, factory):
    home = tmp_path / "home"
    lib = new_library(home)
    x = _vectors(0, 3000)
    rows = [{"path": f"/photos/{i:06d}.jpg", "content_hash": f"{i:064x}", "bytes": 1, "mtime": 1.0} for i in range(3000)]
    ids = np.asarray(lib.store.write_batch(rows, x)[0], np.int64) * 1  # database ids, not positions
    lib.store.remove_paths([rows[i]["path"] for i in range(0, 40)])  # ids that start above 40
    ids, x = ids[40:], x[40:]
    index = lib.rebuild_index(factory)
    assert index.factory == factory and sorted(index.ids().tolist()) == ids.tolist()
    gone = [rows[i]["path"] for i in range(40, 3000, 7)]
    lib.store.remove_paths(gone)
    lib.reconcile(index)  # removes by id (a graph, which cannot, is rebuilt)
    kept = lib.store.embedding_ids()
    assert sorted(index.ids().tolist()) == kept.tolist() and len(kept) == len(ids) - len(gone)
    removed = np.setdiff1d(ids, kept)
    _, found = search_exact(lib.store, index, x[np.isin(ids, removed)], 10)
    assert not np.isin(found, removed).any()  # a removed photo never comes back
    picked, q = lib.store.get_embeddings(kept[::13], DIM)
    _, found = search_exact(lib.store, index, q, 1)
    assert np.mean(found[:, 0] == picked) >= 0.98
    lib.save_index(index)
    again = Library(home, device="cpu").read_index()
    assert sorted(again.ids().tolist()) == kept.tolist() and again.settings == index.settings
    lib.close()


def _killed_grow(home: Path, stop: int, fault: str) -> None:
    env = {"ENGINE_FAULT": fault, FLAT_MAX_ENV: str(FLAT_MAX), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", f"from tests.test_index_growth import grow; grow({str(home)!r}, {stop})"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, f"{fault} did not kill the run ({proc.returncode}): {proc.stderr[-2000:]}"


def test_killed_during_a_rung_change_the_library_answers_and_a_rerun_converges(tmp_path, small_rungs):
    home = tmp_path / "home"
    # the second move up (IVF-Flat -> SQ8), built, not yet saved; then mid-save of a later one
    for fault, stop in (("index-rung-built:2", 1500), ("index-state-written:3", 4000)):
        _killed_grow(home, stop, fault)
        lib = new_library(home)
        index = lib.open_index()  # the old index file, reconciled with every committed row
        stored = lib.store.embedding_ids()
        assert sorted(index.ids().tolist()) == stored.tolist() and len(stored) > 0
        picked, q = lib.store.get_embeddings(stored[::50], DIM)
        assert np.mean(search_exact(lib.store, index, q, 1)[1][:, 0] == picked) >= 0.98
        lib.close()
    grow(str(home), 4000)
    _assert_converged(home, 4000)


def test_reindex_chooses_or_keeps_a_type_and_info_shows_the_tuning(tmp_path, small_rungs):
    from click.testing import CliRunner

    from engine.cli import main

    home = tmp_path / "home"
    grow(str(home), 2000)

    def cli(*args: str) -> dict:
        result = CliRunner().invoke(main, ["--home", str(home), *args])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    report = cli("reindex", "--index-type", "IVF16,Flat", "--recall", "0.9", "--json")
    assert report["index"] == "IVF16,Flat" and report["search"]["target"] == 0.9 and report["search"]["recall"] >= 0.9
    facts = cli("info", "--json")["index"]
    assert (facts["chosen"], facts["type"], facts["recall_target"]) == ("IVF16,Flat", "IVF16,Flat", 0.9)
    assert facts["recall"] == report["search"]["recall"] and facts["search"].startswith("nprobe=")
    grow(str(home), 3000)  # a type chosen by hand stays, however the library grows
    assert cli("info", "--json")["index"]["type"] == "IVF16,Flat"

    report = cli("reindex", "--index-type", "auto", "--memory-budget", "1G", "--json")
    assert report["index"] == choose_index(3000, DIM, 1 << 30).factory == "IVF64,Flat"
    facts = cli("info", "--json")["index"]
    assert (facts["chosen"], facts["memory_budget"], facts["recall_target"]) == ("auto", 1 << 30, 0.9)
    assert facts["why"] and facts["built_for"] == 3000 and facts["recall"] >= 0.9

    bad = CliRunner().invoke(main, ["--home", str(home), "reindex", "--memory-budget", "lots"])
    assert bad.exit_code != 0 and "Traceback" not in bad.output and "not a size" in bad.output


def test_a_small_write_to_a_large_index_does_not_rewrite_it(tmp_path, small_rungs, monkeypatch):
    monkeypatch.setattr("engine.index_growth.LAZY_SAVE_FROM", 1000)
    home = tmp_path / "home"
    grow(str(home), 2000)
    saved = (home / "index.faiss").read_bytes()
    grow(str(home), 2010, save_every_s=3600)  # 0.5 %: the stored vectors carry it until the next save
    assert (home / "index.faiss").read_bytes() == saved
    lib = Library(home, device="cpu")
    assert sorted(lib.open_index().ids().tolist()) == lib.store.embedding_ids().tolist()  # readers reconcile it
    lib.close()
    grow(str(home), 2030, save_every_s=3600)  # 1.5 % in all: saved
    assert json.loads((home / "index.json").read_text())["ntotal"] == 2030
