"""``engine query``: filters that keep the k best (checked against a brute-force reference on
Flat and HNSW indexes), ``--threshold`` as a distance filter, ``--label``, ``--exclude-self``,
``--paths``, ``--sheet`` and aliases listed with their hit."""

from __future__ import annotations

import json
import shutil
from datetime import datetime

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from engine.cli import main
from engine.filters import HitFilter
from engine.library import Library
from engine.query import search_library
from ingest.pipeline import IngestConfig, ingest_paths
from tests.util import make_image

CAMERAS = ["Canon EOS 5D", "NIKON D70", None]


def _photo(path, seed, n):
    """A seeded JPEG with EXIF: capture time n months after 2019-01 (none for every fifth), and a
    camera by turns (Canon, Nikon, none)."""
    make_image(path.with_suffix(".png"), seed, size=(40, 32))
    img = Image.open(path.with_suffix(".png")).convert("RGB")
    path.with_suffix(".png").unlink()
    exif = Image.Exif()
    if n % 5:
        exif[0x0132] = f"{2019 + n // 12}:{n % 12 + 1:02d}:15 10:00:00"
    camera = CAMERAS[n % 3]
    if camera:
        exif[0x010F], exif[0x0110] = camera.split()[0], camera
    img.save(path, quality=95, exif=exif)


@pytest.fixture(scope="module")
def photos(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("q")
    for n in range(36):
        _photo(root / "photos" / ("a" if n % 2 else "b") / f"{n:02d}.jpg", 300 + n, n)
    (root / "photos" / "c").mkdir()
    shutil.copy(root / "photos" / "a" / "01.jpg", root / "photos" / "c" / "copy of 01.jpg")
    lib = Library(root / "home", device="cpu")
    report = ingest_paths(lib, [root / "photos"], IngestConfig(batch_size=8, workers=0), model=tiny_model)
    assert report.added == 36 and report.duplicates == 1
    lib.close()
    return root


@pytest.fixture(params=["Flat", "HNSW32"])
def library(request, photos, tmp_path):
    """The module's library, copied, with the index type of the parameter."""
    home = tmp_path / "home"
    shutil.copytree(photos / "home", home)
    lib = Library(home, device="cpu")
    if request.param != "Flat":
        lib.store.set_meta("index_factory", request.param)
        lib.rebuild_index(request.param)
    return lib


def _reference(lib: Library, query: np.ndarray, k: int, hit_filter: HitFilter, exclude=()) -> list[int]:
    """Brute force: every stored vector and record, the filter applied in Python, the k nearest."""
    ids, vectors = next(lib.store.iter_embeddings(lib.model_info().dim, batch=10_000))
    records = lib.store.get_images(ids.tolist())
    aliases = lib.store.alias_map()
    dist = np.sqrt(np.maximum(0.0, 2.0 - 2.0 * vectors.astype(np.float64) @ query.astype(np.float64)))
    keep = []
    for i, d in zip(ids.tolist(), dist.tolist()):
        rec = records[i]
        files = [rec.path, *aliases.get(i, [])]
        if hit_filter.max_distance is not None and d > hit_filter.max_distance:
            continue
        if hit_filter.taken_after and not (rec.taken_at and rec.taken_at >= hit_filter.taken_after):
            continue
        if hit_filter.taken_before and not (rec.taken_at and rec.taken_at < hit_filter.taken_before):
            continue
        if hit_filter.camera and hit_filter.camera.lower() not in (rec.camera or "").lower():
            continue
        if hit_filter.under and not any(f.startswith(u + "/") for f in files for u in hit_filter.under):
            continue
        if i in exclude:
            continue
        keep.append((d, i))
    return [i for _, i in sorted(keep)[:k]]


FILTERS = [
    HitFilter(camera="canon"),
    HitFilter(camera="nikon", taken_after=datetime(2020, 1, 1)),
    HitFilter(taken_before=datetime(2019, 8, 1)),
    HitFilter(taken_after=datetime(2019, 3, 1), taken_before=datetime(2021, 1, 1), camera="EOS"),
]


def test_filters_keep_the_k_best_that_pass(library, photos):
    query = photos / "photos" / "b" / "00.jpg"
    [own] = library.store.get_embeddings([library.store.lookup_paths([str(query)])[str(query)].image_id],
                                        library.model_info().dim)[1]
    filters = FILTERS + [HitFilter(under=(str(photos / "photos" / "a"),)),
                         HitFilter(under=(str(photos / "photos" / "c"),), camera="canon")]
    for hit_filter in filters:
        for k in (1, 3, 8):
            [result] = search_library(library, [query], k, hit_filter=hit_filter)
            expected = _reference(library, own, k, hit_filter)
            assert [h.id for h in result.hits] == expected, (hit_filter, k)
            assert len(result.hits) == min(k, len(_reference(library, own, 99, hit_filter)))
            assert [h.rank for h in result.hits] == list(range(1, len(result.hits) + 1))


def test_threshold_filters_by_distance_and_exclude_self(library, photos):
    query = photos / "photos" / "a" / "03.jpg"
    [everything] = search_library(library, [query], 36)
    d = everything.hits[6].distance + 1e-4  # seven hits lie within
    [near] = search_library(library, [query], 20, hit_filter=HitFilter(max_distance=d))
    assert [h.id for h in near.hits] == [h.id for h in everything.hits[:7]]
    [own] = search_library(library, [query], 5, exclude_self=True)
    assert everything.hits[0].path == str(query) and everything.hits[0].id not in [h.id for h in own.hits]
    assert [h.id for h in own.hits] == [h.id for h in everything.hits[1:6]]  # still five


def test_exclude_self_of_an_alias_path_leaves_out_its_image(library, photos):
    alias = photos / "photos" / "c" / "copy of 01.jpg"
    [result] = search_library(library, [alias], 3, exclude_self=True)
    assert all(not h.path.endswith("01.jpg") for h in result.hits) and len(result.hits) == 3


def _run(*args, env=None):
    return CliRunner(env=env).invoke(main, [str(a) for a in args])


def test_cli_query_options(photos, tmp_path):
    home = photos / "home"
    img = photos / "photos" / "a" / "01.jpg"
    r = _run("query", "--home", home, "--device", "cpu", img, "-k", 4, "--json")  # global options after the name
    assert r.exit_code == 0, r.output
    hits = json.loads(r.stdout)["hits"]
    assert hits[0]["path"] == str(img) and hits[0]["aliases"] == [str(photos / "photos" / "c" / "copy of 01.jpg")]
    assert "similar" not in hits[0]

    r = _run("--home", home, "query", img, "-k", 4)
    assert r.exit_code == 0 and "= " + str(photos / "photos" / "c" / "copy of 01.jpg") in r.stdout

    r = _run("--home", home, "query", img, "-k", 4, "--paths")
    assert r.exit_code == 0 and r.stdout.splitlines() == [h["path"] for h in hits]

    r = _run("--home", home, "query", img, "-k", 4, "--label", "--json")
    assert r.exit_code == 0 and all(isinstance(h["similar"], bool) for h in json.loads(r.stdout)["hits"])

    limit = hits[1]["distance"] + 1e-4
    r = _run("--home", home, "query", img, "-k", 4, "--threshold", limit, "--json")
    assert r.exit_code == 0 and [h["id"] for h in json.loads(r.stdout)["hits"]] == [h["id"] for h in hits[:2]]

    r = _run("--home", home, "query", img, "-k", 4, "--exclude-self", "--camera", "nikon", "--taken-after",
             "2019-06-01", "--under", photos / "photos", "--json")
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)["hits"]
    assert got and all("NIKON" in h["camera"] and h["taken_at"] >= "2019-06-01" for h in got)
    assert all(h["path"] != str(img) for h in got)

    r = _run("--home", home, "query", img, "--camera", "no such camera")
    assert r.exit_code == 0 and "no hit passes the filters" in r.stdout


