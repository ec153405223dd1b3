"""The client ``engine query`` and ``engine compare`` use to reach a running ``engine serve``:
the standard library and httptools' C parser only (``engine.service.transport``), so the CLI
starts as fast as before.

``connect`` finds the service through the ``service.json`` record in the library home and checks
it with one quick health request; any doubt (no record, a dead process, another database, a token
needed but not given, no answer within a second) means no service, and the caller answers
in-process. The results are built as the in-process functions build them, so the CLI prints the
same either way.
"""

from __future__ import annotations

import json
import os
import secrets
import urllib.parse
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Sequence

from engine.service.address import ServiceAddress, database_fingerprint, read_address
from engine.service.transport import Connection, TransportError

if TYPE_CHECKING:
    from engine.filters import HitFilter
    from engine.query import Comparison, QueryResult

TOKEN_ENV = "ENGINE_TOKEN"
HEALTH_TIMEOUT_S = 1.0
REQUEST_TIMEOUT_S = 300.0


class NoService(Exception):
    """The service cannot answer this request as the in-process code would; answer in-process."""


@dataclass(frozen=True)
class RemoteRecord:
    """The facts of an indexed image that a hit carries, rebuilt from the service's JSON; reads
    like ``db.store.ImageRecord`` where the CLI prints hits."""

    width: int | None
    height: int | None
    format: str | None
    bytes: int | None
    taken_at: datetime | None
    camera: str | None

    @classmethod
    def from_hit(cls, hit: dict[str, Any]) -> "RemoteRecord":
        taken = hit.get("taken_at")
        return cls(hit.get("width"), hit.get("height"), hit.get("format"), hit.get("bytes"),
                   datetime.fromisoformat(taken) if taken else None, hit.get("camera"))

    def to_dict(self) -> dict[str, Any]:
        return {"width": self.width, "height": self.height, "format": self.format, "bytes": self.bytes,
                "taken_at": self.taken_at.isoformat() if self.taken_at else None, "camera": self.camera}


