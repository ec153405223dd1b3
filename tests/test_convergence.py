"""Any sequence of renames, copies, edits and deletions between two ingests converges: every image
file on disk is indexed exactly once (a row or an alias), byte-identical files are aliases of one
row, every row and alias on disk records the bytes it holds, a photo whose file moved keeps its id
and vector, and no transaction ever fails (the FOREIGN KEY error of issue 9, item 5).

The property test drives seeded random sequences of operations on a small tree and checks each
ingest against a brute-force model of the disk (``_check``)."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from db.vectors import TOLERANCE
from engine.cli import main
from engine.library import Library
from ingest.pipeline import IngestConfig, ingest_paths
from ingest.presence import UNMOUNTED
from tests.util import make_image

CFG = IngestConfig(batch_size=2, workers=0)


def _digest(path: Path) -> str:
    return hashlib.blake2b(path.read_bytes(), digest_size=32).hexdigest()


def _rows(lib: Library) -> tuple[dict[int, tuple[str, str, int, float]], dict[str, int]]:
    """(image id -> (path, content hash, bytes, mtime), alias path -> image id) as stored."""
    with sqlite3.connect(lib.paths.database) as conn:  # read raw, not through the code under test
        rows = {i: (os.fsdecode(p), h, b, m)
                for i, p, h, b, m in conn.execute("SELECT id, path, content_hash, bytes, mtime FROM images")}
        aliases = {os.fsdecode(p): i for p, i in conn.execute("SELECT path, image_id FROM aliases")}
    return rows, aliases


def _disk(root: Path) -> dict[str, str]:
    return {str(p): _digest(p) for p in sorted(root.rglob("*.png"))}


class _Embeddings:
    """The encoder's vector for each content hash, computed once from a file holding it."""

    def __init__(self, lib: Library):
        self.lib = lib
        self.cache: dict[str, np.ndarray] = {}

    def of(self, content: str, path: str) -> np.ndarray:
        if content not in self.cache:
            from engine.embedding import embed_files

            self.cache[content] = embed_files(self.lib.encoder(), [path], batch_size=1, workers=0).embeddings[0]
        return self.cache[content]


def _check(lib: Library, root: Path, before: dict[int, tuple[str, str, int, float]], report, prune: bool,
           vectors: _Embeddings, keeps_ids: bool = True) -> None:
    """The invariant after an ingest of ``root`` (every image file under it readable):

    1. a path is recorded at most once (never both a row's path and an alias);
    2. every image file on disk is recorded (a row or an alias);
    3. a row or alias on disk records its file's bytes (row: content hash; alias: its row's hash)
       and its size and mtime (so the next run is a no-op);
    4. an alias on disk points to a row whose file is on disk (never a dead path);
    5. the rows on disk hold distinct contents, and no row whose file is gone holds content that is
       on disk (such a photo moved: its row must have followed it);
    6. with --prune nothing recorded is gone, unless prune refused (then every recorded path under
       the root is missing, or no image is left on disk);
    7. ids are kept: content indexed before the run and still on disk is held by one of the rows
       that held it before; only content new to the library was embedded. (Not after an ingest of
       one folder only: a photo whose file there was overwritten, its bytes now only in a folder
       that was not walked, is forgotten with the old content; the next full ingest embeds it anew.)
    8. image ids == stored-vector ids == index ids, and each vector is the encoder's for its bytes.
    """
    disk = _disk(root)
    rows, aliases = _rows(lib)
    row_paths = {p: i for i, (p, *_rest) in rows.items()}
    assert len(row_paths) == len(rows)
    assert not set(row_paths) & set(aliases), "a path recorded twice"  # 1
    missing = set(disk) - set(row_paths) - set(aliases)
    assert not missing, f"files on disk not indexed: {sorted(missing)}"  # 2
    for path, image_id in row_paths.items():  # 3
        if path in disk:
            _, content, size, mtime = rows[image_id]
            st = os.stat(path)
            assert content == disk[path], f"row {path} records other bytes"
            assert (size, mtime) == (st.st_size, st.st_mtime)
    for path, image_id in aliases.items():
        assert image_id in rows, "alias of a deleted row"
        if path in disk:
            assert disk[path] == rows[image_id][1], f"alias {path} holds other bytes than its row"
            assert rows[image_id][0] in disk, f"alias {path} points to a row whose file is gone"  # 4
    on_disk = [rows[i][1] for p, i in row_paths.items() if p in disk]
    assert len(on_disk) == len(set(on_disk)), "byte-identical files indexed as two rows"  # 5
    gone_rows = [p for p, i in row_paths.items() if p not in disk and rows[i][1] in set(disk.values())]
    assert not gone_rows, f"a moved photo left behind at {gone_rows}"
    recorded = set(row_paths) | set(aliases)
    if prune:  # 6
        if getattr(report, "prune_kept", None):  # only an empty folder (an unmounted drive) is kept
            emptied = all(not os.listdir(folder) for folder, why, _ in report.prune_kept if why == UNMOUNTED)
            assert emptied or not recorded & set(disk), report.prune_kept
        else:
            assert recorded <= set(disk), f"--prune left {sorted(recorded - set(disk))}"
    before_by_content: dict[str, set[int]] = {}
    for image_id, (_, content, _, _) in before.items():
        before_by_content.setdefault(content, set()).add(image_id)
    for path, image_id in row_paths.items():  # 7
        content = rows[image_id][1]
        if keeps_ids and path in disk and content in before_by_content:
            assert image_id in before_by_content[content], f"{path} re-embedded instead of moved"
    new_contents = {c for c in disk.values() if c not in before_by_content}
    assert report.embedded == len(new_contents) or not keeps_ids and report.embedded >= len(new_contents)
    ids = sorted(rows)  # 8
    assert sorted(lib.store.embedding_ids().tolist()) == ids
    assert sorted(lib.open_index().ids().tolist()) == ids
    got_ids, stored = lib.store.get_embeddings(ids, lib.encoder().dim)
    for image_id, vector in zip(got_ids.tolist(), stored):
        path, content = rows[image_id][:2]
        if path in disk:
            np.testing.assert_allclose(vector, vectors.of(content, path), atol=TOLERANCE)  # stored as float16


