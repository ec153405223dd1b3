"""``engine import``: the engine-shards/1 format (round trip, every hostile file refused with its
name and reason), the import itself (identity checks, rerun no-op, a bad shard refused whole),
kill -9 at any point then rerun (each row exactly once), and the imported vectors searchable."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from engine import shards as shard_format
from engine.cli import main
from engine.errors import ModelMismatchError
from engine.library import Library
from engine.shards import ShardError, read_manifest, read_shard, write_manifest, write_shard
from ingest.importer import ImportConfig, import_shards
from tests.util import make_image, run_killed, tiny_checkpoint

DIM = 8
ROWS = 6
FLOAT16_ATOL = 2e-3  # the store may keep vectors as float16


def _unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _folder(tmp_path: Path, identity: str = "abc123", dim: int = DIM, shards: int = 2, rows: int = ROWS,
            seed: int = 0) -> tuple[Path, np.ndarray, list[str]]:
    """A valid shard folder: ``shards`` shards of ``rows`` rows; returns (folder, vectors, paths)."""
    folder = tmp_path / "shards"
    rng = np.random.default_rng(seed)
    vectors = _unit(rng, shards * rows, dim)
    paths = [f"/photos/s{n // rows}/img_{n:04d}.jpg" for n in range(shards * rows)]
    names = [f"part-{s:05d}" for s in range(shards)]
    for s, name in enumerate(names):
        part = slice(s * rows, (s + 1) * rows)
        write_shard(folder, name, vectors[part], {"path": paths[part], "bytes": [1000 + i for i in range(rows)],
                                                   "mtime": [1.7e9 + i for i in range(rows)]})
    write_manifest(folder, identity, dim, names)
    return folder, vectors, paths


def _read_all(folder: Path) -> list[shard_format.Shard]:
    manifest = read_manifest(folder)
    taken: set[str] = set()
    return [read_shard(manifest, name, taken=taken) for name in manifest.shards]


# -- the format --------------------------------------------------------------------------------
def test_a_shard_round_trips_every_column(tmp_path):
    rng = np.random.default_rng(1)
    vectors = _unit(rng, 4)
    odd = os.fsdecode(b"/photos/caf\xe9.jpg")  # a name that is not UTF-8: kept byte for byte
    columns: dict[str, list[Any]] = {
        "path": ["/photos/a.jpg", "/photos/b c.png", odd, "/photos/\u00e9t\u00e9.webp"],
        "content_hash": ["ab" * 32, None, "0f" * 32, None],
        "bytes": [1, 2, None, 4], "mtime": [1.5, None, 3.0, 4.25], "width": [640, None, 1, 2],
        "height": [480, 3, None, 2], "format": ["JPEG", "PNG", None, "WEBP"],
        "taken_at": [datetime(2021, 6, 1, 12, 30), None, datetime(1999, 12, 31), None],
        "camera": ["Canon EOS" + "x" * 200, None, "", "Pixel"],
    }
    write_shard(tmp_path, "part-00000", vectors, columns)
    write_manifest(tmp_path, "id-1", DIM, ["part-00000"])
    [shard] = _read_all(tmp_path)
    assert len(shard) == 4 and shard.vectors.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(shard.vectors), vectors)
    assert shard.paths == columns["path"]
    assert shard.columns["camera"][0] == ("Canon EOS" + "x" * 200)[:128]  # cut as ingest cuts it
    for name in ("content_hash", "bytes", "mtime", "width", "height", "format", "taken_at"):
        assert shard.columns[name] == columns[name], name
    assert pq.read_schema(tmp_path / "part-00000.parquet").field("path").type == pa.binary()


def test_a_time_zone_is_converted_to_utc_and_unknown_columns_are_ignored(tmp_path):
    rng = np.random.default_rng(2)
    np.save(tmp_path / "p.npy", _unit(rng, 2))
    when = datetime(2020, 1, 1, 12, tzinfo=timezone.utc).astimezone()
    pq.write_table(pa.table({"path": ["/a.jpg", "/b.jpg"], "label": ["x", "y"],
                             "taken_at": pa.array([when, None], pa.timestamp("us", tz="Europe/Paris"))}),
                   tmp_path / "p.parquet")
    write_manifest(tmp_path, "id", DIM, ["p"])
    [shard] = _read_all(tmp_path)
    assert shard.columns["taken_at"] == [datetime(2020, 1, 1, 12), None]
    assert set(shard.columns) == {"path", "taken_at"}


def _manifest(doc: Any) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        (folder / "manifest.json").write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return apply


def _good(**changes: Any) -> dict:
    doc = {"format": "engine-shards/1", "model": {"identity": "abc123", "dim": DIM}, "shards": ["part-00000"]}
    doc.update(changes)
    return doc


def _vectors(array: np.ndarray | bytes) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        target = folder / "part-00001.npy"
        if isinstance(array, bytes):
            target.write_bytes(array)
        else:
            np.save(target, array, allow_pickle=True)
    return apply


def _edit_vectors(edit: Callable[[np.ndarray], None]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        vectors = np.load(folder / "part-00001.npy")
        edit(vectors)
        np.save(folder / "part-00001.npy", vectors)
    return apply


def _raw_npy(edit: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        target = folder / "part-00001.npy"
        target.write_bytes(edit(target.read_bytes()))
    return apply


def _table(**columns: Any) -> Callable[[Path], None]:
    """Replace shard 1's parquet: its valid columns, with ``columns`` replacing or added (None drops)."""
    def apply(folder: Path) -> None:
        target = folder / "part-00001.parquet"
        table = pq.read_table(target)
        data = {name: table.column(name) for name in table.column_names}
        for name, values in columns.items():
            if values is None:
                data.pop(name)
            else:
                data[name] = values if isinstance(values, pa.Array) else pa.array(values)
        pq.write_table(pa.table(data), target)
    return apply


