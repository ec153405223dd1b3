"""``engine duplicates``: the grouping equals the brute-force all-pairs reference, aliases are
members, and the command prints, draws and fails as it should."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import engine.duplicates as duplicates
from engine.cli import main
from engine.duplicates import DuplicateConfig, connected_groups, find_duplicates
from engine.library import Library
from ingest.pipeline import IngestConfig, ingest_paths
from tests.util import make_image


def _photo_set(root):
    """12 distinct photos, altered copies of four (resized, cropped), a burst of six near-identical
    frames, and two byte-identical copies (recorded as aliases)."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(12):
        make_image(root / f"p{i:02d}.png", 100 + i, size=(48, 40))
    for i in range(4):
        img = Image.open(root / f"p{i:02d}.png")
        img.resize((24, 20)).save(root / f"p{i:02d}_small.png")
        img.crop((3, 2, 45, 38)).save(root / f"p{i:02d}_crop.png")
    base = np.asarray(Image.open(root / "p05.png"), np.float32)
    for n in range(6):
        noise = np.random.default_rng(n).normal(0, 3, base.shape)
        Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(root / f"burst_{n}.png")
    (root / "copies").mkdir()
    shutil.copy(root / "p07.png", root / "copies" / "p07 copy.png")
    shutil.copy(root / "p08.png", root / "copies" / "p08 copy.png")


