"""Query expansion (engine.expansion): alpha-QE and augmentation inside the shortlist, checked
against brute-force references written with plain loops; ``engine eval --expand`` measures what
``engine query --expand`` returns; the library setting and its CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from engine.errors import EngineError
from engine.expansion import (
    DEFAULT_EXPANSION,
    SETTING_KEY,
    Expansion,
    ShortlistRescorer,
    augment_shortlists,
    expand_from,
    expand_queries,
    library_expansion,
    save_library_expansion,
)
from engine.metrics import retrieval_metrics


@pytest.fixture(autouse=True)
def library_default(monkeypatch):
    """These tests check the engine's own default, whatever the session sets."""
    monkeypatch.delenv("ENGINE_EXPAND", raising=False)


def _unit(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _clustered(seed=0, classes=5, per=8, d=16):
    """Unit vectors around one centre per class, and their labels."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng, classes, d)
    x = np.repeat(centres, per, axis=0) + 0.6 * rng.normal(size=(classes * per, d)).astype(np.float32) / np.sqrt(d)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), np.repeat(np.arange(classes), per)


def _expand_ref(q, neighbours, alpha):
    """q + sum of max(cos, 0) ** alpha * x over the neighbours, normalised: one query, by hand."""
    out = q.astype(np.float64).copy()
    for x in neighbours:
        out += max(float(np.dot(q, x)), 0.0) ** alpha * x
    return out / np.linalg.norm(out)


def _ranking_ref(q, gallery, n, alpha, depth, skip=None):
    """What a search with expansion returns, by brute force: gallery indices in ranked order."""
    others = [i for i in range(len(gallery)) if i != skip]
    nearest = sorted(others, key=lambda i: -float(gallery[i] @ q))[:n]
    q2 = _expand_ref(q, gallery[nearest], alpha)
    by_expanded = sorted(others, key=lambda i: (-float(gallery[i] @ q2), i))
    short = by_expanded[:depth]
    new = {}
    for i in short:
        mates = sorted((j for j in short if j != i), key=lambda j: -float(gallery[i] @ gallery[j]))[:n]
        new[i] = float(_expand_ref(gallery[i], gallery[mates], alpha) @ q2)
    return sorted(short, key=lambda i: (-new[i], by_expanded.index(i))) + by_expanded[depth:]


def test_alpha_qe_is_the_weighted_sum_worked_by_hand():
    rng = np.random.default_rng(0)
    g = _unit(rng, 12, 8)
    q = _unit(rng, 3, 8)
    ids = np.array([[0, 4, 7], [2, -1, -1], [5, 5, 11]])
    got = expand_from(q, g, ids, 3.0)
    for r in range(3):
        want = _expand_ref(q[r], g[[i for i in ids[r] if i >= 0]], 3.0)
        np.testing.assert_allclose(got[r], want, atol=1e-6)
    # alpha 0 is the plain sum, negative similarities included (0 ** 0 = 1), clipped ones count 1 too
    plain = expand_from(q[:1], g, ids[:1], 0.0)[0]
    want = q[0] + g[[0, 4, 7]].sum(axis=0)
    np.testing.assert_allclose(plain, want / np.linalg.norm(want), atol=1e-6)


def test_a_negative_similarity_never_pulls():
    q = np.array([[1.0, 0.0]], np.float32)
    g = np.array([[-0.6, 0.8]], np.float32)
    np.testing.assert_allclose(expand_from(q, g, np.array([[0]]), 3.0), q)


def test_expand_queries_takes_the_n_nearest_and_never_the_query_itself():
    x, _ = _clustered()
    got = expand_queries(x, x, Expansion(3, 2.0), leave_out_self=True)
    for i in range(len(x)):
        nearest = sorted((j for j in range(len(x)) if j != i), key=lambda j: -float(x[i] @ x[j]))[:3]
        np.testing.assert_allclose(got[i], _expand_ref(x[i], x[nearest], 2.0), atol=1e-5)
    assert expand_queries(x, x, Expansion(0)) is not None
    np.testing.assert_array_equal(expand_queries(x, x, Expansion(0)), x)


def test_augmentation_inside_each_shortlist_matches_loops():
    rng = np.random.default_rng(1)
    lists = np.stack([_unit(rng, 6, 5) for _ in range(3)])
    lists[2, 4:] = 0  # a shorter list padded with zero rows
    got = augment_shortlists(lists, Expansion(2, 3.0))
    for q in range(3):
        rows = lists[q] if q < 2 else lists[q, :4]
        for i, x in enumerate(rows):
            mates = sorted((j for j in range(len(rows)) if j != i), key=lambda j: -float(x @ rows[j]))[:2]
            np.testing.assert_allclose(got[q, i], _expand_ref(x, rows[mates], 3.0), atol=1e-5)
    np.testing.assert_array_equal(got[2, 4:], 0)


@pytest.mark.parametrize("depth", [5, 100])
def test_eval_ranking_with_expansion_equals_brute_force(depth):
    x, labels = _clustered(seed=2)
    expansion = Expansion(2, 3.0)
    queries = expand_queries(x, x, expansion, leave_out_self=True)
    got = retrieval_metrics(x, labels, (1, 3), query_vectors=queries,
                            rescore=ShortlistRescorer(queries, x, expansion, depth))
    r1, mapr = [], []
    for i in range(len(x)):
        order = _ranking_ref(x[i], x, 2, 3.0, depth, skip=i)
        rel = labels[order] == labels[i]
        r = int(rel.sum())
        hits = np.cumsum(rel)
        r1.append(rel[0])
        mapr.append(sum(hits[j] / (j + 1) for j in range(r) if rel[j]) / r)
    assert got["recall@1"] == pytest.approx(np.mean(r1))
    assert got["map@r"] == pytest.approx(np.mean(mapr))
    plain = retrieval_metrics(x, labels, (1, 3))
    assert got["map@r"] != pytest.approx(plain["map@r"])  # the data is such that expansion matters


@pytest.mark.parametrize("bad", [dict(n=-1), dict(n=True), dict(n=1.5), dict(alpha=float("nan")), dict(alpha=-1),
                                 dict(alpha="x")])
def test_expansion_refuses_bad_values(bad):
    with pytest.raises(EngineError):
        Expansion(**bad)


# -- in a library ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model):
    from engine.library import Library
    from ingest.pipeline import IngestConfig, ingest_paths
    from tests.util import make_class_tree

    root = tmp_path_factory.mktemp("expansion")
    make_class_tree(root / "tree", 4, 6, size=32)
    lib = Library(root / "home", device="cpu")
    ingest_paths(lib, [root / "tree"], IngestConfig(batch_size=8, workers=0), model=tiny_model)
    lib.close()
    return root


@pytest.fixture()
def library(built, tmp_path):
    from engine.library import Library

    shutil.copytree(built / "home", tmp_path / "home")
    lib = Library(tmp_path / "home", device="cpu")
    yield lib
    lib.close()


def _stored(lib):
    from engine.library_eval import library_vectors

    ids, vectors, paths = library_vectors(lib)
    return ids, vectors, paths


def test_query_with_expansion_equals_brute_force_on_stored_vectors(library, built):
    from engine.query import search_library

    ids, vectors, paths = _stored(library)
    query = sorted(paths)[3]
    me = paths.index(query)
    [result] = search_library(library, [query], k=8, expand=2, exclude_self=True)
    order = _ranking_ref(vectors[me], vectors, 2, DEFAULT_EXPANSION.alpha, 100, skip=me)[:8]
    assert [h.id for h in result.hits] == [int(ids[i]) for i in order]
    # scores are the plain query's, so thresholds keep meaning the distance between two images
    for hit in result.hits:
        assert hit.score == pytest.approx(float(vectors[list(ids).index(hit.id)] @ vectors[me]), abs=1e-5)
        assert hit.distance == pytest.approx(np.sqrt(max(0.0, 2 - 2 * hit.score)), abs=1e-6)
    [plain] = search_library(library, [query], k=8, expand=0, exclude_self=True)
    assert [h.id for h in plain.hits] == [int(ids[i]) for i in sorted(
        (i for i in range(len(ids)) if i != me), key=lambda i: -float(vectors[i] @ vectors[me]))[:8]]
    assert [h.rank for h in result.hits] == list(range(1, 9))


def test_own_file_never_expands_the_query_even_when_it_may_be_a_hit(library):
    from engine.query import search_library

    ids, vectors, paths = _stored(library)
    query = sorted(paths)[0]
    me = paths.index(query)
    [result] = search_library(library, [query], k=5, expand=2)
    assert result.hits[0].id == int(ids[me]) and result.hits[0].score == pytest.approx(1.0, abs=1e-5)
    without_me = _ranking_ref(vectors[me], vectors, 2, DEFAULT_EXPANSION.alpha, 100, skip=me)
    assert [h.id for h in result.hits[1:]] == [int(ids[i]) for i in without_me[:4]]


def test_distance_limit_keeps_its_meaning_with_expansion(library):
    from engine.filters import HitFilter
    from engine.query import search_library

    _, vectors, paths = _stored(library)
    query = sorted(paths)[5]
    [plain] = search_library(library, [query], k=30, expand=0)
    limit = plain.hits[6].distance
    [result] = search_library(library, [query], k=30, expand=3, hit_filter=HitFilter(max_distance=limit))
    assert {h.id for h in result.hits} == {h.id for h in plain.hits if h.distance <= limit}
    assert all(h.distance <= limit + 1e-9 for h in result.hits)


def test_library_setting_default_saved_and_hostile(library, caplog):
    assert library_expansion(library) == DEFAULT_EXPANSION
    save_library_expansion(library, Expansion(4, 1.5))
    assert library_expansion(library) == Expansion(4, 1.5)
    library.store.set_meta(SETTING_KEY, {"n": "lots", "alpha": 3})
    assert library_expansion(library) == DEFAULT_EXPANSION
    assert "ignoring" in caplog.text
    library.store.set_meta(SETTING_KEY, [1, 2])
    assert library_expansion(library) == DEFAULT_EXPANSION


def test_environment_overrides_the_setting(library, monkeypatch):
    save_library_expansion(library, Expansion(4, 1.5))
    monkeypatch.setenv("ENGINE_EXPAND", "0")
    assert library_expansion(library) == Expansion(0, 1.5)
    monkeypatch.setenv("ENGINE_EXPAND", "many")
    with pytest.raises(EngineError, match="ENGINE_EXPAND"):
        library_expansion(library)


def test_cli_settings_query_and_eval(library, built):
    from engine.cli import main

    home = str(library.paths.home)
    runner = CliRunner()
    shown = runner.invoke(main, ["--home", home, "settings", "--json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout) == {"expand": DEFAULT_EXPANSION.n, "expand-alpha": DEFAULT_EXPANSION.alpha}
    assert runner.invoke(main, ["--home", home, "settings", "expand", "0"]).exit_code == 0
    assert library_expansion(library).n == 0
    bad = runner.invoke(main, ["--home", home, "settings", "expand", "1.5"])
    assert bad.exit_code == 1 and "whole number" in bad.output
    bad = runner.invoke(main, ["--home", home, "settings", "expand-alpha", "nan"])
    assert bad.exit_code == 1 and "finite" in bad.output
    assert runner.invoke(main, ["--home", home, "settings", "expand"]).exit_code == 2

    query = sorted(_stored(library)[2])[2]
    args = ["--home", home, "query", query, "-k", "6", "--json", "--no-server"]
    off = json.loads(runner.invoke(main, args).stdout)
    on = json.loads(runner.invoke(main, args + ["--expand", "2"]).stdout)
    from engine.query import search_library

    [want] = search_library(library, [query], k=6, expand=2)
    assert [h["id"] for h in on["hits"]] == [h.id for h in want.hits]
    assert [h["id"] for h in off["hits"]] == [h.id for h in search_library(library, [query], k=6, expand=0)[0].hits]

    plain = json.loads(runner.invoke(main, ["--home", home, "eval", "--library", "--json", "--pairs", "20"]).stdout)
    expanded = runner.invoke(main, ["--home", home, "eval", "--library", "--json", "--pairs", "20", "--expand", "2"])
    assert expanded.exit_code == 0, expanded.output
    metrics = json.loads(expanded.stdout)["metrics"]
    assert metrics["expand"] == 2 and metrics["expand_alpha"] == 3.0 and "expand" not in plain["metrics"]
    assert metrics["roc_auc"] == plain["metrics"]["roc_auc"]  # verification compares pairs as they are


def test_eval_with_expansion_is_what_queries_return(library):
    """Leave-one-out eval with --expand ranks each image as `engine query --expand --exclude-self` does."""
    from engine.evaluate import EvalConfig
    from engine.library_eval import evaluate_library
    from engine.query import search_library

    ids, vectors, paths = _stored(library)
    report = evaluate_library(library, EvalConfig(expand=2, n_pairs=20))
    labels = np.asarray([p.split("/")[-2] for p in paths])
    r1 = []
    for path, label in zip(paths, labels):
        [res] = search_library(library, [path], k=1, expand=2, exclude_self=True)
        r1.append(res.hits[0].path.split("/")[-2] == label)
    assert report.metrics["recall@1"] == pytest.approx(np.mean(r1))