def _paths(*replace: tuple[int, Any]) -> list[Any]:
    paths: list[Any] = [f"/photos/s1/img_{n:04d}.jpg" for n in range(ROWS, 2 * ROWS)]
    for row, value in replace:
        paths[row] = value
    return paths


HUGE_HEADER = b"\x93NUMPY\x02\x00" + (1 << 30).to_bytes(4, "little") + b"{"
BAD_CASES: dict[str, tuple[Callable[[Path], None], str, str]] = {
    # manifest
    "manifest not JSON": (_manifest("{not json"), "manifest.json", "not JSON"),
    "manifest not an object": (_manifest("[1, 2]"), "manifest.json", "not a JSON object"),
    "another format": (_manifest(_good(format="engine-shards/2")), "manifest.json", "format is 'engine-shards/2'"),
    "no model": (_manifest(_good(model=None)), "manifest.json", 'no "model" object'),
    "identity not text": (_manifest(_good(model={"identity": 5, "dim": DIM})), "manifest.json", "model identity"),
    "dim not a number": (_manifest(_good(model={"identity": "a", "dim": True})), "manifest.json", "model dim"),
    "dim zero": (_manifest(_good(model={"identity": "a", "dim": 0})), "manifest.json", "model dim"),
    "shards not a list": (_manifest(_good(shards="part-00000")), "manifest.json", '"shards" must be a list'),
    "shard outside the folder": (_manifest(_good(shards=["../x"])), "manifest.json", "not a plain file name"),
    "shard in a subfolder": (_manifest(_good(shards=["a/b"])), "manifest.json", "not a plain file name"),
    "shard absolute": (_manifest(_good(shards=["/etc/passwd"])), "manifest.json", "not a plain file name"),
    "shard hidden": (_manifest(_good(shards=[".part"])), "manifest.json", "not a plain file name"),
    "shard not text": (_manifest(_good(shards=[7])), "manifest.json", "not a plain file name"),
    "shard listed twice": (_manifest(_good(shards=["part-00000", "part-00000"])), "manifest.json", "listed twice"),
    "shard file missing": (lambda f: (f / "part-00001.npy").unlink(), "part-00001.npy", "missing"),
    # vectors
    "wrong dimension": (_vectors(np.zeros((ROWS, DIM + 1), np.float32)), "part-00001.npy", "are 9-d, the manifest says 8"),
    "float64": (_vectors(np.zeros((ROWS, DIM))), "part-00001.npy", "must be float32 (little-endian), found <f8"),
    "big-endian": (_vectors(np.zeros((ROWS, DIM), ">f4")), "part-00001.npy", "found >f4"),
    "pickled objects": (_vectors(np.array([{"a": 1}] * ROWS, dtype=object)), "part-00001.npy", "Python objects"),
    "one-dimensional": (_vectors(np.zeros(DIM, np.float32)), "part-00001.npy", "2-D array"),
    "not an npy file": (_vectors(b"PK\x03\x04 a zip file"), "part-00001.npy", "no NUMPY magic"),
    "huge header": (_vectors(HUGE_HEADER), "part-00001.npy", "header of 1073741824 bytes"),
    "truncated": (_raw_npy(lambda b: b[:-10]), "part-00001.npy", "truncated"),
    "bytes after the array": (_raw_npy(lambda b: b + b"\0" * 4), "part-00001.npy", "longer than its array"),
    "NaN": (_edit_vectors(lambda v: v.__setitem__((3, 2), np.nan)), "part-00001.npy", "row 3 holds NaN or infinity"),
    "infinity": (_edit_vectors(lambda v: v.__setitem__((0, 0), np.inf)), "part-00001.npy", "row 0 holds NaN"),
    "unnormalised": (_edit_vectors(lambda v: v.__setitem__(2, v[2] * 2)), "part-00001.npy",
                     "row 2 is not L2-normalised (norm 2"),
    "zero vector": (_edit_vectors(lambda v: v.__setitem__(5, 0)), "part-00001.npy", "row 5 is not L2-normalised (norm 0"),
    # rows
    "not a parquet file": (lambda f: (f / "part-00001.parquet").write_bytes(b"PAR1 nothing"), "part-00001.parquet",
                           "not a readable parquet file"),
    "count mismatch": (lambda f: pq.write_table(pa.table({"path": _paths()[:ROWS - 1]}), f / "part-00001.parquet"),
                       "part-00001.parquet", "5 rows where its .npy has 6 vectors"),
    "no path column": (_table(path=None), "part-00001.parquet", 'no "path" column'),
    "path not a string": (_table(path=list(range(ROWS))), "part-00001.parquet", 'column "path" must hold strings'),
    "null path": (_table(path=_paths((4, None))), "part-00001.parquet", "row 4: path None is not a file path"),
    "empty path": (_table(path=_paths((1, ""))), "part-00001.parquet", "row 1: path '' is not a file path"),
    "relative path": (_table(path=_paths((0, "photos/a.jpg"))), "part-00001.parquet", "is not absolute"),
    "path not normal": (_table(path=_paths((2, "/photos/../etc/a.jpg"))), "part-00001.parquet", "not in normal form"),
    "NUL in a path": (_table(path=_paths((3, "/photos/a\x00.jpg"))), "part-00001.parquet", "NUL character"),
    "duplicate path in a shard": (_table(path=_paths((5, "/photos/s1/img_0006.jpg"))), "part-00001.parquet",
                                  "row 5: path '/photos/s1/img_0006.jpg' appears twice in the shard"),
    "duplicate path across shards": (_table(path=_paths((1, "/photos/s0/img_0003.jpg"))), "part-00001.parquet",
                                     "also appears in an earlier shard"),
    "bytes as text": (_table(bytes=["1"] * ROWS), "part-00001.parquet", 'column "bytes" must hold integers, found string'),
    "negative bytes": (_table(bytes=[1, 2, -3, 4, 5, 6]), "part-00001.parquet", "row 2: bytes is negative"),
    "mtime NaN": (_table(mtime=[1.0, float("nan"), 1.0, 1.0, 1.0, 1.0]), "part-00001.parquet", "not a finite number"),
    "hash not BLAKE2b hex": (_table(content_hash=["d41d8cd98f00b204e9800998ecf8427e"] * ROWS), "part-00001.parquet",
                             "is not a BLAKE2b-256 hex digest"),
    "format too long": (_table(format=["JPEG"] * 5 + ["X" * 17]), "part-00001.parquet", "longer than 16 characters"),
    "taken_at as text": (_table(taken_at=["2021-01-01"] * ROWS), "part-00001.parquet", 'must hold timestamps'),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_a_hostile_shard_folder_is_refused_with_the_file_and_the_reason(tmp_path, case):
    folder, _, _ = _folder(tmp_path)
    damage, file, reason = BAD_CASES[case]
    damage(folder)
    with pytest.raises(ShardError) as caught:
        _read_all(folder)
    message = str(caught.value)
    assert str(folder / file) in message and reason in message, message
    assert caught.value.file == str(folder / file) and reason in caught.value.reason
    assert "\n" not in message


def test_a_huge_manifest_is_refused_before_it_is_parsed(tmp_path, monkeypatch):
    folder, _, _ = _folder(tmp_path)
    monkeypatch.setattr(shard_format, "MAX_MANIFEST_BYTES", 64)
    with pytest.raises(ShardError, match="larger than"):
        read_manifest(folder)


def test_a_folder_without_a_manifest_is_refused(tmp_path):
    with pytest.raises(ShardError, match="no such folder"):
        read_manifest(tmp_path / "nowhere")
    with pytest.raises(ShardError, match="manifest.json: missing"):
        read_manifest(tmp_path)


def test_the_writer_refuses_bad_names_and_columns(tmp_path):
    vectors = _unit(np.random.default_rng(0), 2)
    for name in ("../x", "a/b", ".x", ""):
        with pytest.raises(ShardError, match="plain file name"):
            write_shard(tmp_path, name, vectors, {"path": ["/a", "/b"]})
    with pytest.raises(ShardError, match="unknown: colour"):
        write_shard(tmp_path, "p", vectors, {"path": ["/a", "/b"], "colour": [1, 2]})
    with pytest.raises(ShardError, match="2 values"):
        write_shard(tmp_path, "p", vectors, {"path": ["/a"]})
    assert not list(tmp_path.iterdir())


def test_writing_a_shard_again_replaces_it_whole(tmp_path):
    rng = np.random.default_rng(3)
    write_shard(tmp_path, "p", _unit(rng, 5), {"path": [f"/a/{i}" for i in range(5)]})
    again = _unit(rng, 3)
    write_shard(tmp_path, "p", again, {"path": ["/b/0", "/b/1", "/b/2"]})
    write_manifest(tmp_path, "id", DIM, ["p"])
    [shard] = _read_all(tmp_path)
    assert shard.paths == ["/b/0", "/b/1", "/b/2"]
    np.testing.assert_array_equal(np.asarray(shard.vectors), again)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "p.npy", "p.parquet"]  # no temporaries


