"""Load on a real `engine serve` over loopback: 8 concurrent clients mixing uploads and
search-by-id while an ingest adds photos. Zero failed requests, and every answer is whole: its
hits agree with the snapshot it reports (no request sees an index half-way between two states).

The default run keeps a short variant (an in-process ingest thread, a few seconds); the full one
(30 s, a real `engine ingest` subprocess) is marked slow.
"""

from __future__ import annotations

import math
import random
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from engine.service.client import ServiceClient
from tests.test_service import N_PHOTOS, ServiceProcess, build_library, service_env
from tests.util import make_folder

CLIENTS = 8
K_ALL = 1000  # more than the library holds: every vector of the snapshot must come back


@dataclass
class Tally:
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    generations: list[int] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _check(body: dict, k: int, ordered: bool) -> str | None:
    """Why an answer is not whole, or None. ordered: the hits must come by falling score (a
    library that expands queries ranks by the expanded query, and shows the plain one's scores)."""
    hits = body["hits"]
    ids = [h["id"] for h in hits]
    if len(hits) != min(k, body["images"]):
        return f"{len(hits)} hits for k={k} from a snapshot of {body['images']}"
    if len(set(ids)) != len(ids) or [h["rank"] for h in hits] != list(range(1, len(hits) + 1)):
        return f"duplicate ids or ranks out of order: {ids}"
    scores = [h["score"] for h in hits]
    if ordered and scores != sorted(scores, reverse=True):
        return "scores not in order"
    if any(abs(h["distance"] - math.sqrt(max(0.0, 2 - 2 * h["score"]))) > 1e-4 for h in hits):
        return "a distance that is not its score's"
    return None


def _client_loop(client: ServiceClient, uploads: list[bytes], known_ids: list[int], stop: threading.Event,
                 tally: Tally, seed: int, ordered: bool) -> None:
    rng = random.Random(seed)
    last_generation = -1
    while not stop.is_set():
        k = rng.choice([5, K_ALL])
        try:
            if rng.random() < 0.5:
                status, body = client.search(rng.choice(uploads), k, None)
            else:
                status, body = client.request("GET", f"/api/search?id={rng.choice(known_ids)}&k={k}")
        except Exception as exc:  # noqa: BLE001 - any failure is a failed request
            with tally.lock:
                tally.failures.append(f"{type(exc).__name__}: {exc}")
            continue
        problem = f"status {status}: {body}" if status != 200 else _check(body, k, ordered)
        if problem is None and body["generation"] < last_generation:
            problem = f"generation went back from {last_generation} to {body['generation']}"
        with tally.lock:
            if problem:
                tally.failures.append(problem)
            else:
                tally.ok += 1
                tally.generations.append(body["generation"])
                tally.sizes.append(body["images"])
        if status == 200:
            last_generation = max(last_generation, body["generation"])


def run_load(server: ServiceProcess, photos: Path, ingest: threading.Thread | subprocess.Popen, *,
             min_seconds: float, max_seconds: float) -> Tally:
    """8 clients until the ingest has finished and ``min_seconds`` have passed (never past
    ``max_seconds``)."""
    from engine.expansion import library_expansion
    from engine.library import Library

    uploads = [p.read_bytes() for p in sorted(photos.glob("img_*.png"))[:6]]
    known_ids = list(range(1, N_PHOTOS + 2))
    library = Library(server.home)
    ordered = not library_expansion(library).enabled
    library.close()
    tally, stop = Tally(), threading.Event()
    clients = [ServiceClient(server.address) for _ in range(CLIENTS)]
    threads = [threading.Thread(target=_client_loop, args=(c, uploads, known_ids, stop, tally, i, ordered))
               for i, c in enumerate(clients)]
    started = time.monotonic()
    for t in threads:
        t.start()

    def ingest_running() -> bool:
        return ingest.is_alive() if isinstance(ingest, threading.Thread) else ingest.poll() is None

    while time.monotonic() - started < max_seconds and (ingest_running() or time.monotonic() - started < min_seconds):
        time.sleep(0.1)
    time.sleep(1.5)  # past one generation poll: the last answers come from the final snapshot
    stop.set()
    for t in threads:
        t.join(30)
    for c in clients:
        c.close()
    assert not ingest_running(), "the ingest did not finish in time"
    return tally


@pytest.fixture()
def served(tmp_path, tiny_model, engine_command):
    home, photos = build_library(tmp_path, tiny_model)
    process = ServiceProcess(engine_command, home, service_env())
    yield process, home, photos
    process.stop()


def _assert_whole(tally: Tally, added: int) -> None:
    assert not tally.failures, tally.failures[:5]
    assert tally.ok > 20
    assert min(tally.sizes) >= N_PHOTOS + 1
    assert tally.sizes[-CLIENTS:] and max(tally.sizes) == N_PHOTOS + 1 + added
    assert len(set(tally.generations)) > 1  # the service picked up the ingest while it was loaded


def test_load_while_ingesting_short(served, tmp_path, monkeypatch):
    from engine.library import Library
    from ingest.pipeline import IngestConfig, ingest_paths

    process, home, photos = served
    more = make_folder(tmp_path / "more", 12, seed0=300)
    monkeypatch.setenv("ENGINE_FAULT_DELAY", "0.3")  # widen the ingest: a commit every 0.3 s

    def ingest() -> None:
        library = Library(home, device="cpu")
        ingest_paths(library, [tmp_path / "more"], IngestConfig(batch_size=3, workers=0))
        library.close()

    thread = threading.Thread(target=ingest)
    thread.start()
    tally = run_load(process, photos, thread, min_seconds=2.0, max_seconds=20.0)
    _assert_whole(tally, len(more))


@pytest.mark.slow
def test_load_while_engine_ingest_runs_30s(served, tmp_path, engine_command):
    process, home, photos = served
    more = make_folder(tmp_path / "more", 90, seed0=600)
    env = dict(service_env(), ENGINE_FAULT_DELAY="0.25", OMP_NUM_THREADS="1")
    ingest = subprocess.Popen([*engine_command, "--home", str(home), "--device", "cpu", "ingest", str(tmp_path / "more"),
                               "--batch-size", "3", "--workers", "0", "--json"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        tally = run_load(process, photos, ingest, min_seconds=30.0, max_seconds=90.0)
    finally:
        if ingest.poll() is None:
            ingest.kill()
        ingest.wait()
    assert ingest.returncode == 0, ingest.stderr.read()
    _assert_whole(tally, len(more))