def test_cli_threshold_takes_a_number_and_never_an_image(photos):
    home, img = photos / "home", photos / "photos" / "a" / "01.jpg"
    r = _run("--home", home, "query", "--threshold", img)  # the image path is not a distance
    assert r.exit_code == 2 and "must be a number" in r.output
    r = _run("--home", home, "query", img, "--threshold")
    assert r.exit_code == 2 and "requires an argument" in r.output
    r = _run("--home", home, "query", img, "--taken-after", "last tuesday")
    assert r.exit_code == 2 and "taken-after" in r.output
    r = _run("--home", home, "query", img, "--taken-after", "2022-01-01", "--taken-before", "2021-01-01")
    assert r.exit_code == 1 and "no photo can pass both" in r.output


def test_cli_sheet_draws_every_query_of_a_batch(photos, tmp_path):
    home = photos / "home"
    one, three = tmp_path / "one.png", tmp_path / "three.png"
    r = _run("--home", home, "query", photos / "photos" / "a" / "01.jpg", "-k", 3, "--sheet", one)
    assert r.exit_code == 0 and f"contact sheet: {one}" in r.stderr
    batch = [photos / "photos" / "a" / f"{n:02d}.jpg" for n in (1, 3, 5)]
    r = _run("--home", home, "query", *batch, "-k", 3, "--sheet", three, "--paths")
    assert r.exit_code == 0 and len(r.stdout.splitlines()) == 9
    assert Image.open(three).size[1] > 2 * Image.open(one).size[1]  # a row of tiles per query


def test_filtered_search_survives_faiss_torch_utils(photos):
    """pytorch-metric-learning imports faiss.contrib.torch_utils, which replaces Index.search in the
    whole process with a version without search parameters: the id filter must not depend on it."""
    import faiss.contrib.torch_utils  # noqa: F401

    lib = Library(photos / "home", device="cpu", read_only=True)
    [result] = search_library(lib, [photos / "photos" / "a" / "01.jpg"], 3, hit_filter=HitFilter(camera="canon"))
    assert len(result.hits) == 3 and all("Canon" in h.record.camera for h in result.hits)