# -- the import ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_identity(tiny_model) -> str:
    from engine.encoder import load_checkpoint

    encoder = load_checkpoint(tiny_model)
    return encoder.identity()


def _stored(library: Library) -> dict[str, np.ndarray]:
    """path -> stored vector, for every image row."""
    store = library.store
    ids = store.image_ids()
    records = store.get_images(ids)
    got, vectors = store.get_embeddings(ids, library.model_info().dim)
    return {records[int(i)].path: v for i, v in zip(got, vectors)}


def test_import_into_a_new_library_then_rerun_is_a_no_op(tmp_path, tiny_model, tiny_identity):
    folder, vectors, paths = _folder(tmp_path, tiny_identity, dim=96, shards=3, rows=7)
    library = Library(tmp_path / "home", device="cpu")
    seen: list[tuple[int, int | None]] = []
    report = import_shards(library, folder, ImportConfig(batch_size=4), model=tiny_model,
                           progress=lambda d, t: seen.append((d, t)))
    assert (report.added, report.skipped, report.failed, report.imported) == (21, 0, [], 3)
    assert seen[0] == (0, None) and seen[-1] == (21, 21)
    assert library.model_info().identity == tiny_identity
    stored = _stored(library)
    assert sorted(stored) == sorted(paths)
    for path, vector in zip(paths, vectors):  # each row holds its own vector
        np.testing.assert_allclose(stored[path], vector, atol=FLOAT16_ATOL)
    index = library.open_index()
    assert sorted(index.ids().tolist()) == library.store.embedding_ids().tolist()
    record = library.store.get_images([library.store.image_ids()[0]])
    assert next(iter(record.values())).bytes == 1000
    generation = library.store.generation()

    again = import_shards(library, folder)
    assert (again.added, again.skipped, again.failed) == (0, 21, [])
    assert library.store.generation() == generation and library.store.count() == 21


