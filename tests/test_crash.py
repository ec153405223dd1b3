"""Fault injection: a real `engine ingest` subprocess is killed with SIGKILL at seeded points (mid
batch, mid commit, just after a commit, mid index save, and at a random moment from outside), while
the library keeps growing between runs; then a rerun. Nothing may be lost, duplicated or left
inconsistent."""

from __future__ import annotations

import json
import random
import shutil
import signal
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from db.vectors import TOLERANCE
from engine.cli import main
from engine.embedding import embed_files
from engine.index import VectorIndex
from engine.library import Library
from engine.query import search_library
from ingest.doctor import check_library
from tests.util import make_image, run_killed

SEED = 5
# (fault point, which occurrence is fatal); "outside" is `kill -9` from this process at a random
# moment of the batch after the first commit of the run. See engine.faults.fault_point.
rng = random.Random(SEED)
FAULTS = [
    ("batch-committed", rng.randint(1, 3)),  # a batch committed, the index not yet updated
    ("commit", rng.randint(1, 3)),  # inside a batch's transaction, before COMMIT
    ("batch-embedded", rng.randint(1, 3)),  # vectors computed, nothing written
    ("index-state-written", 1),  # mid index save: index.json records the new file, not yet in place
    ("outside", rng.uniform(0.0, 0.1)),  # seconds after the first commit was seen
]
WAVES = [5, 5, 5, 5, 12]  # photos arriving before each run; the last run is the longest


def test_ingest_killed_at_any_point_loses_and_duplicates_nothing(tmp_path, tiny_model, engine_command, subprocess_env):
    photos = tmp_path / "photos"
    home = tmp_path / "home"
    db = home / "library.db"
    # 32 distinct photos, 3 byte-identical copies (aliases) and 2 broken files, arriving in 5 waves
    waves: list[list[Path]] = []
    for n, size in enumerate(WAVES):
        first = sum(WAVES[:n])
        waves.append([make_image(photos / f"w{n}" / f"img_{i:02d}.png", seed=700 + i, size=(24, 24))
                      for i in range(first, first + size)])
    for n, wave in enumerate(waves[:3]):
        copy = photos / f"w{n}" / f"zz_copy_{n}.png"
        shutil.copy(wave[0], copy)
        wave.append(copy)
    (photos / "w1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (photos / "w3" / "empty.png").write_bytes(b"")
    staged = tmp_path / "staged"
    photos.rename(staged)
    photos.mkdir()
    cmd = [*engine_command, "--home", str(home), "--device", "cpu", "ingest", str(photos), "--model", tiny_model,
           "--batch-size", "2", "--workers", "0", "--json"]

    survived = 0
    for n, (fault, when) in enumerate(FAULTS):
        (staged / f"w{n}").rename(photos / f"w{n}")  # the library grows between runs
        if fault == "index-state-written" and (home / "index.faiss").exists():
            # what a kill inside the index write leaves: half a temporary file beside the real index
            half = (home / "index.faiss").read_bytes()
            (home / ".index.faiss.99999999.tmp").write_bytes(half[: len(half) // 2])
        rc = run_killed(cmd, subprocess_env, fault, when, db)
        assert rc == -signal.SIGKILL, f"{fault}:{when} did not kill the run (exit {rc})"
        survived += 1
        # whatever the moment of death, what is on disk is consistent: at most the index lags the
        # database, which every open reconciles (doctor: notes, never problems)
        lib = Library(home, device="cpu")
        report = check_library(lib)
        assert report.ok, (fault, report.lines())
        if lib.store.count():
            [res] = search_library(lib, [str(next(photos.rglob("img_*.png")))], k=50)
            assert len({h.id for h in res.hits}) == len(res.hits)
            assert all(h.path for h in res.hits)
        lib.close()
    assert survived == len(FAULTS)

    # the rerun finishes the job
    r = CliRunner().invoke(main, ["--home", str(home), "--device", "cpu", "ingest", str(photos), "--batch-size", "2",
                                  "--workers", "0", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["failed"] == 2

    readable = sorted(str(p) for p in photos.rglob("*.png") if p.name != "empty.png")
    lib = Library(home, device="cpu")
    store = lib.store
    known = sorted(p for p, _, _ in store.iter_paths())
    assert known == readable  # every readable file indexed exactly once (as an image or an alias)
    assert (store.count(), store.count_aliases()) == (sum(WAVES), 3)
    assert store.embedding_ids().tolist() == store.image_ids().tolist()
    index = VectorIndex.load(home / "index.faiss")
    held = index.ids()
    assert len(np.unique(held)) == len(held) and sorted(held.tolist()) == store.embedding_ids().tolist()
    state = json.loads((home / "index.json").read_text())
    assert (state["generation"], state["ntotal"]) == (store.generation(), index.ntotal)
    assert not list(home.glob(".*.tmp"))
    # each stored vector is its own file's embedding: no vector landed on another row
    records = sorted(store.get_images(store.image_ids()).values(), key=lambda rec: rec.id)
    fresh = embed_files(lib.encoder(), [rec.path for rec in records], workers=0)
    _, stored = store.get_embeddings([rec.id for rec in records], lib.encoder().dim)
    np.testing.assert_allclose(stored, fresh.embeddings, atol=TOLERANCE)  # stored as float16
    report = check_library(lib)
    assert report.ok and report.findings == [], report.lines()
    lib.close()
