"""The index policy's measuring benchmarks (``bench.index_families``, ``bench.index_rungs``) on tiny
clustered vectors passed in directly (no photo is embedded): rows are sane, an exact index has
recall 1.0, re-ranked recall agrees with a brute-force count, and a rung's library home is removed
unless kept."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.errors import BenchError
from bench.index_families import (FamiliesConfig, bench_index_families, default_factories, family_lists,
                                  format_families, reranked_recall)
from bench.index_rungs import RungConfig, bench_index_rung, format_rung
from bench.synthetic import SyntheticEmbeddings
from engine.index_policy import FLAT_MAX_ENV

ROOT = Path(__file__).resolve().parents[1]
DIM = 32


def _data(n: int = 3000, queries: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Clustered unit vectors float32 [n, DIM] and fresh queries float32 [queries, DIM] (other seed)."""
    gen = SyntheticEmbeddings(DIM, seed=0, clusters=48, intrinsic=12)
    return gen.sample(n, seed=1), gen.sample(queries, seed=2)


def test_reranked_recall_matches_a_brute_force_count():
    rng = np.random.default_rng(5)
    database = rng.standard_normal((200, 8)).astype(np.float32)
    queries = rng.standard_normal((6, 8)).astype(np.float32)
    exact = queries @ database.T
    order = np.argsort(-exact, axis=1)
    kth = exact[np.arange(6), order[:, 4]]
    candidates = np.stack([rng.permutation(200)[:12] for _ in range(6)]).astype(np.int64)
    candidates[0, 3:] = -1  # fewer candidates than hits for one query: the rest are not found
    expected = np.mean([len(set(c[c >= 0]) & set(o[:5])) / 5 for c, o in zip(candidates, order)])
    assert reranked_recall(queries, database, candidates, kth, 5) == pytest.approx(expected)
    assert reranked_recall(queries, database, order[:, :5], kth, 5) == 1.0


def test_family_sweep_rows_are_sane_and_exact_is_exact():
    database, queries = _data()
    config = FamiliesConfig(k=10, nprobes=(1, 4, 16, 128), rerank=(10, 40), threads=1,
                            factories=("Flat", "IVF64,SQ8", "IVF64,PQ8np"))
    results = bench_index_families(config, database=database, queries=queries)
    assert results["facts"]["n"] == 3000 and results["facts"]["dim"] == DIM
    flat, sq8, pq = results["rows"]
    assert [s["nprobe"] for s in flat["sweep"]] == [None]  # no inverted file: one way to search
    assert flat["sweep"][0]["recall"] == {10: 1.0, 40: 1.0}
    assert flat["best"]["recall"] == 1.0 and flat["best"]["rerank"] == 10
    assert 4 * DIM <= flat["bytes_per_vector"] < 4 * DIM + 8
    assert pq["bytes_per_vector"] < sq8["bytes_per_vector"] < flat["bytes_per_vector"]
    for row in (sq8, pq):
        probes = [s["nprobe"] for s in row["sweep"]]
        assert probes == sorted(probes) and probes[-1] <= 64  # the ladder stops at the list count
        assert row["train_s"] >= 0 and row["add_s"] >= 0
        for s in row["sweep"]:
            assert 0.0 <= s["recall"][10] <= s["recall"][40] <= 1.0  # a deeper re-ranking never loses hits
            assert s["search_ms"] > 0
    assert sq8["sweep"][-1]["recall"][40] >= 0.95  # SQ8 on 32-d re-ranked 40 deep is all but exact
    best = sq8["best"]
    assert best["recall"] >= 0.95 and best["cost_ms"] == pytest.approx(best["search_ms"] + best["rerank"] * 0.005,
                                                                       abs=2e-3)
    text = format_families(results)
    assert "IVF64,SQ8" in text and "R=40" in text


def test_family_defaults_and_refusals():
    assert family_lists(100_000) == 1024 and family_lists(1_000_000) == 4096
    assert "IVF1024,PQ64np" in default_factories(100_000) and "IVF1024,SQ4" in default_factories(100_000)
    database, queries = _data(200, 5)
    with pytest.raises(BenchError):
        bench_index_families(FamiliesConfig(factories=("NotAnIndex",)), database=database, queries=queries)
    with pytest.raises(BenchError):
        bench_index_families(FamiliesConfig(), database=database)


def test_rung_exact_flat_has_recall_one_and_its_home_is_removed(tmp_path):
    database, queries = _data()
    row = bench_index_rung(RungConfig(queries=len(queries)), work_dir=tmp_path, database=database, queries=queries)
    assert (row["rung"], row["factory"]) == ("flat", "Flat")
    assert row["recall@10"] == 1.0
    assert row["settings"]["rerank"] == 0
    assert row["n"] == 3000 and row["queries"] == len(queries)
    assert 4 * DIM <= row["index_bytes_per_vector"] < 4 * DIM + 64
    assert row["db_bytes_per_photo"] > 2 * DIM  # at least its float16 vector
    assert 0 < row["single_p50_ms"] <= row["single_p99_ms"] and row["queries_per_s"] > 0
    assert list(tmp_path.iterdir()) == []  # the temporary home is gone
    assert "Flat" in format_rung(row)


def test_rung_past_flat_is_tuned_and_kept_when_asked(tmp_path, monkeypatch):
    monkeypatch.setenv(FLAT_MAX_ENV, str(DIM * 600))  # Flat up to 600 rows: 3,000 climb to an inverted file
    database, queries = _data()
    row = bench_index_rung(RungConfig(queries=len(queries), memory_budget=120_000), work_dir=tmp_path, keep=True,
                           database=database, queries=queries)
    assert row["rung"] != "flat" and row["factory"].startswith("IVF")
    assert row["settings"]["params"].startswith("nprobe=") and row["settings"]["recall"] is not None
    assert row["recall@10"] >= 0.85  # tuned to 0.95 on held-out stored vectors; these queries are fresh
    assert row["index_bytes_per_vector"] < 4 * DIM  # compressed within the budget
    assert Path(row["home"]).parent == tmp_path and (Path(row["home"]) / "library.db").exists()


def test_rung_of_a_type_given_by_hand_is_built_and_tuned(tmp_path):
    database, queries = _data()
    row = bench_index_rung(RungConfig(queries=len(queries), factory="IVF32,SQ8"), work_dir=tmp_path,
                           database=database, queries=queries)
    assert (row["rung"], row["factory"]) == ("chosen", "IVF32,SQ8")  # not what auto picks at this size (Flat)
    assert row["settings"]["recall"] is not None and row["recall@10"] >= 0.85
    assert list(tmp_path.iterdir()) == []


def test_rung_refuses_half_given_data_and_leaves_nothing(tmp_path):
    database, _ = _data(300, 5)
    with pytest.raises(BenchError):
        bench_index_rung(RungConfig(), work_dir=tmp_path, database=database)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("script", ["benchmarks/index_families.py", "benchmarks/index_rungs.py", "benchmarks/scale.py",
                                    "benchmarks/scale_library.py", "benchmarks/second_stage.py"])
def test_scripts_start_without_path_tricks(script):
    out = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--n" in out.stdout and "--json" in out.stdout
