"""Two ingests of one library at once, and queries (and doctor) while an ingest is running."""

from __future__ import annotations

import json
import subprocess
import threading
import time

import pytest

from engine.embedding import embed_files
from engine.errors import IndexMissingError, LockError
from engine.index import VectorIndex
from engine.library import Library
from engine.query import search_library
from ingest.doctor import check_library
from ingest.pipeline import IngestConfig, ingest_paths
from tests.util import make_image

CFG = IngestConfig(batch_size=2, workers=0)
WAITING = "another process is writing to this library; waiting for it to finish"


def _wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_two_ingests_at_once_wait_for_each_other_and_index_nothing_twice(tmp_path, tiny_model, engine_command,
                                                                         subprocess_env):
    """A writer holds the library; an `engine ingest` process and an in-process ingest arrive: both
    wait (the process says so on stderr), then run one after the other."""
    photos = tmp_path / "photos"
    for i in range(10):
        make_image(photos / f"img_{i}.png", seed=900 + i, size=(24, 24))
    home = tmp_path / "home"
    holder = Library(home, device="cpu")
    err = tmp_path / "stderr.txt"
    err_file = err.open("w")
    waited = threading.Event()
    results: dict[str, object] = {}

    def in_process() -> None:
        try:
            results["report"] = ingest_paths(Library(home, device="cpu"), [photos], CFG, model=tiny_model,
                                             on_wait=waited.set)
        except BaseException as exc:  # surfaced by the assertions below
            results["error"] = exc

    with holder.write_lock():
        proc = subprocess.Popen([*engine_command, "--home", str(home), "--device", "cpu", "ingest", str(photos),
                                 "--model", tiny_model, "--batch-size", "2", "--workers", "0", "--json"],
                                env=subprocess_env, stdout=subprocess.PIPE, stderr=err_file, text=True)
        thread = threading.Thread(target=in_process)
        thread.start()
        try:
            _wait_for(lambda: (WAITING in err.read_text() and waited.is_set()) or proc.poll() is not None)
            assert proc.poll() is None and "report" not in results
            # a writer told not to wait gets a clear error instead
            with pytest.raises(LockError, match="another process is writing"):
                with Library(home).write_lock(wait=False):
                    pass
        except BaseException:
            proc.kill()
            raise
    out, _ = proc.communicate(timeout=120)
    err_file.close()
    thread.join(timeout=120)
    assert proc.returncode == 0 and "Traceback" not in err.read_text(), err.read_text()
    assert "error" not in results, results.get("error")
    reports = [json.loads(out), results["report"].to_dict()]
    assert sorted(r["added"] for r in reports) == [0, 10]  # one did the work, the other found it done
    assert sorted(r["unchanged"] for r in reports) == [0, 10]
    lib = Library(home, device="cpu")
    assert lib.store.count() == 10 and lib.store.count_aliases() == 0
    held = VectorIndex.load(lib.paths.index).ids()
    assert sorted(held.tolist()) == lib.store.image_ids().tolist()


def test_queries_during_an_ingest_answer_from_a_consistent_index(tmp_path, tiny_model, engine_command,
                                                                 subprocess_env):
    photos = tmp_path / "photos"
    paths = [make_image(photos / f"img_{i:02d}.png", seed=1100 + i, size=(24, 24)) for i in range(16)]
    query = tmp_path / "query.png"
    make_image(query, seed=1105, size=(24, 24))  # a copy of img_05 outside the library
    home = tmp_path / "home"
    env = dict(subprocess_env, ENGINE_FAULT_DELAY="0.15")  # slow batches: a wide window to query in
    proc = subprocess.Popen([*engine_command, "--home", str(home), "--device", "cpu", "ingest", str(photos),
                             "--model", tiny_model, "--batch-size", "2", "--workers", "0", "--json"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lib = Library(home, device="cpu")
    seen_counts: list[int] = []
    doctor_runs = 0
    query_vector = None
    known_paths = {str(p) for p in paths}
    try:
        while proc.poll() is None:
            try:
                [result] = search_library(lib, [str(query)], k=30)
            except IndexMissingError:  # nothing committed yet
                time.sleep(0.05)
                continue
            if query_vector is None:
                query_vector = embed_files(lib.encoder(), [query], workers=0).embeddings[0]
            hits = result.hits
            ids = [h.id for h in hits]
            assert len(set(ids)) == len(ids) and all(h.path in known_paths for h in hits)
            scores = [h.score for h in hits]
            assert scores == sorted(scores, reverse=True)
            # each hit's score is the query against that row's own stored vector: ids and vectors agree
            got_ids, stored = lib.store.get_embeddings(ids, len(query_vector))
            expected = dict(zip(got_ids.tolist(), (stored @ query_vector).tolist()))
            assert all(abs(expected[h.id] - h.score) < 1e-4 for h in hits)
            seen_counts.append(len(hits))
            time.sleep(0.05)  # leave the two cores to the ingest between queries
            if doctor_runs < 2 and len(hits) >= 4 * (doctor_runs + 1):
                report = check_library(Library(home, device="cpu"))
                assert report.ok, report.lines()  # a live ingest is not a broken library
                doctor_runs += 1
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert json.loads(out)["added"] == 16 and "Traceback" not in err
    partial = [n for n in seen_counts if 0 < n < 16]
    assert len(partial) >= 2, seen_counts  # the queries really ran while the ingest was half done
    [final] = search_library(Library(home, device="cpu"), [str(query)], k=30)
    assert len(final.hits) == 16 and final.hits[0].path == str(photos / "img_05.png")
    lib.close()
