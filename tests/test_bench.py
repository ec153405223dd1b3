"""``engine bench`` machinery: a smoke run of every section on tiny settings, the helpers that the
figures rest on (recall, factory fitting and read-back, synthetic vectors) against hand-made
references, and the cold query, which must time the engine's own query code."""

from __future__ import annotations

import json
import os
import sys

import faiss
import numpy as np
import pytest
import torch

import bench.cold_query as cold_query
from bench.cold_query import PhaseClock, measure_cold_query
from bench.errors import BenchError
from bench.index_types import bench_index_types, factory_type, fit_factory, index_type, saved_index_type
from bench.query import bench_cold_query, bench_search_library, ingest_library, run_child
from bench.report import format_bench, text_table
from bench.suite import BenchConfig, run_bench
from bench.synthetic import SyntheticEmbeddings, exact_neighbours, recall_at_k
from engine.errors import EngineError
from engine.index import VectorIndex
from engine.library import Library
from tests.util import make_folder, make_image


def test_recall_at_k_against_hand_count():
    truth = np.array([[1, 2, 3], [4, 5, 6]])
    found = np.array([[3, 2, 9], [-1, -1, 4]])
    assert recall_at_k(found, truth) == pytest.approx((2 / 3 + 1 / 3) / 2)


def test_recall_at_k_matches_brute_force_numpy():
    rng = np.random.default_rng(7)
    truth = np.stack([rng.permutation(50)[:10] for _ in range(40)]).astype(np.int64)
    found = rng.integers(-1, 50, size=(40, 10)).astype(np.int64)
    found[:5] = truth[:5]  # some exact rows
    expected = np.mean([np.isin(t, f[f >= 0]).sum() / 10 for f, t in zip(found, truth)])
    assert recall_at_k(found, truth) == pytest.approx(expected)
    assert recall_at_k(truth, truth) == 1.0
    with pytest.raises(BenchError, match="shape"):
        recall_at_k(found[:, :5], truth)


def test_exact_neighbours_match_numpy_argsort():
    gen = SyntheticEmbeddings(16, seed=1, clusters=4, intrinsic=4)
    database, queries = gen.sample(300, 2), gen.sample(5, 3)
    np.testing.assert_allclose(np.linalg.norm(database, axis=1), 1.0, rtol=1e-5)
    expected = np.argsort(-(queries @ database.T), axis=1)[:, :7]
    np.testing.assert_array_equal(exact_neighbours(database, queries, 7), expected)


def test_fit_factory_shrinks_ivf_and_can_turn_off_polysemous_training():
    assert fit_factory("IVF1024,Flat", 100_000) == "IVF1024,Flat"
    assert fit_factory("IVF1024,Flat", 10_000) == "IVF256,Flat"
    assert fit_factory("IVF1024,PQ32", 10_000, polysemous=False) == "IVF256,PQ32np"
    assert fit_factory("OPQ16,IVF64,PQ16", 10_000, polysemous=False) == "OPQ16,IVF64,PQ16np"
    assert fit_factory("HNSW32", 10) == "HNSW32"


def test_index_type_is_read_back_from_the_saved_file_not_the_callers_string(tmp_path):
    vectors = SyntheticEmbeddings(16, seed=0, clusters=8, intrinsic=4).sample(2000, 1)
    for asked, built in (("Flat", "Flat"), ("HNSW16", "HNSW16"), ("IVF32,Flat", "IVF32,Flat"),
                         ("IVF32,PQ4x4np", "IVF32,PQ4x4"), ("PQ4np", "PQ4x8")):
        index = VectorIndex.build(16, asked)
        index.train(vectors)
        index.add(vectors, np.arange(len(vectors)))
        path = index.save(tmp_path / "index.faiss")
        assert saved_index_type(path) == built
        assert factory_type(asked, 16) == built
        loaded = VectorIndex.load(path, "Flat")  # the caller's string says Flat, whatever the file holds
        assert loaded.factory == "Flat"
        assert index_type(faiss.read_index(str(path))) == built


def test_index_type_mismatch_is_an_error(monkeypatch):
    monkeypatch.setattr("bench.index_types.factory_type", lambda factory, dim: "HNSW99")
    with pytest.raises(BenchError, match="saved index is 'Flat'"):
        bench_index_types(500, 16, ("Flat",), n_queries=10)


def test_index_types_search_params_add_rows_only_where_they_apply():
    out = bench_index_types(2000, 16, ("Flat", "HNSW16", "IVF1024,Flat"), n_queries=40,
                            search_params=("nprobe=4", "efSearch=32", "nprobe=32"))
    got = [(r["index_type"], r["params"]) for r in out["rows"]]
    assert got == [("Flat", "default"), ("HNSW16", "default"), ("HNSW16", "efSearch=32"),
                   ("IVF32,Flat", "default"), ("IVF32,Flat", "nprobe=4"), ("IVF32,Flat", "nprobe=32")]
    ivf = {r["params"]: r["recall@10"] for r in out["rows"] if r["index_type"] == "IVF32,Flat"}
    assert ivf["nprobe=32"] == 1.0 and ivf["nprobe=4"] <= ivf["nprobe=32"]  # all 32 lists: exact