class _Tree:
    """A small photo tree under ``root`` changed by seeded random operations. Every write gets an
    mtime of its own, so size and mtime always tell a changed file (``doctor --deep`` covers the
    case where they do not)."""

    FOLDERS = ("a", "b", "b/c")

    def __init__(self, root: Path, rng: random.Random):
        self.root, self.rng = root, rng
        self.clock = itertools.count(1_600_000_000)
        self.seeds = itertools.count(10_000)
        self.names = itertools.count()

    def files(self) -> list[Path]:
        return sorted(self.root.rglob("*.png"))

    def fresh_path(self) -> Path:
        return self.root / self.rng.choice(self.FOLDERS) / f"f{next(self.names)}.png"

    def write(self, path: Path, seed: int | None = None) -> None:
        make_image(path, next(self.seeds) if seed is None else seed, size=(24, 20))
        self._stamp(path)

    def _stamp(self, path: Path) -> None:
        t = next(self.clock)
        os.utime(path, (t, t))

    def apply(self) -> str:
        files = self.files()
        ops = ["create"] + (["rename", "copy", "edit", "delete", "keep-and-edit", "copy-then-edit",
                             "overwrite-with-copy", "recreate-old"] if files else [])
        ops += ["swap", "move-folder"] if len(files) > 1 else []
        op = self.rng.choice(ops)
        pick = self.rng.choice(files) if files else None
        if op == "create":
            self.write(self.fresh_path())
        elif op == "rename":
            target = self.fresh_path()
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(pick, target)
        elif op == "copy":
            target = self.fresh_path()
            target.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copy2 if self.rng.random() < 0.5 else shutil.copyfile)(pick, target)
            self._stamp(target) if self.rng.random() < 0.5 else None
        elif op == "edit":
            self.write(pick)
        elif op == "delete":
            pick.unlink()
        elif op == "keep-and-edit":  # issue 9 item 5: the original under a new name, an edit under the old
            target = self.fresh_path()
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(pick, target)
            self.write(pick)
        elif op == "copy-then-edit":
            target = self.fresh_path()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(pick, target)
            self.write(pick)
        elif op == "overwrite-with-copy":
            other = self.rng.choice(files)
            if other != pick:
                shutil.copyfile(other, pick)
                self._stamp(pick)
        elif op == "recreate-old":  # bytes seen before (maybe a gone photo) come back at a new path
            self.write(self.fresh_path(), seed=self.rng.randrange(10_000, next(self.seeds)))
        elif op == "swap":
            a, b = self.rng.sample(files, 2)
            tmp = a.with_name(a.name + ".swap")
            os.rename(a, tmp)
            os.rename(b, a)
            os.rename(tmp, b)
        elif op == "move-folder":
            folder = self.root / self.rng.choice(self.FOLDERS[:2])
            if folder.exists():
                os.rename(folder, self.root / f"moved{next(self.names)}")
        return op


