"""Uploads: the byte cap, enforced while the request body is read, and decoding an uploaded image
through the one preprocessing path (``engine.preprocess``), with the pixel cap ingest has.

Status codes: 413 for a body or file over the cap (bytes) or a decompression bomb (pixels), 400 for
an empty file, 415 for bytes that are not an image, 422 for an image that cannot be decoded.
``read_file_field`` parses a multipart body with python-multipart's streaming parser directly:
the search-by-upload route's leaner path (no spooled file, no form object, no thread hop).
"""

from __future__ import annotations

import io
import json
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Mapping

from starlette.exceptions import HTTPException

from engine.errors import ImageError
from engine.service.errors import BadRequest, TooLarge, Unprocessable, UnsupportedImage

if TYPE_CHECKING:
    from PIL import Image

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MULTIPART_SLACK = 64 * 1024  # part headers and boundaries around the files


class BodyTooLarge(HTTPException):
    """Raised from inside ``receive``; an HTTPException so that FastAPI's body parsing passes it
    on as it is (anything else becomes its generic 400) and the app answers it as 413."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body over the limit of {limit} bytes")


class BodyLimit:
    """ASGI middleware: a request whose body exceeds ``limit_for(path)`` bytes is answered 413,
    at once when its Content-Length says so, else as soon as the bytes read pass the limit (the
    rest is never read, so an endless chunked upload costs at most the limit)."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int]):
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _refuse(send, limit)
            return
        seen = 0
        started = False

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except BodyTooLarge:
            if not started:
                await _refuse(send, limit)


async def _refuse(send: Send, limit: int) -> None:
    body = json.dumps({"error": f"request body over the limit of {limit} bytes", "status": 413}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class _FilePart:
    """python-multipart callbacks that keep the bytes of the file field ``field`` (the last one
    when several are sent), refusing it with TooLarge as soon as it passes ``limit`` bytes."""

    def __init__(self, field: str, limit: int):
        self.field, self.limit = field, limit
        self.data: bytearray | None = None
        self.filename: str | None = None
        self.plain_value = False  # a field of that name that is not a file
        self.complete = False
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._disposition: bytes | None = None
        self._target: bytearray | None = None

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {"on_part_begin": self._begin, "on_header_field": self._name, "on_header_value": self._value,
                "on_header_end": self._header_end, "on_headers_finished": self._headers_done,
                "on_part_data": self._data, "on_part_end": self._end}

    def _begin(self) -> None:
        self._disposition, self._target = None, None
        self._header_name.clear()
        self._header_value.clear()

    def _name(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        if bytes(self._header_name).lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def _headers_done(self) -> None:
        from python_multipart.multipart import parse_options_header

        _, options = parse_options_header(self._disposition or b"")
        if options.get(b"name", b"").decode("utf-8", "replace") != self.field:
            return
        if b"filename" not in options:
            self.plain_value = True
            return
        self.filename = options[b"filename"].decode("utf-8", "replace")
        self.data = self._target = bytearray()
        self.complete = False

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._target is None:
            return
        if len(self._target) + (end - start) > self.limit:
            raise TooLarge(f"{self.field}: file over the limit of {self.limit} bytes", field=self.field)
        self._target += data[start:end]

    def _end(self) -> None:
        if self._target is not None:
            self.complete = True
        self._target = None


async def read_file_field(headers: Mapping[str, str], stream: AsyncIterator[bytes], field: str,
                          limit: int) -> tuple[bytes, str]:
    """The bytes and file name of the file field ``field`` of a multipart/form-data body, parsed
    while it streams in: a file over ``limit`` bytes is refused (TooLarge, 413) as soon as it
    passes the limit, the rest never read. Unprocessable (422) when the body is not multipart or
    has no such file; BadRequest (400) for a malformed body or an empty file."""
    from python_multipart.multipart import MultipartParseError, MultipartParser, parse_options_header

    kind, options = parse_options_header(headers.get("content-type"))
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise Unprocessable(f"{field}: a multipart/form-data upload with a file field '{field}' is required",
                            field=field)
    part = _FilePart(field, limit)
    try:
        parser = MultipartParser(boundary, part.callbacks())
        async for chunk in stream:
            if chunk:
                parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        raise BadRequest(f"malformed multipart body: {exc}") from None
    if part.data is None:
        what = "a file, not a text value" if part.plain_value else "required"
        raise Unprocessable(f"{field}: {what} (multipart file field '{field}')", field=field)
    if not part.complete:
        raise BadRequest(f"{field}: the upload ended inside the file", field=field)
    return check_size(bytes(part.data), limit, field), part.filename or ""


def check_size(data: bytes, limit: int, field: str) -> bytes:
    """``data`` when it is within ``limit`` bytes and not empty; else TooLarge / BadRequest."""
    if len(data) > limit:
        raise TooLarge(f"{field}: file of {len(data)} bytes is over the limit of {limit} bytes", field=field)
    if not data:
        raise BadRequest(f"{field}: empty file (0 bytes)", field=field, reason="empty file (0 bytes)")
    return data


def decode_upload(data: bytes, field: str, draft_size: int | None) -> Image.Image:
    """The uploaded bytes as an RGB image, decoded exactly as ingest decodes a file (same EXIF
    handling, same draft reduction, same decompression-bomb limit). Raises a ServiceError whose
    ``reason`` is the text ``engine query`` gives for the same file."""
    from engine.preprocess import open_image

    try:
        # A file object, not bytes: open_image then reads it as it reads a path.
        image, _ = open_image(io.BytesIO(data), draft_size=draft_size)
    except ImageError as exc:
        reason = str(exc)
        # The reasons are engine.preprocess's own wording; tests pin each mapping.
        if reason.startswith("decompression bomb"):
            kind: type = TooLarge
        elif reason.startswith("not an image"):
            kind = UnsupportedImage
        else:
            kind = Unprocessable
        raise kind(f"{field}: {reason}", field=field, reason=reason) from None
    return image