@pytest.fixture(scope="module")
def library(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("dups")
    _photo_set(root / "photos")
    lib = Library(root / "home", device="cpu")
    report = ingest_paths(lib, [root / "photos"], IngestConfig(batch_size=8, workers=0), model=tiny_model)
    assert report.duplicates == 2 and not report.failed
    return lib


def _brute_force(lib: Library, threshold: float) -> set[frozenset[str]]:
    """All pairs of stored vectors, their components by plain graph search, aliases added."""
    ids, vectors = next(lib.store.iter_embeddings(lib.model_info().dim, batch=10_000))
    dist = np.sqrt(np.maximum(0.0, 2.0 - 2.0 * (vectors.astype(np.float64) @ vectors.T.astype(np.float64))))
    near = (dist <= threshold) & ~np.eye(len(ids), dtype=bool)
    seen, groups = set(), []
    for start in range(len(ids)):
        if start in seen:
            continue
        stack, comp = [start], set()
        while stack:
            node = stack.pop()
            if node in comp:
                continue
            comp.add(node)
            stack.extend(np.flatnonzero(near[node]).tolist())
        seen |= comp
        groups.append({int(ids[c]) for c in comp})
    aliases = lib.store.alias_map()
    records = lib.store.get_images(ids.tolist())
    out = set()
    for group in groups:
        paths = {records[i].path for i in group} | {a for i in group for a in aliases.get(i, [])}
        if len(paths) > 1:
            out.add(frozenset(paths))
    return out


def _thresholds(lib: Library) -> list[float]:
    """Thresholds between two distinct pairwise distances (no pair sits on one), from tight to loose."""
    _, vectors = next(lib.store.iter_embeddings(lib.model_info().dim, batch=10_000))
    dist = np.sqrt(np.maximum(0.0, 2.0 - 2.0 * (vectors.astype(np.float64) @ vectors.T.astype(np.float64))))
    values = np.unique(np.round(dist[np.triu_indices(len(vectors), 1)], 5))
    out = []
    for q in (0.02, 0.1, 0.3, 0.6):
        i = int(q * (len(values) - 1))
        if values[i + 1] - values[i] > 2e-4:
            out.append(float((values[i] + values[i + 1]) / 2))
    assert len(out) >= 3
    return out


def _groups(report) -> set[frozenset[str]]:
    return {frozenset(g.paths) for g in report.groups}


def test_grouping_equals_the_brute_force_reference(library):
    for t in _thresholds(library):
        expected = _brute_force(library, t)
        for neighbours in (1, 2, 8):  # a shallow first search must be deepened, never truncated
            got = find_duplicates(library, DuplicateConfig(threshold=t, neighbours=neighbours, batch=7))
            assert _groups(got) == expected, (t, neighbours)
            assert got.photos == library.store.count_embeddings()


def test_past_flat_every_distance_is_the_exact_one(tmp_path, tiny_model):
    # A compressed index scores approximately; the pairs it reports must carry the stored vectors'
    # exact distance (re-ranked), so a threshold means the same at every rung.
    from ingest.reindex import reindex_library

    _photo_set(tmp_path / "photos")
    lib = Library(tmp_path / "home", device="cpu")
    ingest_paths(lib, [tmp_path / "photos"], IngestConfig(batch_size=8, workers=0), model=tiny_model)
    reindex_library(lib, factory="IVF2,SQ4")
    index = lib.open_index()
    assert not index.exact_scores
    ids, vectors = next(lib.store.iter_embeddings(lib.model_info().dim, batch=10_000))
    index.set_search_parameters("nprobe=2")
    approx, _ = index.search(vectors, 2)
    exact = np.sort(vectors @ vectors.T, axis=1)[:, ::-1][:, :2]
    assert np.abs(approx - exact).max() > 1e-4  # the index's own scores are not exact ...
    by_id = dict(zip(ids.tolist(), vectors.astype(np.float64)))
    report = find_duplicates(lib, DuplicateConfig(threshold=1.0))
    checked = 0
    for group in report.groups:
        for member in group.members:
            others = {o.id for o in group.members} - {member.id}
            if member.identical_to is not None or len([o for o in group.members if o.id == member.id]) > 1:
                continue  # its nearest is a byte-identical copy: 0.0 by definition
            best = min(np.sqrt(max(0.0, 2 - 2 * by_id[member.id] @ by_id[o])) for o in others)
            assert abs(member.nearest - best) < 1e-5, (member, best)  # ... the reported ones are
            checked += 1
    assert checked >= 4
    lib.close()


def test_union_find_fallback_equals_scipy(library, monkeypatch):
    t = _thresholds(library)[-1]
    with_scipy = _groups(find_duplicates(library, DuplicateConfig(threshold=t)))
    monkeypatch.setattr(duplicates, "_components", duplicates._union_find)
    assert _groups(find_duplicates(library, DuplicateConfig(threshold=t))) == with_scipy


def test_connected_groups_joins_chains_and_drops_singletons():
    a = np.asarray([5, 9, 20, 7], np.int64)
    b = np.asarray([9, 11, 21, 7], np.int64)
    got = sorted(g.tolist() for g in connected_groups(a, b))
    assert got == [[5, 9, 11], [20, 21]]


def test_identical_copies_are_a_group_at_distance_zero(library):
    report = find_duplicates(library, DuplicateConfig(threshold=0.0))
    by_path = {m.path: m for g in report.groups for m in g.members}
    copy = next(p for p in by_path if p.endswith("p07 copy.png"))
    assert by_path[copy].identical_to.endswith("p07.png") and by_path[copy].nearest == 0.0
    assert any({p.rsplit("/", 1)[-1] for p in g.paths} == {"p08.png", "p08 copy.png"} for g in report.groups)


def test_bad_threshold_is_refused():
    with pytest.raises(Exception, match="threshold"):
        DuplicateConfig(threshold=float("nan"))
    with pytest.raises(Exception, match="threshold"):
        DuplicateConfig(threshold=-1)


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_duplicates_json_text_and_sheet(library, tmp_path):
    home = library.paths.home
    t = _thresholds(library)[1]
    # the global options work after the command name too
    r = _run("duplicates", "--home", home, "--device", "cpu", "--threshold", t, "--json")
    assert r.exit_code == 0, r.output
    groups = [json.loads(line) for line in r.stdout.splitlines()]
    assert {frozenset(m["path"] for m in g["members"]) for g in groups} == _brute_force(library, t)
    assert all(g["threshold"] == t and g["size"] == len(g["members"]) for g in groups)
    assert any("identical_to" in m for g in groups for m in g["members"])

    sheet = tmp_path / "dups.png"
    r = _run("--home", home, "duplicates", "--threshold", t, "--sheet", sheet)
    assert r.exit_code == 0, r.output
    assert "group 1:" in r.stdout and f"{len(groups)} group(s)" in r.stdout
    assert sheet.exists() and Image.open(sheet).size[0] > 100
    assert f"contact sheet: {sheet}" in r.stderr


def test_cli_duplicates_default_threshold_is_the_calibrated_one(library):
    r = _run("duplicates", "--help")
    assert f"default {duplicates.DEFAULT_DUPLICATE_THRESHOLD:g}" in r.output
    r = _run("--home", library.paths.home, "duplicates", "--json")
    assert r.exit_code == 0
    assert all(json.loads(line)["threshold"] == duplicates.DEFAULT_DUPLICATE_THRESHOLD for line in r.stdout.splitlines())


def test_cli_duplicates_of_an_empty_home_fails_without_creating_it(tmp_path):
    r = _run("--home", tmp_path / "nothing", "duplicates")
    assert r.exit_code == 1 and "engine ingest" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "nothing").exists()
    r = _run("--home", tmp_path / "nothing", "duplicates", "--threshold", "-1")
    assert r.exit_code == 2
