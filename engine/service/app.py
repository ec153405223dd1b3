"""The FastAPI application: lifespan (load once, watch the generation), security middleware, the
JSON error shape, the API router and the page.

Middleware, outermost first: trusted Host header (loopback names only when bound to loopback: a
DNS-rebinding page cannot reach the API), security headers, the token (checked before any body is
read), the body cap, and the direct route of search by upload (``DirectRoute``: the hot path skips
FastAPI's routing). No CORS headers are sent: other origins cannot read the API from a browser.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.staticfiles import StaticFiles

from engine.errors import EngineError, ImageError, IndexMissingError
from engine.output import json_ready
from engine.service.api import router, search_upload, upload_router
from engine.service.errors import ServiceError
from engine.service.settings import ServiceConfig
from engine.service.state import SearchState
from engine.service.uploads import MULTIPART_SLACK, BodyLimit, BodyTooLarge

if TYPE_CHECKING:
    from engine.library import Library
    from engine.service.uploads import ASGIApp, Receive, Scope, Send

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
TOKEN_COOKIE = "engine_token"
# The page and its assets: only our own scripts, styles and images (blob: for the local preview).
PAGE_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    body = {"error": message, "status": status, **{k: v for k, v in extra.items() if v is not None}}
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(json_ready(body), status_code=status, headers=headers)  # names: strict UTF-8


def _status_of(exc: EngineError) -> int:
    if isinstance(exc, ServiceError):
        return exc.status
    if isinstance(exc, ImageError):
        return 422
    if isinstance(exc, IndexMissingError):
        return 503
    return 500


def error_response(exc: Exception) -> JSONResponse:
    """The JSON error answer to ``exc``: a ServiceError's own status, 422 for an image that cannot
    be decoded or a request that fails validation, 503 for a library not loaded, an HTTP
    exception's status, 500 (logged) for anything else. The app's exception handlers and
    ``DirectRoute`` both answer through it, so a request gets the same error either way."""
    if isinstance(exc, EngineError):
        status = _status_of(exc)
        if status >= 500:
            log.error("%s: %s", type(exc).__name__, exc)
        return _error(status, str(exc), field=getattr(exc, "field", None), reason=getattr(exc, "reason", None))
    if isinstance(exc, RequestValidationError):
        parts = []
        for err in exc.errors()[:3]:
            where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path"))
            parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg", "invalid")))
        return _error(422, "; ".join(parts) or "invalid request")
    if isinstance(exc, StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail))
    log.error("unexpected error", exc_info=exc)
    first = str(exc).splitlines()[0] if str(exc) else ""
    return _error(500, f"internal error: {type(exc).__name__}: {first}")


class TokenGate:
    """ASGI middleware: with a token configured, every ``/api/`` request must carry
    ``Authorization: Bearer TOKEN`` (or, for GET only, the ``engine_token`` cookie the page sets,
    since an ``<img>`` cannot send a header). Answered 401 before the body is read."""

    def __init__(self, app: ASGIApp, token: str | None):
        self.app = app
        self.token = token.encode() if token else None

    def _allowed(self, scope: Scope) -> bool:
        headers = dict(scope.get("headers") or [])
        scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.token or b""):
            return True
        if scope["method"] in ("GET", "HEAD"):
            for part in headers.get(b"cookie", b"").split(b";"):
                name, _, value = part.strip().partition(b"=")
                value = urllib.parse.unquote_to_bytes(value)  # the page stores it URI-encoded
                if name == TOKEN_COOKIE.encode() and hmac.compare_digest(value, self.token or b""):
                    return True
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.token is None or scope["type"] != "http" or not scope["path"].startswith("/api/") \
                or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        await _error(401, "this service needs its token: send Authorization: Bearer TOKEN")(scope, receive, send)


class SecurityHeaders:
    """ASGI middleware: no MIME sniffing, no referrer, no framing on every response; the page's
    content security policy on the page and its assets."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        page = scope["path"] == "/" or scope["path"].startswith("/static/")

        async def with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                            (b"x-frame-options", b"DENY")]
                if page:
                    headers.append((b"content-security-policy", PAGE_POLICY.encode()))
                message = dict(message, headers=headers)
            await send(message)

        await self.app(scope, receive, with_headers)


