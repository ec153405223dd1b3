"""Every command stays usable at a million rows (issue 11, item 6): doctor and prune read the known
paths in bounded slices and count in SQL, never a list of every row. Each test spies on the batch
size of the reads (and makes the old whole-library reads fail), so none of them depends on
timing; each result is checked against a brute-force reference."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import event

from db import MetadataStore
from engine.files import find_images
from engine.library import Library
from engine.preprocess import image_suffixes
from ingest.doctor import check_library
from ingest.pipeline import IngestConfig, IngestReport, ingest_paths
from ingest.presence import UNMOUNTED, IndexedCounts, split_missing
from ingest.prune import prune_roots
from tests.util import make_image

CFG = IngestConfig(batch_size=4, workers=0)

# names a library may hold: nested folders, a sibling that shares the prefix ("/p0" beside "/p"),
# the folder's own path, and names that are not valid UTF-8 (kept as bytes in SQLite)
NAMES = ["/p", "/p/a.jpg", "/p/b.jpg", "/p/sub/c.jpg", "/p/sub/deep/d.jpg", "/p/caf\udce9.jpg", "/p/\udcff/e.jpg",
         "/p0/x.jpg", "/p.jpg", "/q/y.jpg", "/pp/z.jpg", "/p/z.jpg", "/p/é.jpg"]
ALIASES = ["/p/copy.jpg", "/p/sub/copy\udcfe.jpg", "/q/copy.jpg", "/p0/copy.jpg"]


def _row(path: str, i: int) -> dict:
    return {"path": path, "content_hash": f"{i:064x}", "bytes": 10 + i, "mtime": 1.5 + i, "width": 4, "height": 3,
            "format": "JPEG"}


def _inside(path: str, folder: str, itself: bool = True) -> bool:
    """The reference: a plain string comparison."""
    return (itself and path == folder) or path.startswith(folder.rstrip("/") + "/")


@pytest.fixture()
def store(tmp_path):
    store = MetadataStore.for_file(tmp_path / "l.db")
    ids = store.insert_rows([_row(p, i) for i, p in enumerate(NAMES)])
    store.write_batch([], aliases=[{"path": p, "bytes": 1, "mtime": 1.0, "image_id": ids[i]}
                                   for i, p in enumerate(ALIASES)])
    yield store
    store.close()


class SelectSpy:
    """Records the parameters of every SELECT the store runs, to check the LIMIT of each read."""

    def __init__(self, store: MetadataStore):
        self.statements: list[tuple[str, tuple]] = []
        self._engine = store._engine
        event.listen(self._engine, "before_cursor_execute", self._seen)

    def _seen(self, _conn, _cursor, statement, parameters, _context, _many) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            self.statements.append((statement, tuple(parameters or ())))

    def close(self) -> None:
        event.remove(self._engine, "before_cursor_execute", self._seen)


@pytest.mark.parametrize("chunk", [1, 2, 3, 100])
def test_iter_files_under_streams_every_path_inside_in_bounded_slices(store, chunk):
    spy = SelectSpy(store)
    slices = list(store.iter_files_under("/p", chunk))
    spy.close()
    got = [f.path for part in slices for f in part]
    expected = sorted(p for p in NAMES + ALIASES if _inside(p, "/p"))
    assert sorted(got) == expected and len(got) == len(set(got))  # non-UTF-8 names too, nothing twice
    assert all(1 <= len(part) <= chunk for part in slices)
    # every read is bounded by the chunk: a LIMIT on every statement, with the chunk as its value
    assert spy.statements and all("LIMIT" in sql.upper() and chunk in params for sql, params in spy.statements)
    aliases = {f.path for part in slices for f in part if f.is_alias}
    assert aliases == {p for p in ALIASES if _inside(p, "/p")}
    by_path = {f.path: f for part in slices for f in part}
    assert by_path["/p/sub/c.jpg"].bytes == 10 + NAMES.index("/p/sub/c.jpg")
    assert by_path["/p/copy.jpg"].image_id == by_path["/p"].image_id  # an alias names its image row


def test_count_under_is_the_reference_count(store):
    for folder in ("/p", "/p/sub", "/p/\udcff", "/p0", "/q", "/nowhere", "/"):
        for itself in (False, True):
            expected = sum(_inside(p, folder, itself) for p in NAMES + ALIASES)
            assert store.count_under(folder, itself=itself) == expected, (folder, itself)


def test_file_sizes_are_the_distinct_sizes_in_sql(store):
    """What the service's upload check needs (every size a known file has), without loading every
    row as ``file_stats`` does."""
    spy = SelectSpy(store)
    sizes = store.file_sizes()
    spy.close()
    assert sizes.dtype == np.int64
    assert sizes.tolist() == sorted({s for _, s, _ in store.file_stats()})
    assert len(spy.statements) == 1 and "UNION" in spy.statements[0][0].upper()  # one query, distinct in SQL


def test_split_missing_from_counts_agrees_with_the_list_rule(tmp_path):
    """Seeded random trees: the rule fed with counts (what doctor and prune now pass) gives the
    same answer as fed with every indexed path (what they passed before)."""
    rng = random.Random(7)
    for trial in range(25):
        root = tmp_path / f"t{trial}"
        indexed = []
        for f in range(rng.randint(1, 4)):
            folder = root / f"f{f}" / ("deep" if rng.random() < 0.3 else "")
            for i in range(rng.randint(1, 4)):
                indexed.append(os.path.normpath(folder / f"{i}.png"))
        missing = [p for p in indexed if rng.random() < 0.6]
        for path in indexed:
            if path not in missing:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                Path(path).write_bytes(b"x")
        if rng.random() < 0.5:
            (root / "f0").mkdir(parents=True, exist_ok=True)  # an empty folder: an unmounted drive?
        ordered = sorted(indexed)
        counts = IndexedCounts(len(ordered), lambda folder: sum(_inside(p, folder, False) for p in ordered))
        assert split_missing(missing, counts) == split_missing(missing, indexed)


# -- doctor and prune on a real library -----------------------------------------------------------
@pytest.fixture()
def library(tmp_path, tiny_model):
    photos = tmp_path / "photos"
    paths = [make_image(photos / f"d{i % 3}" / f"img_{i}.png", seed=700 + i) for i in range(9)]
    lib = Library(tmp_path / "home", device="cpu")
    ingest_paths(lib, [photos], CFG, model=tiny_model)
    yield lib, photos, paths
    lib.close()


def _forbid_whole_reads(monkeypatch, store: MetadataStore) -> None:
    """The reads that load every known path at once fail, as they would run out of memory at scale."""
    def whole(*_args, **_kwargs):
        raise AssertionError("a whole-library read")

    for name in ("file_stats", "iter_paths", "paths_under"):
        monkeypatch.setattr(store, name, whole)


def _spy_slices(monkeypatch, store: MetadataStore, name: str) -> list[int]:
    """Record the size of every slice ``store.<name>`` yields, forcing slices of 2."""
    sizes: list[int] = []
    real = getattr(store, name)

    def spied(*args, **kwargs):
        if name == "iter_files":
            args, kwargs = (), {"chunk": 2}
        else:
            args, kwargs = args[:1], {"chunk": 2}
        for part in real(*args, **kwargs):
            sizes.append(len(part))
            yield part

    monkeypatch.setattr(store, name, spied)
    return sizes


def test_doctor_streams_the_known_paths(library, monkeypatch):
    lib, _, paths = library
    paths[0].unlink()  # gone: one of three in its folder
    store = lib.store
    _forbid_whole_reads(monkeypatch, store)
    sizes = _spy_slices(monkeypatch, store, "iter_files")
    report = check_library(lib)
    assert {f.code for f in report.problems} == {"files-missing"}
    assert sizes and max(sizes) <= 2 and sum(sizes) == 9  # every known path, two at a time
    sizes.clear()
    report = check_library(lib, repair=True)
    assert report.ok, report.lines()
    assert any("dropped 1 file" in a for a in report.actions), report.actions
    assert lib.store.count() == 8 and str(paths[0]) not in lib.store.lookup_paths([str(paths[0])])
    assert sizes and max(sizes) <= 2


def test_doctor_repair_keeps_an_unmounted_folder_counting_in_sql(library, monkeypatch):
    lib, photos, paths = library
    for path in paths:
        if path.parent.name == "d1":
            path.unlink()  # d1 is now an empty folder: every file of it missing at once
    store = lib.store
    _forbid_whole_reads(monkeypatch, store)
    report = check_library(lib, repair=True)
    assert any("kept 3 missing files" in a for a in report.actions), report.actions
    assert store.count() == 9


def test_prune_streams_the_known_paths_under_the_root(library, monkeypatch):
    lib, photos, paths = library
    paths[1].unlink()
    paths[4].unlink()
    store = lib.store
    root = str(photos / "d1")
    found = find_images([root], image_suffixes())
    _forbid_whole_reads(monkeypatch, store)
    sizes = _spy_slices(monkeypatch, store, "iter_files_under")
    report = IngestReport()
    gone = prune_roots(lib, [root], found, report)
    assert report.removed == 2 and report.prune_kept == [] and len(gone) == 2
    assert sizes and max(sizes) <= 2 and sum(sizes) == 3  # d1's three paths, never the others
    assert store.count() == 7
    assert not store.lookup_paths([str(paths[1]), str(paths[4])])
    # a subfolder that holds no file any more, all its files missing at once: kept, counted in SQL
    for path in paths:
        if path.parent.name == "d2":
            path.unlink()
    report = IngestReport()
    assert prune_roots(lib, [str(photos)], find_images([str(photos)], image_suffixes()), report) == []
    assert report.prune_kept == [(str(photos / "d2"), UNMOUNTED, 3)] and store.count() == 7


def test_prune_forgets_a_gone_file_whose_name_is_not_utf8(library):
    """A name that is not valid UTF-8 is stored as bytes (see FsPath): the streamed range covers
    it too, so it is pruned like any other (the old whole-list read of the root missed it)."""
    lib, photos, _ = library
    odd = photos / "d1" / os.fsdecode(b"caf\xe9.png")
    make_image(odd, seed=42)
    ingest_paths(lib, [photos / "d1"], CFG)
    assert str(odd) in lib.store.lookup_paths([str(odd)])
    odd.unlink()
    report = IngestReport()
    gone = prune_roots(lib, [str(photos / "d1")], find_images([str(photos / "d1")], image_suffixes()), report)
    assert report.removed == 1 and len(gone) == 1
    assert not lib.store.lookup_paths([str(odd)])
