"""engine serve: the JSON API through FastAPI's TestClient, the byte cap and the address record
on a real server, and `engine query`/`compare` answered through a running service.

``ServiceProcess`` (a real ``engine serve`` subprocess on a free loopback port) is shared with
test_service_browser.py and test_service_load.py.
"""

from __future__ import annotations

import base64
import io
import json
import os
import select
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from PIL import Image

from engine.library import Library
from engine.service.address import ServiceAddress, address_path, read_address
from engine.service.app import create_app
from engine.service.settings import ServiceConfig
from tests.util import make_folder, make_image

TOKEN = "t0k-for-tests"
MARKUP_NAME = "<img src=x onerror=alert(1)>.png"
N_PHOTOS = 12


def build_library(root: Path, model: str, n: int = N_PHOTOS) -> tuple[Path, Path]:
    """A library of ``n`` seeded photos plus one whose file name is markup: (home, photo folder)."""
    from ingest.pipeline import IngestConfig, ingest_paths

    photos = root / "photos"
    make_folder(photos, n)
    make_image(photos / MARKUP_NAME, 999)
    home = root / "home"
    library = Library(home, device="cpu")
    ingest_paths(library, [photos], IngestConfig(workers=0), model=model)
    library.close()
    return home, photos


def service_env() -> dict[str, str]:
    """Environment for an ``engine serve`` subprocess: offline, no inherited library or faults."""
    inherited = ("ENGINE_FAULT", "ENGINE_HOME", "ENGINE_DATABASE_URL", "ENGINE_TOKEN")
    env = {k: v for k, v in os.environ.items() if not k.startswith(inherited)}
    env.update(ENGINE_OFFLINE="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


class ServiceProcess:
    """``engine serve --port 0`` in a subprocess; ``address`` is read from the service.json it writes."""

    def __init__(self, command: list[str], home: Path, env: dict[str, str], *extra: str):
        self.home = home
        self.proc = subprocess.Popen([*command, "--home", str(home), "--device", "cpu", "serve", "--port", "0", *extra],
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 90
        found: ServiceAddress | None = None
        while time.monotonic() < deadline and self.proc.poll() is None:
            found = read_address(home)
            if found is not None and found.pid == self.proc.pid:
                break
            time.sleep(0.1)
        if found is None or found.pid != self.proc.pid:
            self.stop()
            raise RuntimeError(f"engine serve did not start: {self.proc.stderr.read() if self.proc.stderr else ''}")
        self.address = found

    @property
    def url(self) -> str:
        return self.address.url

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def png_bytes(seed: int, size: tuple[int, int] = (40, 32)) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def library_home(tmp_path_factory, tiny_model) -> tuple[Path, Path]:
    return build_library(tmp_path_factory.mktemp("service"), tiny_model)


@pytest.fixture(scope="module")
def client(library_home):
    home, _ = library_home
    app = create_app(Library(home, device="cpu"), ServiceConfig(poll_s=0, allowed_hosts=("testserver",)))
    with TestClient(app) as c:
        yield c


def id_of(home: Path, path: Path) -> int:
    library = Library(home)
    try:
        return library.store.lookup_paths([str(path)])[str(path)].image_id
    finally:
        library.close()


def upload(path: Path) -> dict:
    return {"image": (path.name, path.read_bytes(), "application/octet-stream")}


# -- endpoints -------------------------------------------------------------------------------------

def test_health_reports_library_size_and_generation(client, library_home):
    home, _ = library_home
    library = Library(home)
    body = client.get("/api/health").json()
    assert body["ok"] is True
    assert body["images"] == N_PHOTOS + 1
    assert body["generation"] == library.store.generation()
    library.close()


def test_search_by_upload_matches_in_process_query(client, library_home):
    from engine.query import search_library

    home, photos = library_home
    query = photos / "img_004.png"
    r = client.post("/api/search", params={"k": 5}, files=upload(query))
    assert r.status_code == 200, r.text
    body = r.json()
    library = Library(home, device="cpu")
    expected = search_library(library, [query], 5)[0].to_dict()["hits"]
    library.close()
    got = body["hits"]
    assert [h["id"] for h in got] == [h["id"] for h in expected]
    assert [set(h) for h in got] == [set(h) for h in expected]  # the hit shape of `engine query --json`
    assert [round(h["score"], 6) for h in got] == [h["score"] for h in expected]
    assert got[0]["path"] == str(query) and body["images"] == N_PHOTOS + 1


def test_search_upload_of_a_new_photo_embeds_it(client, library_home, tmp_path):
    from engine.query import search_library

    fresh = make_image(tmp_path / "fresh.png", 4242)
    body = client.post("/api/search?k=3&vector=true", files=upload(fresh)).json()
    assert len(body["hits"]) == 3 and body["hits"][0]["score"] < 0.99999
    vector = np.frombuffer(base64.b64decode(body["vector"]), "<f4")
    assert vector.shape == (96,) and abs(float(np.linalg.norm(vector)) - 1) < 1e-4
    library = Library(library_home[0], device="cpu")
    expected = search_library(library, [fresh], 3)[0].hits  # ranked as `engine query` ranks (expansion included)
    library.close()
    assert [h["id"] for h in body["hits"]] == [h.id for h in expected]
    assert [h["score"] for h in body["hits"]] == pytest.approx([h.score for h in expected], abs=1e-5)


def test_search_by_id_uses_the_stored_vector(client):
    body = client.get("/api/search", params={"id": 3, "k": 4}).json()
    assert body["hits"][0]["id"] == 3 and body["hits"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert len(body["hits"]) == 4 and body["query"]["id"] == 3
    assert client.get("/api/search", params={"id": 3, "k": 500}).json()["hits"].__len__() == N_PHOTOS + 1


def test_search_threshold_marks_hits(client):
    body = client.get("/api/search", params={"id": 3, "k": 3, "threshold": "0.01"}).json()
    assert [h["similar"] for h in body["hits"]] == [True, False, False]
    assert all("similar" in h for h in client.get("/api/search?id=3&k=2&threshold=model").json()["hits"])
    assert client.get("/api/search?id=3&threshold=abc").status_code == 422


def test_refine_moves_towards_positives_and_drops_negatives(client):
    base = client.get("/api/search", params={"id": 1, "k": N_PHOTOS + 1, "vector": "true"}).json()
    far = base["hits"][-1]["id"]
    near = base["hits"][1]["id"]
    r = client.post("/api/search/refine", json={"positive": [far], "negative": [near], "k": 5,
                                                "vector": base["vector"]})
    assert r.status_code == 200, r.text
    ids = [h["id"] for h in r.json()["hits"]]
    assert near not in ids
    rank_before = [h["id"] for h in base["hits"]].index(far)
    assert far in ids and ids.index(far) < rank_before
    only_marks = client.post("/api/search/refine", json={"positive": [far], "k": 3}).json()
    assert only_marks["hits"][0]["id"] == far


def test_refine_errors(client):
    assert client.post("/api/search/refine", json={"negative": [1], "k": 3}).status_code == 422
    assert client.post("/api/search/refine", json={"positive": [987654]}).status_code == 404
    assert client.post("/api/search/refine", json={"positive": [1], "vector": "not base64!"}).status_code == 422
    short = base64.b64encode(np.zeros(5, "<f4").tobytes()).decode()
    assert client.post("/api/search/refine", json={"positive": [1], "vector": short}).status_code == 422
    nan = base64.b64encode(np.full(96, np.nan, "<f4").tobytes()).decode()
    assert client.post("/api/search/refine", json={"positive": [1], "vector": nan}).status_code == 422
    assert client.post("/api/search/refine", json={"positive": [1], "k": 0}).status_code == 422
    assert client.post("/api/search/refine", content=b"{", headers={"content-type": "application/json"}
                       ).status_code == 422


def test_image_record_and_cached_thumbnail(client, library_home):
    home, photos = library_home
    image_id = id_of(home, photos / "img_001.png")
    record = client.get(f"/api/images/{image_id}").json()
    assert record["path"] == str(photos / "img_001.png") and record["width"] == 40 and record["id"] == image_id
    assert record["thumbnail"] == f"/api/images/{image_id}/thumbnail"
    r = client.get(f"/api/images/{image_id}/thumbnail", params={"size": 200})
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    image = Image.open(io.BytesIO(r.content))
    assert image.format == "JPEG" and max(image.size) <= 256
    cached = home / "thumbnails" / f"{image_id}-256.jpg"  # 200 snaps up to the standard 256
    assert cached.read_bytes() == r.content
    stamp = cached.stat().st_mtime_ns
    assert client.get(f"/api/images/{image_id}/thumbnail?size=256").content == r.content
    assert cached.stat().st_mtime_ns == stamp  # served from the cache, not made again


def test_image_errors(client):
    assert client.get("/api/images/987654").status_code == 404
    assert client.get("/api/images/987654/thumbnail").status_code == 404
    assert client.get("/api/images/abc").status_code == 422
    assert client.get("/api/images/2/thumbnail?size=8").status_code == 422
    assert client.get("/api/images/2/thumbnail?size=4096").status_code == 422
    assert client.get("/api/search").status_code == 422  # no id


def test_thumbnail_of_a_file_gone_from_disk_is_404(client, library_home, tmp_path):
    home, photos = library_home
    victim = photos / "img_011.png"
    image_id = id_of(home, victim)
    keep = victim.read_bytes()
    victim.unlink()
    try:
        r = client.get(f"/api/images/{image_id}/thumbnail?size=64")
        assert r.status_code == 404 and "can no longer be read" in r.json()["error"]
    finally:
        victim.write_bytes(keep)


def test_path_traversal_is_refused(client):
    for url in ("/api/images/..%2F..%2F..%2Fetc%2Fpasswd", "/api/images/../../etc/passwd",
                "/api/images/1/thumbnail?size=../../etc/passwd", "/static/..%2F..%2Fapp.py",
                "/static/../app.py", "/static/%2e%2e/%2e%2e/cli.py", "/api/images/%2e%2e%2f1/thumbnail"):
        r = client.get(url)
        assert r.status_code in (404, 422), (url, r.status_code)
        assert b"root:" not in r.content and b"create_app" not in r.content and b"import click" not in r.content


def test_upload_errors(client, library_home, tmp_path, monkeypatch):
    home, photos = library_home
    r = client.post("/api/search", files={"image": ("notes.jpg", b"just text, not a photo")})
    assert r.status_code == 415 and r.json()["reason"] == "not an image Pillow can identify"
    assert client.post("/api/search", files={"image": ("empty.png", b"")}).status_code == 400
    truncated = (photos / "img_000.png").read_bytes()[:200]
    r = client.post("/api/search", files={"image": ("cut.png", truncated)})
    assert r.status_code == 422 and r.json()["reason"].startswith("cannot decode image")
    assert client.post("/api/search", files={"picture": ("a.png", b"x")}).status_code == 422  # wrong field
    assert client.post("/api/search", data={"image": "a string"}).status_code == 422
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # the limit ingest decodes under
    r = client.post("/api/search", files=upload(make_image(tmp_path / "big.png", 5, (60, 60))))
    assert r.status_code == 413 and "decompression bomb" in r.json()["error"]


def test_compare(client, library_home):
    from engine.query import compare_images

    home, photos = library_home
    a, b = photos / "img_000.png", photos / "img_005.png"
    r = client.post("/api/compare", files={"a": ("a.png", a.read_bytes()), "b": ("b.png", b.read_bytes())})
    assert r.status_code == 200, r.text
    body = r.json()
    library = Library(home, device="cpu")
    expected = compare_images(library.encoder(), str(a), str(b))
    library.close()
    assert body["distance"] == pytest.approx(expected.distance, abs=1e-6)
    assert body["threshold"] == pytest.approx(expected.threshold)
    assert body["verdict"] == ("similar" if expected.similar else "different")
    same = client.post("/api/compare?threshold=0.001", files={"a": ("a.png", a.read_bytes()),
                                                              "b": ("b.png", a.read_bytes())}).json()
    assert same["verdict"] == "similar" and same["distance"] < 1e-3 and same["threshold"] == 0.001
    bad = client.post("/api/compare", files={"a": ("a.png", a.read_bytes()), "b": ("b.txt", b"nope")})
    assert bad.status_code == 415 and bad.json()["field"] == "b"
    assert client.post("/api/compare", files={"a": ("a.png", a.read_bytes())}).status_code == 422


def test_info_is_engine_info(client, library_home):
    from engine.info import describe_library

    home, _ = library_home
    library = Library(home)
    expected = json.loads(json.dumps(describe_library(library), default=str))
    library.close()
    assert client.get("/api/info").json() == expected


def test_markup_file_name_travels_as_data(client, library_home):
    home, photos = library_home
    r = client.post("/api/search?k=1", files=upload(photos / MARKUP_NAME))
    assert r.headers["content-type"] == "application/json"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.json()["hits"][0]["path"] == str(photos / MARKUP_NAME)
    page = client.get("/")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert "script-src 'self'" in page.headers["content-security-policy"]
    script = client.get("/static/app.js").text
    assert ".innerHTML" not in script and "insertAdjacentHTML" not in script  # texts go in as textContent


def test_page_and_openapi(client):
    page = client.get("/")
    assert page.status_code == 200 and '<input id="file" type="file"' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN: works offline
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/health", "/api/search", "/api/search/refine", "/api/images/{image_id}",
            "/api/images/{image_id}/thumbnail", "/api/compare", "/api/info"} <= set(paths)
    assert set(paths["/api/search"]) == {"get", "post"}


def test_no_cors_and_trusted_hosts(client):
    r = client.get("/api/health", headers={"Origin": "https://evil.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    assert client.options("/api/search", headers={"Origin": "https://evil.example",
                                                  "Access-Control-Request-Method": "POST"}).status_code == 405
    assert client.get("/api/health", headers={"Host": "evil.example"}).status_code == 400


def test_token(library_home):
    home, photos = library_home
    app = create_app(Library(home, device="cpu"), ServiceConfig(token="s3cret;=", poll_s=0,
                                                                allowed_hosts=("testserver",)))
    with TestClient(app) as c:
        r = c.get("/api/health")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert "token" in r.json()["error"]
        assert c.get("/api/health", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/api/health", headers={"Authorization": "Basic s3cret;="}).status_code == 401
        assert c.get("/api/health", headers={"Authorization": "Bearer s3cret;="}).status_code == 200
        cookie = {"Cookie": "engine_token=s3cret%3B%3D"}  # what the page stores (URI-encoded)
        assert c.get("/api/images/1/thumbnail", headers=cookie).status_code == 200
        posted = c.post("/api/search", files=upload(photos / "img_000.png"), headers=cookie)
        assert posted.status_code == 401  # the cookie is for <img> GETs only
        huge = {"image": ("x.png", b"0" * (21 * 1024 * 1024))}
        assert c.post("/api/search", files=huge).status_code == 401  # refused before the body matters
        assert c.get("/").status_code == 200  # the page itself holds no data; it asks for the token


def test_upload_cap_by_content_length(library_home):
    home, photos = library_home
    app = create_app(Library(home, device="cpu"), ServiceConfig(max_upload_bytes=1000, poll_s=0,
                                                                allowed_hosts=("testserver",)))
    with TestClient(app) as c:
        big = make_image(photos.parent / "big.png", 7, (80, 80))
        r = c.post("/api/search", files=upload(big))
        assert r.status_code == 413 and "limit" in r.json()["error"]
        small = c.post("/api/search", files={"image": ("s.png", png_bytes(3, (4, 4)))})
        assert small.status_code == 200


def test_generation_reload_swaps_whole_snapshots(library_home, tiny_model, tmp_path):
    """An ingest by another Library (as another process would) is picked up by refresh(); a
    snapshot a request already holds is never changed."""
    from ingest.pipeline import IngestConfig, ingest_paths

    from engine.service.state import SearchState

    home, _ = library_home
    import shutil
    copy = tmp_path / "home"
    shutil.copytree(home, copy)
    state = SearchState(Library(copy, device="cpu"), ServiceConfig(poll_s=0))
    state.open()
    try:
        before = state.snapshot
        assert state.refresh() is False
        writer = Library(copy, device="cpu")
        more = make_folder(tmp_path / "more", 3, seed0=500)
        ingest_paths(writer, [tmp_path / "more"], IngestConfig(workers=0))
        writer.close()
        assert state.refresh() is True
        after = state.snapshot
        assert after is not before and after.images == before.images + 3
        assert after.generation > before.generation
        assert before.index.ntotal == before.images  # the old snapshot is untouched
        vector = state.stored_vectors([1])[0]
        seen = {h.id for h in state.search_vector(vector, 100).hits}
        assert len(seen) == after.images == before.images + len(more)
    finally:
        state.close()


# -- a real server: the address record, the byte cap while reading, the CLI through it -------------

@pytest.fixture(scope="module")
def served(library_home, engine_command):
    home, _ = library_home
    server = ServiceProcess(engine_command, home, service_env(), "--max-upload-mb", "0.05", "--token", TOKEN)
    yield server
    server.stop()


def _http(address: ServiceAddress, raw: bytes) -> tuple[bytes, int]:
    """Send the HTTP request ``raw`` in 4 KiB pieces, stopping as soon as the server answers;
    returns (the response, how many bytes of ``raw`` were sent by then)."""
    sent = 0
    chunks = []
    with socket.create_connection(("127.0.0.1", address.port), timeout=10) as sock:
        try:
            while sent < len(raw):
                if select.select([sock], [], [], 0)[0]:
                    break  # the server answered before the request was complete
                sock.sendall(raw[sent:sent + 4096])
                sent = min(len(raw), sent + 4096)
        except OSError:  # it answered and closed while we were still sending
            pass
        try:
            while data := sock.recv(65536):
                chunks.append(data)
        except OSError:
            pass
    return b"".join(chunks), sent


def test_real_server_refuses_oversized_chunked_upload_while_reading(served):
    boundary = "xyz"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode()
    payload = head + b"\0" * (16 * 1024 * 1024)  # 16 MiB against a 0.05 MiB cap
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(payload[i:i + 8192]), payload[i:i + 8192])
                      for i in range(0, len(payload), 8192)) + b"0\r\n\r\n"
    request = (f"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n"
               f"Authorization: Bearer {TOKEN}\r\n"
               f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n").encode() + chunks
    response, sent = _http(served.address, request)
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    assert b"over the limit" in response
    assert sent < len(request) // 2  # answered while the body was still arriving


def test_real_server_refuses_by_content_length_without_reading(served):
    request = (b"POST /api/compare HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 900000000\r\nConnection: close\r\n"
               b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
               b"Content-Type: multipart/form-data; boundary=x\r\n\r\n")
    response, _ = _http(served.address, request)
    assert response.startswith(b"HTTP/1.1 413")


def test_address_record(served, library_home):
    home, _ = library_home
    record = json.loads(address_path(home).read_text())
    assert record["host"] == "127.0.0.1" and record["port"] == served.address.port
    assert record["token_required"] is True and TOKEN not in address_path(home).read_text()
    assert record["pid"] == served.proc.pid


def _cli(home: Path, *args: str):
    from engine.cli import main

    return CliRunner().invoke(main, ["--home", str(home), "--device", "cpu", *args])


def test_cli_query_and_compare_through_the_service_print_the_same(served, library_home, tmp_path, monkeypatch):
    import engine.query

    home, photos = library_home
    monkeypatch.setenv("ENGINE_TOKEN", TOKEN)
    fresh = make_image(tmp_path / "fresh.png", 777)
    queries = [str(photos / "img_003.png"), str(fresh), str(tmp_path / "missing.png")]

    def in_process(*args, **kwargs):
        raise AssertionError("answered in-process although a service runs")

    for flags in (["--json"], [], ["--json", "--label"], ["--threshold", "0.5"], ["--label", "--exclude-self"]):
        local = _cli(home, "query", *queries, "-k", "4", *flags, "--no-server")
        assert local.exit_code == 0, local.output
        with monkeypatch.context() as m:
            m.setattr(engine.query, "search_library", in_process)
            remote = _cli(home, "query", *queries, "-k", "4", *flags)
        assert remote.exit_code == 0, remote.output
        assert remote.stdout == local.stdout and remote.stderr == local.stderr
    a, b = str(photos / "img_000.png"), str(photos / "img_007.png")
    for flags in (["--json"], [], ["--threshold", "0.2"]):
        local = _cli(home, "compare", a, b, *flags, "--no-server")
        with monkeypatch.context() as m:
            m.setattr(engine.query, "compare_images", in_process)
            remote = _cli(home, "compare", a, b, *flags)
        assert remote.exit_code == local.exit_code == 0, remote.output
        assert remote.stdout == local.stdout
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a photo")
    local, remote = _cli(home, "compare", a, str(bad), "--no-server"), _cli(home, "compare", a, str(bad))
    assert remote.exit_code == local.exit_code == 1 and remote.stderr == local.stderr


def test_cli_falls_back_in_process_when_the_record_is_stale(library_home, tmp_path):
    home, photos = library_home
    import shutil
    copy = tmp_path / "home"
    shutil.copytree(home, copy, ignore=shutil.ignore_patterns("service.json"))
    dead = ServiceAddress(host="127.0.0.1", port=9, pid=2 ** 22 + 12345, token_required=False, database="",
                          instance="x", max_upload_bytes=1)
    (copy / "service.json").write_text(json.dumps(dead.__dict__))
    assert read_address(copy) is None  # its process is gone
    r = _cli(copy, "query", str(photos / "img_001.png"), "-k", "2", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["hits"][0]["path"] == str(photos / "img_001.png")


def test_serve_refuses_a_taken_port_and_warns_without_token(library_home, tmp_path):
    home, _ = library_home
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        r = _cli(home, "serve", "--port", str(taken.getsockname()[1]))
    assert r.exit_code == 1 and "cannot listen on 127.0.0.1" in r.stderr and "Traceback" not in r.stderr
    empty = _cli(tmp_path / "nothing", "serve", "--port", "0", "--host", "0.0.0.0")
    assert empty.exit_code == 1 and "without --token" in empty.stderr and "engine ingest" in empty.stderr


def test_cli_without_the_token_answers_in_process(served, library_home, monkeypatch):
    home, photos = library_home
    monkeypatch.delenv("ENGINE_TOKEN", raising=False)
    import engine.service.client as client_module

    monkeypatch.setattr(client_module.ServiceClient, "request", lambda *a, **k: pytest.fail("asked the service"))
    r = _cli(home, "query", str(photos / "img_001.png"), "-k", "2", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["hits"][0]["path"] == str(photos / "img_001.png")


def test_zz_serve_stops_on_ctrl_c_and_removes_its_record(served, library_home):
    """Last in this module: stops the module's server."""
    home, _ = library_home
    assert served.stop(signal.SIGINT) == 0
    assert not address_path(home).exists()
    assert "serving http://127.0.0.1:" in served.proc.stderr.read()


def test_rocchio_and_settings():
    from engine.service.errors import Unprocessable
    from engine.service.feedback import rocchio
    from engine.service.settings import default_workers, is_loopback

    e = np.eye(3, dtype=np.float32)
    assert np.allclose(rocchio(None, e[:1], np.zeros((0, 3), np.float32)), e[0])
    moved = rocchio(e[0], e[1:2], e[2:3])
    assert np.isclose(np.linalg.norm(moved), 1) and moved[0] > moved[1] > 0 > moved[2]
    with pytest.raises(Unprocessable):
        rocchio(None, np.zeros((0, 3), np.float32), e[:1])
    with pytest.raises(Unprocessable):  # the marks cancel out
        rocchio(None, e[:1], e[:1], beta=1.0, gamma=1.0)
    assert [default_workers(c) for c in (1, 2, 8, 16, 64)] == [1, 2, 8, 8, 8]
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2") and not is_loopback("example.com")


def test_exclude_path_is_looked_up_never_resolved(client, library_home, tmp_path):
    home, photos = library_home
    target = photos / "img_002.png"
    link = tmp_path / "link.png"
    link.symlink_to(target)
    own = id_of(home, target)

    def ids(**params):
        return [h["id"] for h in client.post("/api/search", params={"k": 5, **params}, files=upload(target)).json()["hits"]]

    assert own in ids(exclude_path=str(link))  # the server does not follow the link on its disk
    assert own not in ids(exclude_path=[str(link), str(target)])  # the client sends the real path too
    assert own not in ids(exclude_path=str(target))