def _multipart(files: Sequence[tuple[str, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body of ``(field, bytes)`` files and its content type."""
    boundary = "engine-" + secrets.token_hex(16)
    chunks = []
    for field, data in files:
        chunks += [f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{field}\"\r\n"
                   "Content-Type: application/octet-stream\r\n\r\n".encode(), data, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


class ServiceClient:
    """Requests to one running service over one kept-alive connection (``transport.Connection``)."""

    def __init__(self, address: ServiceAddress, token: str | None = None):
        self.address = address
        self.token = token
        self._conn: Connection | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def request(self, method: str, path: str, *, body: bytes | None = None, content_type: str | None = None,
                timeout: float = REQUEST_TIMEOUT_S) -> tuple[int, dict[str, Any]]:
        """(status, decoded JSON body). Raises NoService when the service does not answer."""
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if content_type:
            headers["Content-Type"] = content_type
        if self._conn is None:
            host = self.address.url.split("://", 1)[1].rsplit(":", 1)[0].strip("[]")
            self._conn = Connection(host, self.address.port)
        for attempt in (0, 1):  # a kept-alive connection the server closed meanwhile: reconnect once
            try:
                status, raw = self._conn.request(method, path, headers, body, timeout)
                break
            except TransportError as exc:
                if attempt:
                    raise NoService(str(exc)) from None
        try:
            return status, json.loads(raw or b"{}")
        except ValueError:
            raise NoService(f"{path} answered {status} without JSON") from None

    def health(self) -> dict[str, Any] | None:
        try:
            status, body = self.request("GET", "/api/health", timeout=HEALTH_TIMEOUT_S)
        except NoService:
            return None
        ok = status == 200 and body.get("ok") and body.get("instance") == self.address.instance
        return body if ok else None

    def search(self, data: bytes, k: int, threshold: float | str | None,
               extra: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        """extra: more query parameters (filters; a list value repeats the parameter)."""
        params: dict[str, Any] = {"k": k} if threshold is None else {"k": k, "threshold": repr(threshold) if isinstance(
            threshold, float) else threshold}
        params.update(extra or {})
        body, kind = _multipart([("image", data)])
        return self.request("POST", "/api/search?" + urllib.parse.urlencode(params, doseq=True), body=body,
                            content_type=kind)

    def compare(self, a: bytes, b: bytes, threshold: float | None) -> tuple[int, dict[str, Any]]:
        query = "" if threshold is None else "?" + urllib.parse.urlencode({"threshold": repr(float(threshold))})
        body, kind = _multipart([("a", a), ("b", b)])
        return self.request("POST", "/api/compare" + query, body=body, content_type=kind)


def connect(home: str | os.PathLike | None, database_url: str | None = None, *,
            token: str | None = None) -> ServiceClient | None:
    """A client of the service serving the library in ``home`` (None: the default home) over
    ``database_url`` (None: $ENGINE_DATABASE_URL, else the home's SQLite file, as ``Library``
    resolves them), or None when none answers. ``token`` defaults to $ENGINE_TOKEN."""
    from engine.config import default_home

    database_url = database_url or os.environ.get("ENGINE_DATABASE_URL") or None
    address = read_address(home or default_home())
    if address is None or address.database != database_fingerprint(database_url):
        return None
    token = token or os.environ.get(TOKEN_ENV) or None
    if address.token_required and not token:
        return None
    client = ServiceClient(address, token)
    if client.health() is None:
        client.close()
        return None
    return client


def _read_files(client: ServiceClient, paths: Sequence[str]) -> list[bytes]:
    """The bytes of ``paths``; NoService for a file the service could not take (unreadable here,
    or over its upload cap): the in-process path then reports or handles it as it always does."""
    out = []
    for path in paths:
        try:
            if os.path.getsize(path) > client.address.max_upload_bytes:
                raise NoService(f"{path} is over the service's upload cap")
            with open(path, "rb") as fh:
                out.append(fh.read())
        except OSError as exc:
            raise NoService(str(exc)) from None
    return out


def _hits(rows: list[dict[str, Any]]) -> list[Any]:
    from engine.query import Hit

    return [Hit(int(r["rank"]), int(r["id"]), r["path"], float(r["score"]), float(r["distance"]),
                RemoteRecord.from_hit(r), r.get("similar"), tuple(r.get("aliases") or ())) for r in rows]


def _query_result(client: ServiceClient, path: str, data: bytes, k: int,
                  threshold: float | str | None, extra: dict[str, Any] | None = None,
                  exclude_self: bool = False) -> QueryResult:
    from engine.query import QueryResult

    if not data:  # a file is read as a path in-process, where Pillow names an empty one so
        return QueryResult(path, error="not an image Pillow can identify")
    # Both names of the query's file, as search_library looks it up (the service never resolves
    # them): its own file never expands the query, and with exclude_self it is no hit either.
    names = sorted({path, os.path.realpath(path)})
    extra = dict(extra or {}, own_path=names)
    if exclude_self:
        extra["exclude_path"] = names
    status, body = client.search(data, k, threshold, extra)
    if status == 200:
        return QueryResult(path, _hits(body["hits"]))
    if status in (400, 413, 415, 422) and body.get("field") == "image" and body.get("reason"):
        return QueryResult(path, error=body["reason"])
    raise NoService(f"search answered {status}: {body.get('error')}")


def _search(client: ServiceClient, images: Sequence[str | os.PathLike], k: int, *,
            threshold: float | str | None = None, hit_filter: HitFilter | None = None,
            exclude_self: bool = False) -> list[QueryResult] | None:
    """``engine.query.search_library`` answered by the service: the same QueryResults in the same
    order (one per missing path first, then one per image file found under ``images``), or None
    when the service cannot answer all of them (the caller then searches in-process).

    threshold: an L2 distance, ``"model"`` (the encoder's calibrated one) or None; hit_filter and
    exclude_self as ``search_library`` takes them."""
    from engine.errors import EngineError
    from engine.files import find_images
    from engine.preprocess import image_suffixes
    from engine.query import QueryResult

    found = find_images(images, image_suffixes())
    missing = [QueryResult(path, error=reason) for path, reason in found.missing]
    if not found.files and not missing:
        raise EngineError("no image files under " + ", ".join(os.fspath(p) for p in images))
    try:
        datas = _read_files(client, found.files)
        extra = hit_filter.to_query() if hit_filter is not None else {}
        return missing + [_query_result(client, p, d, k, threshold, extra, exclude_self)
                          for p, d in zip(found.files, datas)]
    except NoService:
        return None


def _compare(client: ServiceClient, a: str, b: str, threshold: float | None) -> Comparison | None:
    """``engine.query.compare_images`` with the library's encoder, answered by the service, or
    None when it cannot (a file unreadable here: the in-process path reports it as always).
    Raises ImageError for a file that does not decode, worded as in-process."""
    from engine.errors import ImageError
    from engine.query import Comparison

    try:
        data_a, data_b = _read_files(client, [a, b])
        if not data_a or not data_b:
            return None
        status, body = client.compare(data_a, data_b, threshold)
    except NoService:
        return None
    if status == 200:
        return Comparison(a, b, float(body["distance"]), float(body["threshold"]), body["verdict"] == "similar")
    if status in (400, 413, 415, 422) and body.get("field") in ("a", "b") and body.get("reason"):
        raise ImageError(f"{a if body['field'] == 'a' else b}: {body['reason']}")
    return None


def search_via_service(home: str | os.PathLike | None, database_url: str | None, images: Sequence[str | os.PathLike],
                       k: int, *, threshold: float | str | None = None, hit_filter: HitFilter | None = None,
                       exclude_self: bool = False) -> list[QueryResult] | None:
    """What ``search_library`` returns, from the service serving this library, or None when no
    service answers for it (see ``connect``) or it cannot answer this query as in-process would."""
    client = connect(home, database_url)
    if client is None:
        return None
    try:
        return _search(client, images, k, threshold=threshold, hit_filter=hit_filter, exclude_self=exclude_self)
    finally:
        client.close()


def compare_via_service(home: str | os.PathLike | None, database_url: str | None, a: str, b: str, *,
                        threshold: float | None = None) -> Comparison | None:
    """What ``compare_images`` with the library's encoder returns, from the service serving this
    library, or None when there is none (see ``connect``)."""
    client = connect(home, database_url)
    if client is None:
        return None
    try:
        return _compare(client, a, b, threshold)
    finally:
        client.close()