class DirectRoute:
    """ASGI middleware: requests for one method and path go straight to ``endpoint`` (a Starlette
    request -> response coroutine), past FastAPI's routing, dependency solving and exception
    middleware; their errors are answered by ``error_response``, as the app answers them. All
    other requests go on to the app.

    For search by upload, the hot path: on the 2-core development machine, with a search that
    alternates with other work (so the caches are cold for the service's own code), the event
    loop spent 0.28 ms per search between the outermost middleware and the handler. The route
    stays registered with FastAPI, so that the OpenAPI document describes it.

    A body over the cap (``BodyTooLarge``, raised while reading) passes on to ``BodyLimit``,
    outside, which refuses it and closes the connection."""

    def __init__(self, app: ASGIApp, method: str, path: str,
                 endpoint: Callable[[Request], Awaitable[Response]]):
        self.app = app
        self.method, self.path, self.endpoint = method, path, endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path or scope["method"] != self.method:
            await self.app(scope, receive, send)
            return
        try:
            response = await self.endpoint(Request(scope, receive))
        except BodyTooLarge:
            raise
        except Exception as exc:  # noqa: BLE001 - every error becomes its JSON answer, as in the app
            response = error_response(exc)
        await response(scope, receive, send)


async def _watch(state: SearchState, every: float) -> None:
    """Pick up an ingest elsewhere: reload the index whenever the library's generation moves.

    A reload of a large library takes a while and an ingest bumps the generation every batch, so
    the next check waits at least four times as long as the last reload took: reloading never
    takes more than a fifth of one thread, however fast the ingest commits."""
    wait = every
    while True:
        await asyncio.sleep(wait)
        started = time.perf_counter()
        try:
            await run_in_threadpool(state.refresh)
        except Exception as exc:  # a failed reload keeps the current snapshot; the next tick retries
            log.warning("index reload failed (%s); still serving generation %d", exc, state.snapshot.generation)
        wait = max(every, 4 * (time.perf_counter() - started))


def create_app(library: Library, config: ServiceConfig = ServiceConfig(), *,
               state: SearchState | None = None) -> FastAPI:
    """The service over ``library``. Its encoder and index load when the app starts (lifespan)
    and are released when it stops. ``state`` lets a caller share an already opened SearchState."""
    search = state or SearchState(library, config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if search.infer is None:
            await run_in_threadpool(search.open)
        watcher = asyncio.create_task(_watch(search, config.poll_s)) if config.poll_s > 0 else None
        try:
            yield
        finally:
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            await run_in_threadpool(search.close)

    app = FastAPI(title="engine", version="1", lifespan=lifespan,
                  description="Image search over an engine library: search by photo or by indexed image, refine "
                              "with relevance feedback, compare two photos, fetch records and thumbnails.")
    app.state.search = search
    app.state.config = config

    async def answer_error(_request: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)

    for kind in (EngineError, RequestValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(kind, answer_error)

    app.include_router(router)
    app.include_router(upload_router)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8",
                            headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    def body_limit(path: str) -> int:
        files = 2 if path == "/api/compare" else 1
        if path == "/api/search/refine":
            return 1 << 20  # JSON: ids and one base64 vector
        return files * config.max_upload_bytes + MULTIPART_SLACK

    # Innermost: the hot route is answered after the host, token and body checks, before routing.
    app.add_middleware(DirectRoute, method="POST", path="/api/search", endpoint=search_upload)
    app.add_middleware(BodyLimit, limit_for=body_limit)
    app.add_middleware(TokenGate, token=config.token)
    app.add_middleware(SecurityHeaders)
    if config.hosts() != ("*",):
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(config.hosts()))
    return app
