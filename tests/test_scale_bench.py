"""The million-photo benchmark's machinery (``bench.scale_data``, ``bench.scale``,
``bench.scale_library``) on tiny data: the densified vectors keep the structure they claim, exact
search over shards is brute force, the tuning bisection finds the smallest setting, the measured
child's peak memory is its own, and a whole comparison runs end to end."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from bench.errors import BenchError
from bench.scale import ScaleConfig, format_scale, run_scale, smallest_setting
from bench.scale_data import (DensifyConfig, Densifier, ModelRef, exact_knn, fit_dimension, neighbour_cosine,
                              open_database, row_path, write_database)
from bench.scale_library import home_bytes, run_measured
from bench.synthetic import SyntheticEmbeddings
from engine.shards import read_manifest, read_shard


def _real(n: int = 600, dim: int = 48, seed: int = 3) -> np.ndarray:
    """Stand-in "real" embeddings: clustered unit vectors."""
    return SyntheticEmbeddings(dim, seed, clusters=20, intrinsic=12).sample(n, seed)


def test_densified_vectors_are_unit_seeded_and_prefix_stable():
    d = Densifier(_real())
    a, b = d.sample(300, seed=5), d.sample(300, seed=5)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, d.sample(300, seed=6))
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    short = np.concatenate(list(d.chunks(250, seed=2, chunk=100)))
    long = np.concatenate(list(d.chunks(400, seed=2, chunk=100)))
    np.testing.assert_array_equal(short, long[:250])  # the first m rows do not depend on n


def test_densified_neighbours_are_close_unlike_gaussian_noise():
    """What makes the set worth benchmarking: a held-out query has a near neighbour (a photo
    collection's nearest-neighbour cosine is about 0.8-0.9), where i.i.d. Gaussian vectors have
    none; and mixing in neighbours/noise keeps vectors off their anchors (no exact copies)."""
    real = _real()
    d = Densifier(real, DensifyConfig(components=16))
    base, queries = d.sample(6000, seed=1), d.sample(200, seed=2)
    scores, _ = exact_knn([base], queries, 10)
    stats = neighbour_cosine(scores)
    gauss = np.random.default_rng(0).standard_normal((6000, real.shape[1])).astype(np.float32)
    gauss /= np.linalg.norm(gauss, axis=1, keepdims=True)
    gauss_scores, _ = exact_knn([gauss], gauss[:200] + 0.0, 2)  # each finds itself first
    assert stats["nn1_p50"] > 0.8 and stats["nn1_p50"] > float(np.median(gauss_scores[:, 1])) + 0.25
    assert stats["nn1_p90"] < 0.9999  # no vector is a copy of another
    assert stats["nnk_p50"] <= stats["nn1_p50"]


def test_fit_dimension_keeps_geometry():
    real = _real(200, 48)
    wider = fit_dimension(real, 80)
    assert wider.shape == (200, 80)
    np.testing.assert_allclose(wider @ wider.T, real @ real.T, atol=1e-4)  # an isometry: every cosine kept
    narrow = fit_dimension(real, 24)
    assert narrow.shape == (200, 24)
    np.testing.assert_allclose(np.linalg.norm(narrow, axis=1), 1.0, atol=1e-5)
    # the principal directions keep most of the structure: neighbours mostly survive
    top_real = np.argsort(-(real @ real.T), axis=1)[:, 1:6]
    top_narrow = np.argsort(-(narrow @ narrow.T), axis=1)[:, 1:6]
    kept = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(top_real, top_narrow)])
    assert kept > 0.6
    assert fit_dimension(real, 48) is real


def test_exact_knn_over_shards_is_brute_force():
    rng = np.random.default_rng(4)
    parts = [rng.standard_normal((n, 16)).astype(np.float32) for n in (70, 1, 33)]
    queries = rng.standard_normal((9, 16)).astype(np.float32)
    scores, ids = exact_knn(parts, queries, 5, chunk=20)
    whole = np.concatenate(parts)
    brute = queries @ whole.T
    expected = np.argsort(-brute, axis=1)[:, :5]
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(brute, expected, 1), rtol=1e-5)


@pytest.mark.parametrize("target", [0.0, 0.35, 0.5, 0.81, 0.99, 2.0])
def test_smallest_setting_is_the_linear_scan(target):
    values = [1, 2, 4, 8, 16, 32, 64]
    recall = {v: min(1.0, 0.1 * i + 0.2) for i, v in enumerate(values)}
    asked: list[int] = []

    def recall_of(v: int) -> float:
        asked.append(v)
        return recall[v]

    got = smallest_setting(values, recall_of, target)
    reaching = [v for v in values if recall[v] >= target]
    assert got == ((reaching[0], recall[reaching[0]]) if reaching else (64, recall[64]))
    assert len(asked) <= 4  # bisection, not a scan


def test_shard_folder_is_importable_and_named_by_position(tmp_path):
    d = Densifier(_real())
    model = ModelRef("pretrained", "abc123", d.dim)
    folder = write_database(d, 250, model, tmp_path, seed=1, shard_rows=100)
    manifest = read_manifest(folder)
    assert (manifest.identity, manifest.dim, len(manifest.shards)) == ("abc123", d.dim, 3)
    shard = read_shard(manifest, manifest.shards[1])  # the engine's own validation: unit rows, paths
    assert shard.paths[0] == row_path(100, str(tmp_path / "photos")) and len(shard) == 100
    parts = open_database(folder)
    np.testing.assert_array_equal(np.concatenate(parts), np.concatenate(list(d.chunks(250, 1, 100))))
    assert write_database(d, 250, model, tmp_path, seed=1, shard_rows=100) == folder  # reused


def test_run_measured_reports_the_childs_own_peak_memory():
    big = run_measured([sys.executable, "-c", "import numpy as n; a = n.ones(50_000_000); print(a.sum())"])
    small = run_measured([sys.executable, "-c", "print(1)"])
    assert big.peak_rss_mib > 380 and small.peak_rss_mib < big.peak_rss_mib - 300  # not the maximum so far
    assert big.stdout.strip() == "50000000.0" and big.status == 0 and big.wall_s > 0
    with pytest.raises(BenchError, match="exit status 3"):
        run_measured([sys.executable, "-c", "import sys; sys.exit(3)"])
    assert run_measured([sys.executable, "-c", "import sys; sys.exit(3)"], ok=(3,)).status == 3


def test_home_bytes_by_kind(tmp_path):
    for name, size in {"library.db": 10, "library.db-wal": 5, "index.faiss": 7, "index.json": 1,
                       "encoder.pt": 3, "encoder.ts": 2, "thumbnails/a.jpg": 4}.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x" * size)
    assert home_bytes(tmp_path) == {"database": 15, "index": 8, "encoder": 5, "other": 4, "total": 32}


def test_a_whole_comparison_end_to_end(tmp_path, tiny_model_32):
    spec, identity = tiny_model_32
    config = ScaleConfig(n=3000, dim=32, queries=60, tune_queries=40, single=10, threads=1, hnsw_m=(8,),
                         ef_construction=40, cache=tmp_path)
    results = run_scale(config, real=_real(400, 32), model=ModelRef(spec, identity, 32))
    names = [r["name"] for r in results["rows"]]
    assert names == ["engine", "hnswlib", "faiss"]
    engine, hnsw, faiss_row = results["rows"]
    assert results["import"]["added"] == 3000
    for row in results["rows"]:
        assert 0.0 <= row["recall@10"] <= 1.0 and row["queries_per_s"] > 0 and row["bytes_per_vector"] > 0
    assert engine["recall@10"] >= 0.95
    assert hnsw["tune_recall"] >= min(engine["recall@10"], 1.0) or "ef=1024" in hnsw["config"]
    assert results["target"]["hnswlib"] == hnsw["config"]
    text = format_scale(results)
    assert "hnswlib" in text and "target" in text
    again = run_scale(config, real=_real(400, 32), model=ModelRef(spec, identity, 32))
    assert again["import"] == {}  # the library (and the shards, and the exact answers) are reused


@pytest.fixture(scope="module")
def tiny_model_32(tmp_path_factory):
    from engine.encoder import load_checkpoint
    from tests.util import tiny_checkpoint

    path = tiny_checkpoint(tmp_path_factory.mktemp("m") / "tiny32.pt", head_dim=32)
    return str(path), load_checkpoint(path, "cpu").identity()


def test_second_stage_comparison_end_to_end(tmp_path, tiny_model_32):
    """The three-stage ceiling (``bench.second_stage``) on tiny data: every second stage is
    built over the same first stage, its search re-ranks exactly (so a deeper, finer setting
    reaches the exact answer), and the engine's index and hnswlib are measured in the same run."""
    from bench.second_stage import (StageConfig, first_stage_factory, format_second_stage, random_rows,
                                    run_second_stage, with_scale)

    spec, identity = tiny_model_32
    config = with_scale(StageConfig(refines=("SQ4", "SQ8"), nprobes=(2, 64), k_factors=(4,), depths=(10, 40)),
                        n=3000, dim=32, queries=60, tune_queries=40, single=10, threads=1, hnsw_m=(8,),
                        ef_construction=40, cache=tmp_path)
    results = run_second_stage(config, real=_real(400, 32), model=ModelRef(spec, identity, 32))
    names = [r["name"] for r in results["rows"]]
    assert names == ["engine", "ivf-fs + SQ4", "ivf-fs + SQ8", "hnswlib"]
    assert results["facts"]["first_stage"] == first_stage_factory(3000, 32) == "IVF64,PQ8x4fsr"
    for row in results["rows"][1:3]:
        assert row["reached_target_on_tuning"] and row["recall@10"] >= 0.9  # every list scanned, 40 re-ranked
        assert row["disk_per_photo"] > row["bytes_per_vector"] > 32 * 0.5 * 0.9  # codes at least
    assert set(results["ratios"]) == {"engine", "ivf-fs + SQ4", "ivf-fs + SQ8"}
    assert "hnswlib" in format_second_stage(results)
    parts = [np.arange(12, dtype=np.float32).reshape(6, 2), np.arange(12, 20, dtype=np.float32).reshape(4, 2)]
    sample = random_rows(parts, 4, seed=1)
    whole = np.concatenate(parts)
    assert sample.shape == (4, 2) and all(any((row == w).all() for w in whole) for row in sample)
    assert np.all(np.diff(sample[:, 0]) > 0)  # in row order
