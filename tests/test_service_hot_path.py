"""The search-by-upload hot path of `engine serve`: answered by DirectRoute before FastAPI's routing
(errors as the app answers them), the answer rendered strictly without a walk of every value,
every thread that searches pinned to the service's share of the cores (OpenMP and BLAS), and the
ranking the same as `engine query` whatever the library's query expansion setting."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import pytest
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient

from engine.library import Library
from engine.output import json_ready
from engine.service.app import DirectRoute, create_app
from engine.service.settings import ServiceConfig
from tests.test_service import build_library, upload


@pytest.fixture(scope="module")
def served_app(tmp_path_factory, tiny_model):
    home, photos = build_library(tmp_path_factory.mktemp("hot"), tiny_model)
    app = create_app(Library(home, device="cpu"), ServiceConfig(poll_s=0, allowed_hosts=("testserver",)))
    with TestClient(app) as client:
        yield app, client, home, photos


def test_upload_search_takes_the_direct_route_and_answers_errors_as_the_app(served_app, monkeypatch):
    app, client, _, photos = served_app
    assert [m.cls for m in app.user_middleware].count(DirectRoute) == 1
    bad_k = client.post("/api/search?k=0", files=upload(photos / "img_001.png"))
    by_id = client.get("/api/search?id=1&k=0")  # the same parameter through FastAPI's own validation
    assert bad_k.status_code == by_id.status_code == 422 and bad_k.json()["error"].startswith("k: ")

    def broken(*_args, **_kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(app.state.search, "query_vector", broken)
    r = client.post("/api/search", files=upload(photos / "img_001.png"))
    assert r.status_code == 500 and r.json() == {"error": "internal error: RuntimeError: boom", "status": 500}
    assert r.headers["x-content-type-options"] == "nosniff"  # the outer middleware still wraps it


def test_answer_json_is_what_json_ready_renders():
    from engine.service.api import _json_body

    plain = {"hits": [{"rank": 1, "path": "/a/été.png", "score": 0.5, "aliases": ["/b"], "taken_at": None}],
             "took_ms": 1.25, "query": {"name": "x", "bytes": 3}}
    assert _json_body(plain) == JSONResponse(json_ready(plain)).body
    odd = {"hits": [{"path": "/a/caf\udce9.png", "score": float("nan")}], "tuple": (1, 2)}
    body = _json_body(odd)
    assert body == JSONResponse(json_ready(odd)).body
    assert json.loads(body.decode("utf-8")) == {"hits": [{"path": "/a/caf\\xe9.png", "score": None}], "tuple": [1, 2]}


def test_every_searching_thread_is_pinned(served_app):
    import faiss

    app, _, _, _ = served_app
    state = app.state.search
    want = state.config.torch_threads()
    seen: list[int] = []

    def fresh_thread() -> None:
        faiss.omp_set_num_threads(want + 2)  # as a new thread starts on a machine with more cores
        state.search_vector(state.stored_vectors([1])[0], 3)
        seen.append(faiss.omp_get_max_threads())

    t = threading.Thread(target=fresh_thread)
    t.start()
    t.join()
    assert seen == [want]


def test_blas_threads_are_limited_while_the_service_is_open(served_app):
    from threadpoolctl import threadpool_info, threadpool_limits

    from engine.service.state import SearchState

    _, _, home, _ = served_app

    def blas() -> dict[str, int]:
        return {i["filepath"]: i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}

    config = ServiceConfig(poll_s=0)
    want = config.torch_threads()
    with threadpool_limits(limits=want + 1, user_api="blas"):
        # A library takes at most the threads it was built for: compare only those that took more.
        before = {path: n for path, n in blas().items() if n != want}
        if not before:
            pytest.skip(f"no BLAS library here runs more than {want} thread(s)")
        state = SearchState(Library(home, device="cpu"), config)
        state.open()
        try:
            now = blas()
            assert {now[path] for path in before} == {want}
        finally:
            state.close()
        assert {path: blas()[path] for path in before} == before


def _in_process(home: Path, query: Path, k: int) -> list[tuple[int, float]]:
    from engine.query import search_library

    library = Library(home, device="cpu")
    try:
        return [(h.id, h.score) for h in search_library(library, [query], k)[0].hits]
    finally:
        library.close()


def _served(client: TestClient, query: Path, k: int) -> list[tuple[int, float]]:
    r = client.post("/api/search", params={"k": k}, files=upload(query))
    assert r.status_code == 200, r.text
    return [(h["id"], h["score"]) for h in r.json()["hits"]]


def _same(got: list[tuple[int, float]], expected: list[tuple[int, float]]) -> bool:
    return [i for i, _ in got] == [i for i, _ in expected] and \
        all(math.isclose(a, b, abs_tol=1e-5) for (_, a), (_, b) in zip(got, expected))


def test_ranking_follows_the_library_expansion_setting(served_app, monkeypatch):
    from engine.expansion import EXPAND_ENV, NO_EXPANSION, Expansion, save_library_expansion

    app, client, home, photos = served_app
    query = photos / "img_004.png"
    library = Library(home, device="cpu")
    rankings = []
    try:
        with monkeypatch.context() as m:
            m.delenv(EXPAND_ENV, raising=False)  # the tests' default turns expansion off for every query
            for setting in (Expansion(n=3, alpha=1.0), NO_EXPANSION):
                save_library_expansion(library, setting)
                app.state.search.refresh()  # what the watcher does every poll_s
                assert app.state.search.expansion == setting
                expected = _in_process(home, query, 6)
                assert _same(_served(client, query, 6), expected), setting
                rankings.append([i for i, _ in expected])
    finally:
        library.close()
        app.state.search.refresh()  # back to the environment's setting for the module's other tests
    assert rankings[0] != rankings[1]  # the setting really changed the ranking
    scores = [s for _, s in expected]
    assert scores == sorted(scores, reverse=True)  # unexpanded: by falling score
