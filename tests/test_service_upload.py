"""The search-by-upload hot path: the multipart body parsed while it streams in (caps while
reading), and the indexed-bytes lookup skipped when no indexed file has the upload's size."""

from __future__ import annotations

import asyncio

import pytest
from fastapi.testclient import TestClient

from engine.library import Library
from engine.service.app import create_app
from engine.service.errors import BadRequest, TooLarge, Unprocessable
from engine.service.settings import ServiceConfig
from engine.service.uploads import read_file_field
from tests.test_service import build_library, id_of, upload
from tests.util import make_image

BOUNDARY = "b0undary"
HEADERS = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}


def part(name: str, data: bytes, filename: str | None = "f.png") -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
    return f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"


def body(*parts: bytes) -> bytes:
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def read(raw: bytes, limit: int = 1000, chunk: int = 7, headers: dict | None = None) -> tuple[tuple[bytes, str], int]:
    """read_file_field over ``raw`` sent in ``chunk``-byte pieces: (its answer, pieces pulled)."""
    pulled = 0

    async def stream():
        nonlocal pulled
        for at in range(0, len(raw), chunk):
            pulled += 1
            yield raw[at:at + chunk]

    async def run():
        return await read_file_field(headers or HEADERS, stream(), "image", limit)

    try:
        return asyncio.run(run()), pulled
    except Exception as exc:
        exc.pulled = pulled  # type: ignore[attr-defined]
        raise


def test_multipart_reader_keeps_the_file_and_its_name():
    (data, name), _ = read(body(part("other", b"ignored", None), part("image", b"\x89PNG\r\n--not-a-boundary",
                                                                       "a b.png")))
    assert data == b"\x89PNG\r\n--not-a-boundary" and name == "a b.png"
    (data, _), _ = read(body(part("image", b"first"), part("image", b"second")))
    assert data == b"second"  # a repeated field: the last, as a form's get() gives


def test_multipart_reader_refuses_while_reading():
    raw = body(part("image", b"x" * 10_000))
    with pytest.raises(TooLarge) as caught:
        read(raw, limit=100, chunk=50)
    assert caught.value.status == 413 and caught.value.field == "image"
    assert caught.value.pulled * 50 < 400  # refused within a few pieces, not after the 10 kB


@pytest.mark.parametrize("raw, headers, error", [
    (body(part("picture", b"x")), None, Unprocessable),            # no such field
    (body(part("image", b"a string", None)), None, Unprocessable),  # a text value, not a file
    (body(part("image", b"x")), {"content-type": "application/json"}, Unprocessable),
    (body(part("image", b"")), None, BadRequest),                   # empty file
    (part("image", b"cut off") [:-2], None, BadRequest),             # body ends inside the file
])
def test_multipart_reader_errors(raw, headers, error):
    with pytest.raises(error):
        read(raw, headers=headers)


def test_indexed_bytes_lookup_only_when_an_indexed_file_has_that_size(tmp_path, tiny_model):
    """Before: every upload hashed its bytes and queried the database (~0.3 ms). Now a fresh photo
    whose size no indexed file has skips both; an indexed photo still searches its stored vector,
    and a file ingested later is recognised once the watcher reloaded."""
    from ingest.pipeline import IngestConfig, ingest_paths

    home, photos = build_library(tmp_path / "lib", tiny_model, n=6)
    fresh = make_image(tmp_path / "fresh.png", 4242, (57, 43))
    library = Library(home)
    sizes = {size for _, size, _ in library.store.file_stats()}
    library.close()
    assert fresh.stat().st_size not in sizes
    app = create_app(Library(home, device="cpu"), ServiceConfig(poll_s=0, allowed_hosts=("testserver",)))
    with TestClient(app) as client:
        state = app.state.search
        store = state.library.store
        calls: list[list[str]] = []
        real = store.lookup_hashes
        store.lookup_hashes = lambda hashes: calls.append(list(hashes)) or real(hashes)  # type: ignore[method-assign]
        assert client.post("/api/search", params={"k": 3}, files=upload(fresh)).status_code == 200
        assert calls == []
        indexed = photos / "img_002.png"
        hits = client.post("/api/search", params={"k": 3}, files=upload(indexed)).json()["hits"]
        assert len(calls) == 1 and hits[0]["id"] == id_of(home, indexed) and hits[0]["score"] == pytest.approx(1, abs=1e-6)
        more = tmp_path / "more"
        more.mkdir()
        (more / "fresh.png").write_bytes(fresh.read_bytes())
        writer = Library(home, device="cpu")
        ingest_paths(writer, [more], IngestConfig(workers=0))
        writer.close()
        assert state.refresh() is True and state.snapshot.sizes.ready
        calls.clear()
        hits = client.post("/api/search", params={"k": 3}, files=upload(fresh)).json()["hits"]
        assert len(calls) == 1 and hits[0]["path"] == str(more / "fresh.png")


def test_snapshot_reloaded_by_a_request_fills_its_sizes_on_the_next_tick(tmp_path, tiny_model):
    from ingest.pipeline import IngestConfig, ingest_paths

    home, _ = build_library(tmp_path / "lib", tiny_model, n=4)
    app = create_app(Library(home, device="cpu"), ServiceConfig(poll_s=0, allowed_hosts=("testserver",)))
    with TestClient(app):
        state = app.state.search
        writer = Library(home, device="cpu")
        make_image(tmp_path / "more" / "one.png", 77)
        ingest_paths(writer, [tmp_path / "more"], IngestConfig(workers=0))
        writer.close()
        assert state.refresh(fill_sizes=False) is True and not state.snapshot.sizes.ready
        assert state.snapshot.sizes.may_hold(123456789)  # unknown yet: the lookup is done
        assert state.refresh() is False and state.snapshot.sizes.ready
        assert not state.snapshot.sizes.may_hold(123456789)
