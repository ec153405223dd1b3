"""``engine bench`` machinery: a smoke run of every section on tiny settings, and the helpers that
the figures rest on (recall, factory fitting, synthetic vectors) against hand-made references."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ingest.bench import (BenchConfig, SyntheticEmbeddings, exact_neighbours, fit_factory, format_bench,
                          recall_at_k, run_bench)
from tests.util import make_folder


def test_recall_at_k_against_hand_count():
    truth = np.array([[1, 2, 3], [4, 5, 6]])
    found = np.array([[3, 2, 9], [-1, -1, 4]])
    assert recall_at_k(found, truth) == pytest.approx((2 / 3 + 1 / 3) / 2)


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
    assert all(0 <= r["recall@10"] <= 1 and r["bytes_per_vector"] > 0 for r in rows.values())
    text = format_bench(results)
    for heading in ("machine:", "ingest:", "decode + preprocess", "query, warm", "metadata (SQLite)", "index types"):
        assert heading in text