def test_rows_without_file_facts_get_unknown_ones(tmp_path, tiny_model, tiny_identity):
    folder = tmp_path / "shards"
    write_shard(folder, "p", _unit(np.random.default_rng(4), 2, 96), {"path": ["/x/a.jpg", "/x/b.jpg"]})
    write_manifest(folder, tiny_identity, 96, ["p"])
    library = Library(tmp_path / "home", device="cpu")
    import_shards(library, folder, model=tiny_model)
    records = library.store.get_images(library.store.image_ids()).values()
    assert {(r.content_hash, r.bytes, r.mtime, r.width) for r in records} == {("", 0, 0.0, None)}


def test_vectors_of_another_encoder_are_refused_naming_both(tmp_path, tiny_model, tiny_identity):
    other = str(tiny_checkpoint(tmp_path / "other.pt", head_dim=96))
    from engine.encoder import load_checkpoint

    other_identity = load_checkpoint(other).identity()
    assert other_identity != tiny_identity
    folder, _, _ = _folder(tmp_path, other_identity, dim=96)
    home = tmp_path / "home"
    # a new library: the encoder given must be the shards'
    with pytest.raises(ModelMismatchError) as caught:
        import_shards(Library(home, device="cpu"), folder, model=tiny_model)
    assert other_identity in str(caught.value) and tiny_identity in str(caught.value)
    assert not home.exists()  # nothing created
    # an existing library of another encoder
    own, _, _ = _folder(tmp_path / "own", tiny_identity, dim=96)
    library = Library(home, device="cpu")
    import_shards(library, own, model=tiny_model)
    count = library.store.count()
    result = CliRunner().invoke(main, ["--home", str(home), "import", str(folder)])
    assert result.exit_code == 1
    assert other_identity in result.output and tiny_identity in result.output and "Traceback" not in result.output
    assert library.store.count() == count