@pytest.mark.parametrize("seed", range(4))
def test_random_changes_between_ingests_converge(tmp_path, tiny_model, seed):
    _converge(tmp_path, tiny_model, seed, rounds=8)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(100, 140))
def test_random_changes_converge_longer(tmp_path, tiny_model, seed):
    _converge(tmp_path, tiny_model, seed, rounds=14)


def _converge(tmp_path: Path, tiny_model: str, seed: int, rounds: int) -> None:
    rng = random.Random(seed)
    root = tmp_path / "photos"
    tree = _Tree(root, rng)
    for _ in range(5):
        tree.write(tree.fresh_path())
    lib = Library(tmp_path / "home", device="cpu")
    vectors = _Embeddings(lib)
    before: dict = {}
    history: list[str] = []
    for round_ in range(rounds):
        if round_:
            history += [tree.apply() for _ in range(rng.randint(1, 4))]
        prune = rng.random() < 0.5
        config = IngestConfig(batch_size=rng.choice([1, 2, 3, 8]), workers=0, prune=prune)
        part = root / rng.choice(_Tree.FOLDERS)
        first = None  # an ingest of one folder first: the rows elsewhere are not walked
        if round_ and rng.random() < 0.3 and part.exists():
            history.append(f"ingest {part.relative_to(root)}{' --prune' if prune else ''}")
            first = ingest_paths(lib, [part], config)
            assert not first.failed, (first.failed, history)
        history.append(f"ingest{' --prune' if prune else ''} (batch {config.batch_size})")
        report = ingest_paths(lib, [root], config, model=tiny_model if round_ == 0 else None)
        assert not report.failed, (report.failed, history)
        report.embedded += first.embedded if first else 0
        try:
            _check(lib, root, before, report, prune, vectors, keeps_ids=first is None)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nafter: {history}") from None
        before = _rows(lib)[0]
    again = ingest_paths(lib, [root], CFG)  # converged: nothing left to do
    assert (again.embedded, again.moved, again.added, again.updated, again.duplicates) == (0, 0, 0, 0, 0)
    assert again.unchanged == len(tree.files())


def test_keep_original_under_new_name_and_save_edit_under_old(tmp_path, tiny_model):
    """Issue 9 item 5, exactly: ``FOREIGN KEY constraint failed`` on every run from then on."""
    photos = tmp_path / "photos"
    for i in range(4):
        make_image(photos / f"img_{i}.png", i)
    lib = Library(tmp_path / "home", device="cpu")
    ingest_paths(lib, [photos], CFG, model=tiny_model)
    old_id = lib.store.lookup_paths([str(photos / "img_2.png")])[str(photos / "img_2.png")].image_id
    os.rename(photos / "img_2.png", photos / "img_2_original.png")
    make_image(photos / "img_2.png", 99)  # the edit, saved under the old name
    report = ingest_paths(lib, [photos], CFG)
    assert (report.moved, report.added, report.embedded, report.failed) == (1, 1, 1, [])
    known = lib.store.lookup_paths([str(photos / "img_2_original.png"), str(photos / "img_2.png")])
    assert known[str(photos / "img_2_original.png")].image_id == old_id  # the photo moved, vector kept
    assert not known[str(photos / "img_2_original.png")].is_alias
    assert known[str(photos / "img_2.png")].image_id != old_id
    assert lib.store.count_aliases() == 0
    # copy a file, then edit the original: the copy carries the row on
    shutil.copy2(photos / "img_1.png", photos / "img_1_copy.png")
    make_image(photos / "img_1.png", 98)
    report = ingest_paths(lib, [photos], CFG)
    assert report.failed == [] and lib.store.count() == 6 and lib.store.count_aliases() == 0
    before = _rows(lib)[0]
    _check(lib, photos, before, ingest_paths(lib, [photos], CFG), False, _Embeddings(lib))