def test_phase_clock_counts_nested_calls_once(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(cold_query.time, "perf_counter", lambda: now[0])
    clock = PhaseClock()

    def inner():
        now[0] += 5.0

    timed_inner = clock.wrap("inner", inner)

    def outer():
        now[0] += 1.0
        timed_inner()
        now[0] += 2.0

    clock.wrap("outer", outer)()
    timed_inner()
    assert clock.seconds == {"outer": 3.0, "inner": 10.0}


def test_phase_clock_puts_the_engine_functions_back():
    originals = (Library.__dict__["store"], Library.open_index, Library.encoder, VectorIndex.search)
    with PhaseClock().installed():
        assert Library.open_index is not originals[1] and VectorIndex.search is not originals[3]
        assert isinstance(Library.__dict__["store"], property)
    assert (Library.__dict__["store"], Library.open_index, Library.encoder, VectorIndex.search) == originals


@pytest.fixture(scope="module")
def tiny_library(tmp_path_factory, tiny_model):
    """A library of 6 generated images made with the tiny encoder, and a query image outside it."""
    root = tmp_path_factory.mktemp("bench-library")
    photos = make_folder(root / "photos", 6)
    query = make_image(root / "query.png", 99)
    ingest_library(root / "home", [str(p) for p in photos], model=tiny_model, batch_size=8)  # one batch: no workers
    return root / "home", query


def test_measure_cold_query_times_the_real_search_library(tiny_library):
    home, query = tiny_library
    split = measure_cold_query(home, query, k=3)
    assert split["hits"] == 3
    phases = [split[p] for p, *_ in cold_query.PROBES]
    assert all(v >= 0 for v in phases) and split["embed_s"] > 0 and split["search_s"] > 0
    assert split["index_load_s"] > 0 and split["metadata_s"] > 0 and split["open_s"] > 0
    assert sum(phases) + split["other_s"] == pytest.approx(split["query_s"], abs=1e-6)
    assert split["in_process_s"] >= split["import_s"] + split["query_s"]


def test_cold_query_child_process_and_its_failure(tiny_library, tmp_path):
    home, query = tiny_library
    out = bench_cold_query(home, query, k=3, cli=False)
    assert out["hits"] == 3 and out["wall_s"] > out["interpreter_start_s"] > 0
    assert out["wall_s"] >= out["import_s"] + out["query_s"]
    assert cold_query.main([str(tmp_path / "empty"), str(query)]) == 1  # what the child does on an error
    with pytest.raises(BenchError, match=r"the child failed \(exit status 1\): cold query: no index here"):
        run_child([sys.executable, "-c", "import sys; sys.exit('cold query: no index here')"], "the child",
                  dict(os.environ))


def test_search_library_bench_reads_the_index_type(tiny_library, tmp_path):
    home, query = tiny_library
    out = bench_search_library(home, query, k=3, repeats=2)
    assert out["vectors"] == 6 and out["index_type"] == "Flat" and out["p50_ms"] > 0
    with pytest.raises(EngineError):
        bench_search_library(home, tmp_path / "missing.png", repeats=1)


def test_format_bench_reports_a_failed_section_in_one_line():
    text = format_bench({"machine": {"cpu": "x"}, "index": {"error": "BenchError: broken"}})
    assert "index: FAILED: BenchError: broken" in text
    assert text_table(["a", "b"], [["x", 1]]) == ["  a  b", "  -  -", "  x  1"]


def test_run_bench_quick_covers_every_section(tmp_path, tiny_model):
    make_folder(tmp_path / "photos", 10, suffix=".jpg")
    config = BenchConfig(n_vectors=2000, data=str(tmp_path / "photos"), quick=True, device="cpu", model=tiny_model,
                         dim=32, ingest_files=10, batch_size=4, query_repeats=10, index_queries=50,
                         metadata_rows=300, decode_size=(640, 480), cold_query=False,
                         factories=("Flat", "HNSW32", "IVF1024,Flat", "IVF1024,PQ8x4"))
    threads = torch.get_num_threads()
    results = run_bench(config)
    assert torch.get_num_threads() == threads
    json.dumps(results)  # JSON-serialisable as it stands
    for section in ("ingest", "decode", "query", "metadata", "index"):
        assert "error" not in results[section], results[section]
    machine = results["machine"]
    assert machine["usable_cores"] >= 1 and machine["torch"] == torch.__version__
    ingest = results["ingest"]
    assert ingest["embedded"] == 10 and ingest["failed"] == 0 and ingest["ratio"] > 0
    assert ingest["model_images_per_s"] > 0 and len(ingest["runs"]) == 2
    decode = results["decode"]
    assert decode["decoded_size_full"] == [640, 480] and max(decode["decoded_size_draft"]) < 640
    assert [r["n"] for r in results["query"]["search"]] == [2000]
    assert results["query"]["library"]["vectors"] == 10
    assert results["metadata"]["rows"] == 300 and results["metadata"]["bulk_rows_per_s"] > 0
    rows = {r["factory"]: r for r in results["index"]["rows"] if r["params"] == "default"}
    assert {r["params"] for r in results["index"]["rows"]} == {"default", "nprobe=16", "efSearch=64"}
    assert rows["Flat"]["recall@10"] == 1.0
    assert rows["IVF1024,PQ8x4"]["factory_used"] == "IVF32,PQ8x4np"
    assert {f: r["index_type"] for f, r in rows.items()} == {
        "Flat": "Flat", "HNSW32": "HNSW32", "IVF1024,Flat": "IVF32,Flat", "IVF1024,PQ8x4": "IVF32,PQ8x4"}
    assert all(0 <= r["recall@10"] <= 1 and r["bytes_per_vector"] > 0 for r in rows.values())
    text = format_bench(results)
    for heading in ("machine:", "ingest:", "decode + preprocess", "query, warm", "metadata (SQLite)", "index types"):
        assert heading in text
    assert "IVF32,PQ8x4np" in text