def test_a_bad_shard_is_refused_whole_and_the_others_are_imported(tmp_path, tiny_model, tiny_identity):
    folder, vectors, paths = _folder(tmp_path, tiny_identity, dim=96, shards=3, rows=5)
    broken = np.load(folder / "part-00001.npy")
    broken[4] *= 3  # the last row is bad: nothing of the rows before it may be committed either
    np.save(folder / "part-00001.npy", broken)
    home = tmp_path / "home"
    runner = CliRunner()
    result = runner.invoke(main, ["--home", str(home), "import", str(folder), "--model", tiny_model, "--json",
                                  "--batch-size", "2"])
    assert result.exit_code == 1, result.output
    summary = json.loads(result.stdout)
    assert (summary["added"], summary["failed"], summary["imported"], summary["shards"]) == (10, 1, 2, 3)
    assert summary["failures"][0]["file"] == str(folder / "part-00001.npy")
    assert "row 4 is not L2-normalised" in summary["failures"][0]["reason"]
    assert set(summary["stages"]) == {"model", "read", "lookup", "commit", "index"}
    library = Library(home, device="cpu")
    assert sorted(_stored(library)) == sorted(paths[:5] + paths[10:])
    plain = runner.invoke(main, ["--home", str(home), "import", str(folder)])
    assert plain.exit_code == 1 and "refused: " + str(folder / "part-00001.npy") in plain.output
    assert "skipped 10" in plain.output


def test_a_mistyped_folder_creates_nothing(tmp_path):
    home = tmp_path / "home"
    result = CliRunner().invoke(main, ["--home", str(home), "import", str(tmp_path / "nowhere")])
    assert result.exit_code == 1 and "no such folder of embedding shards" in result.output
    assert not home.exists()


def test_imported_vectors_are_searchable(tmp_path, tiny_model, tiny_identity):
    """Shards made by embedding real files: `engine query` of an imported file finds its
    neighbours as brute force over the imported vectors does."""
    from engine.embedding import embed_files
    from engine.encoder import load_checkpoint

    photos = [make_image(tmp_path / "photos" / f"p{i:02d}.png", seed=300 + i, size=(24, 24)) for i in range(20)]
    embedded = embed_files(load_checkpoint(tiny_model), [str(p) for p in photos], workers=0)
    vectors = embedded.embeddings
    paths = [str(p) for p in photos]
    folder = tmp_path / "shards"
    write_shard(folder, "part-00000", vectors[:12], {"path": paths[:12]})
    write_shard(folder, "part-00001", vectors[12:], {"path": paths[12:]})
    write_manifest(folder, tiny_identity, vectors.shape[1], ["part-00000", "part-00001"])
    home = tmp_path / "home"
    runner = CliRunner()
    result = runner.invoke(main, ["--home", str(home), "import", str(folder), "--model", tiny_model])
    assert result.exit_code == 0, result.output
    library = Library(home, device="cpu")
    stored = _stored(library)
    held = np.stack([stored[p] for p in paths])  # brute force over the vectors the library holds
    for q in (0, 13):
        # --expand 0: plain nearest neighbours (query expansion, on by default, re-ranks them on purpose)
        out = runner.invoke(main, ["--home", str(home), "query", paths[q], "-k", "5", "--json", "--no-server",
                                   "--expand", "0"])
        assert out.exit_code == 0, out.output
        hits = json.loads(out.stdout)["hits"]
        expected = np.argsort(-(held @ held[q]), kind="stable")[:5]
        assert [h["path"] for h in hits] == [paths[i] for i in expected]
        # and the scores are the imported vectors' own (to the store's precision)
        np.testing.assert_allclose([h["score"] for h in hits], (vectors @ vectors[q])[expected], atol=FLOAT16_ATOL)