def test_rename_is_a_move_in_the_cli_summary(tmp_path, tiny_model):
    photos = tmp_path / "photos"
    for i in range(3):
        make_image(photos / f"img_{i}.png", i)
    home = tmp_path / "home"
    run = CliRunner().invoke
    assert run(main, ["--home", str(home), "ingest", str(photos), "--model", tiny_model, "--workers", "0"]).exit_code == 0
    (photos / "sub").mkdir()
    os.rename(photos / "img_0.png", photos / "sub" / "renamed.png")
    r = run(main, ["--home", str(home), "ingest", str(photos), "--workers", "0", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert (summary["moved"], summary["added"], summary["embedded"]) == (1, 0, 0)
    os.rename(photos / "img_1.png", photos / "sub" / "renamed_1.png")
    r = run(main, ["--home", str(home), "ingest", str(photos), "--workers", "0"])
    assert r.exit_code == 0 and "moved 1" in r.output
    # a query never answers with the old path
    r = run(main, ["--home", str(home), "query", str(photos / "sub" / "renamed.png"), "-k", "3", "--json"])
    paths = [h["path"] for h in json.loads(r.stdout)["hits"]]
    assert str(photos / "img_0.png") not in paths and str(photos / "sub" / "renamed.png") == paths[0]


def test_deleted_original_hands_its_row_to_a_copy_without_prune(tmp_path, tiny_model):
    """A gone file with a byte-identical copy on disk: the copy takes the row over (same id), so
    queries never return the dead path, with or without --prune."""
    photos = tmp_path / "photos"
    for i in range(3):
        make_image(photos / f"img_{i}.png", i)
    shutil.copy2(photos / "img_0.png", photos / "z_copy.png")
    lib = Library(tmp_path / "home", device="cpu")
    ingest_paths(lib, [photos], CFG, model=tiny_model)
    old_id = lib.store.lookup_paths([str(photos / "img_0.png")])[str(photos / "img_0.png")].image_id
    (photos / "img_0.png").unlink()
    report = ingest_paths(lib, [photos], CFG)
    assert (report.moved, report.embedded) == (1, 0)
    state = lib.store.lookup_paths([str(photos / "z_copy.png")])[str(photos / "z_copy.png")]
    assert (state.image_id, state.is_alias) == (old_id, False)
    assert lib.store.lookup_paths([str(photos / "img_0.png")]) == {}


@pytest.mark.parametrize("fault", ["batch-committed:1", pytest.param("commit:1", marks=pytest.mark.slow),
                                   pytest.param("batch-committed:2", marks=pytest.mark.slow)])
def test_ingest_of_moves_killed_at_a_commit_converges_on_rerun(tmp_path, tiny_model, engine_command,
                                                                subprocess_env, fault):
    """``kill -9`` inside the first transaction (moves, aliases: ``commit:1``), just after it
    (``batch-committed:1``, the index not yet saved) or after the first decoded batch: the rerun
    converges, ids kept."""
    import subprocess
    from types import SimpleNamespace

    photos = tmp_path / "photos"
    tree = _Tree(photos, random.Random(3))
    for i in range(6):
        tree.write(photos / f"img_{i}.png")
    home = tmp_path / "home"
    lib = Library(home, device="cpu")
    ingest_paths(lib, [photos], CFG, model=tiny_model)
    before = _rows(lib)[0]
    lib.close()
    (photos / "sub").mkdir()
    os.rename(photos / "img_0.png", photos / "sub" / "renamed.png")  # a move
    os.rename(photos / "img_1.png", photos / "sub" / "original.png")  # keep the original ...
    tree.write(photos / "img_1.png")  # ... and save an edit under the old name
    shutil.copy2(photos / "img_2.png", photos / "sub" / "copy.png")  # a copy
    tree.write(photos / "img_2.png")  # then an edit of the original
    (photos / "img_3.png").unlink()
    tree.write(photos / "new.png")
    cmd = [*engine_command, "--home", str(home), "--device", "cpu", "ingest", str(photos), "--batch-size", "1",
           "--workers", "0"]
    killed = subprocess.run(cmd, env=dict(subprocess_env, ENGINE_FAULT=fault), capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -9, killed.stderr
    rerun = subprocess.run(cmd, env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    lib = Library(home, device="cpu")
    rows = _rows(lib)[0]
    made = SimpleNamespace(embedded=sum(i not in before for i in rows), prune_kept=[])
    _check(lib, photos, before, made, False, _Embeddings(lib))
