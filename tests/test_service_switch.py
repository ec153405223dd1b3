"""engine serve across `engine reindex --model`: the encoder and the index are one snapshot, swapped
together, so an upload is always embedded by the model whose vectors it is compared with."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from engine.library import Library
from engine.service.app import create_app
from engine.service.settings import ServiceConfig
from tests.test_service import build_library, id_of, upload
from tests.util import make_image


def other_checkpoint(path: Path, *, seed: int, head_dim: int | None = None) -> str:
    """A tiny random-init encoder unlike the session's ``tiny_model`` (another seed; with
    ``head_dim``, another dimension too), saved as an engine checkpoint."""
    import torch

    from engine.checkpoint import save_checkpoint
    from engine.config import EncoderConfig
    from engine.encoder import build_encoder

    torch.manual_seed(seed)
    encoder = build_encoder(EncoderConfig(backbone="test_resnet", pretrained=False, image_size=32, head_dim=head_dim))
    return str(save_checkpoint(encoder, path))


def switch(home: Path, model: str) -> None:
    """`engine reindex --model MODEL` in-process, through a Library of its own (as another process)."""
    from ingest.pipeline import IngestConfig
    from ingest.reindex import reindex_library

    writer = Library(home, device="cpu")
    try:
        report = reindex_library(writer, model=model, config=IngestConfig(workers=0))
        assert report.switched
    finally:
        writer.close()


def expected_hits(home: Path, query: Path, k: int) -> list[tuple[int, float]]:
    """(id, score) of `engine query` in-process, with whatever encoder the library has now."""
    from engine.query import search_library

    library = Library(home, device="cpu")
    try:
        return [(h["id"], h["score"]) for h in search_library(library, [query], k)[0].to_dict()["hits"]]
    finally:
        library.close()


def got_hits(body: dict) -> list[tuple[int, float]]:
    return [(h["id"], round(h["score"], 6)) for h in body["hits"]]


def wait_for_generation(client: TestClient, home: Path, timeout: float = 60) -> None:
    library = Library(home)
    wanted = library.store.generation()
    library.close()
    deadline = time.monotonic() + timeout
    while client.get("/api/health").json()["generation"] != wanted:
        assert time.monotonic() < deadline, "the service never picked up the reindex"
        time.sleep(0.05)


@pytest.mark.parametrize("head_dim", [None, 64], ids=["same-dim", "other-dim"])
def test_upload_after_a_model_switch_is_embedded_by_the_new_encoder(tmp_path, tiny_model, head_dim):
    """Before the fix, the watcher reloaded the index but kept the old encoder: with the same
    dimension uploads were silently compared across models; with another, searches failed."""
    home, _ = build_library(tmp_path / "lib", tiny_model, n=8)
    fresh = make_image(tmp_path / "fresh.png", 4242)
    other = other_checkpoint(tmp_path / "other.pt", seed=7, head_dim=head_dim)
    app = create_app(Library(home, device="cpu"), ServiceConfig(poll_s=0.05, allowed_hosts=("testserver",)))
    with TestClient(app) as client:
        before = client.post("/api/search", params={"k": 5}, files=upload(fresh)).json()
        assert got_hits(before) == expected_hits(home, fresh, 5)
        old_identity = app.state.search.snapshot.model.identity
        switch(home, other)
        wait_for_generation(client, home)
        snapshot = app.state.search.snapshot
        assert snapshot.model.identity != old_identity and snapshot.model.identity == Library(home).model_info().identity
        assert snapshot.index.dim == snapshot.model.dim
        r = client.post("/api/search", params={"k": 5}, files=upload(fresh))
        assert r.status_code == 200, r.text
        assert got_hits(r.json()) == expected_hits(home, fresh, 5)
        assert got_hits(r.json()) != got_hits(before)  # another model: another ranking or other scores


def test_stored_vector_searches_right_after_a_switch_use_a_matching_snapshot(tmp_path, tiny_model):
    """Search by id and refine read vectors from the database at request time: a request that
    comes before the watcher noticed the switch reloads first rather than searching new vectors
    in the old index. An upload of indexed bytes then embeds with its own snapshot's encoder."""
    home, photos = build_library(tmp_path / "lib", tiny_model, n=8)
    other = other_checkpoint(tmp_path / "other.pt", seed=11)
    query = photos / "img_003.png"
    image_id = id_of(home, query)
    app = create_app(Library(home, device="cpu"), ServiceConfig(poll_s=0, allowed_hosts=("testserver",)))
    with TestClient(app) as client:
        state = app.state.search
        # An indexed photo uploaded while the snapshot is older than the vectors: not the new
        # stored vector searched in the old index, but embedded by the old encoder, as a whole.
        old = state.snapshot
        switch(home, other)
        assert state.snapshot is old  # no watcher: nothing reloaded yet
        stale, indexed_id = state.query_vector(query.read_bytes(), snapshot=old)
        assert indexed_id is None  # embedded, not the stored vector
        assert abs(float(stale @ state.embed_uploads([("image", query.read_bytes())], old)[0]) - 1) < 1e-5
        r = client.get("/api/search", params={"id": image_id, "k": 5})
        assert r.status_code == 200, r.text
        assert state.snapshot is not old and state.snapshot.model.identity != old.model.identity
        expected = expected_hits(home, query, 5)
        assert got_hits(r.json()) == expected and expected[0][0] == image_id
        refined = client.post("/api/search/refine", json={"positive": [image_id], "k": 5})
        assert refined.status_code == 200 and [h["id"] for h in refined.json()["hits"]] == [i for i, _ in expected]
        uploaded = client.post("/api/search", params={"k": 5}, files=upload(query)).json()
        assert got_hits(uploaded) == expected