# -- kill -9 -------------------------------------------------------------------------------------
def test_import_killed_at_any_point_then_rerun_adds_each_row_once(tmp_path, tiny_model, tiny_identity,
                                                                  engine_command, subprocess_env):
    rng = random.Random(11)
    folder, vectors, paths = _folder(tmp_path, tiny_identity, dim=96, shards=3, rows=16, seed=11)
    home = tmp_path / "home"
    db = home / "library.db"
    made = Library(home, device="cpu")
    with made.write_lock():  # the library exists: the runs need no torch (fast to start)
        made.set_model(tiny_model)
    made.close()
    cmd = [*engine_command, "--home", str(home), "--device", "cpu", "import", str(folder), "--batch-size", "3",
           "--json"]
    faults = [("batch-committed", rng.randint(2, 4)),  # rows committed, the index not updated
              ("commit", rng.randint(2, 4)),  # inside a transaction, before COMMIT
              ("import-shard-read", 2),  # a shard validated, nothing of it committed yet
              ("outside", rng.uniform(0.0, 0.2))]
    for fault, when in faults:
        rc = run_killed(cmd, subprocess_env, fault, when, db)
        assert rc == -signal.SIGKILL, f"{fault}:{when} did not kill the run (exit {rc})"
        library = Library(home, device="cpu")
        store = library.store
        assert store.embedding_ids().tolist() == store.image_ids().tolist()  # never a row without its vector
        assert set(_stored(library)) <= set(paths)
        library.close()
    # an index save killed midway, after everything was committed
    assert run_killed(cmd, subprocess_env, "index-state-written", 1, db) == -signal.SIGKILL
    result = subprocess.run(cmd, env=subprocess_env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["skipped"] == len(paths)
    library = Library(home, device="cpu")
    stored = _stored(library)
    assert sorted(stored) == sorted(paths) and library.store.count() == len(paths)  # each row exactly once
    for path, vector in zip(paths, vectors):
        np.testing.assert_allclose(stored[path], vector, atol=FLOAT16_ATOL)
    index = library.open_index()
    held = index.ids()
    assert len(np.unique(held)) == len(held) and sorted(held.tolist()) == library.store.embedding_ids().tolist()
    state = json.loads((home / "index.json").read_text())
    assert state["generation"] == library.store.generation()
    assert not list(home.glob(".*.tmp"))


def test_engine_import_never_loads_torch(tmp_path, tiny_model, tiny_identity, subprocess_env):
    # An import moves vectors made elsewhere: paying torch's start-up (seconds) would be waste.
    folder, _, paths = _folder(tmp_path, tiny_identity, dim=96, shards=1, rows=5, seed=3)
    home = tmp_path / "home"
    made = Library(home, device="cpu")
    with made.write_lock():
        made.set_model(tiny_model)
    made.close()
    probe = ("import sys\nfrom engine.cli import main\n"
             "try:\n    main([sys.argv[1], sys.argv[2], 'import', sys.argv[3], '--json'])\n"
             "except SystemExit as exc:\n    assert not exc.code, exc.code\n"
             "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n")
    result = subprocess.run([sys.executable, "-c", probe, "--home", str(home), str(folder)], env=subprocess_env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("NO-TORCH"), result.stdout
    assert json.loads(result.stdout.strip().rsplit("\n", 1)[0])["added"] == len(paths)
