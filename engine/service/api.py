"""The JSON API under ``/api``. Every handler is a thin shell: read and check the request, run the
blocking work off the event loop (decoding and the encoder on the service's inference threads,
index and database on the app's thread pool), shape the answer.

No handler reads or writes a path taken from the request: images are addressed by id, uploads are
bytes, and thumbnails are made from the file the library indexed under that id.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import json
import time
from datetime import datetime
from typing import Annotated, Any, Callable, Optional, TypeVar

import numpy as np
from fastapi import APIRouter, Depends, File, Query, Request, UploadFile
from fastapi.responses import FileResponse, Response
from fastapi.security import HTTPBearer
from starlette.concurrency import run_in_threadpool

from engine.errors import EngineError
from engine.filters import HitFilter
from engine.output import json_ready
from engine.service.errors import Unprocessable
from engine.service.schemas import (MAX_K, CompareResponse, ErrorResponse, HealthResponse, ImageResponse,
                                    RefineRequest, SearchResponse, parse_upload_query, upload_search_openapi)
from engine.service.state import Ranking, SearchState, Snapshot
from engine.service.thumbnails import snap_size
from engine.service.uploads import check_size, read_file_field

T = TypeVar("T")

# The token itself is checked by the app's middleware, before any body is read; this only makes
# the OpenAPI page offer an "Authorize" button.
_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer TOKEN, when the service has one")

_errors: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text} for code, text in (
        (400, "bad request or empty upload"), (401, "token missing or wrong"), (404, "unknown id"),
        (413, "upload over the byte or pixel limit"), (415, "upload is not an image"),
        (422, "invalid parameter, or an image that cannot be decoded"))}

router = APIRouter(prefix="/api", dependencies=[Depends(_bearer)], responses=_errors)

K = Annotated[int, Query(ge=1, le=MAX_K, description="how many neighbours")]
Threshold = Annotated[Optional[str], Query(description="an L2 distance, or 'model' for the encoder's calibrated "
                                                       "one: each hit then says whether it is similar")]
WantVector = Annotated[bool, Query(description="also return the query vector (for /api/search/refine)")]


async def _filters(max_distance: Annotated[Optional[float], Query(description="only hits at this L2 distance or closer")] = None,
             taken_after: Annotated[Optional[datetime], Query(description="only photos captured at or after")] = None,
             taken_before: Annotated[Optional[datetime], Query(description="only photos captured before")] = None,
             camera: Annotated[Optional[str], Query(max_length=128, description="camera make/model contains")] = None,
             under: Annotated[Optional[list[str]], Query(description="only files in this folder (repeatable)")] = None,
             exclude_path: Annotated[Optional[list[str]], Query(max_length=8, description="leave out the image "
                                                                "indexed at this path (the query's own file; "
                                                                "repeatable: the path and its real path)")] = None,
             ) -> tuple[HitFilter, list[str]]:
    """The search filters of engine.filters.HitFilter as query parameters: the k best hits that
    pass come back (nothing is lost to a filter). Paths here only select database rows: none is
    opened, resolved or even stat'ed."""
    return _hit_filter(max_distance, taken_after, taken_before, camera, under), exclude_path or []


def _hit_filter(max_distance: float | None, taken_after: datetime | None, taken_before: datetime | None,
                camera: str | None, under: list[str] | None) -> HitFilter:
    try:
        return HitFilter(max_distance, taken_after, taken_before, camera, tuple(under or ()))
    except EngineError as exc:
        raise Unprocessable(str(exc)) from None


Filters = Annotated[tuple, Depends(_filters)]


async def _state(request: Request) -> SearchState:
    # async, as _filters: FastAPI runs a plain-def dependency on its thread pool, a hop per request
    return request.app.state.search


State = Annotated[SearchState, Depends(_state)]


async def _infer(state: SearchState, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn`` on the inference threads (bounded, sized for the cores)."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(state.infer, functools.partial(fn, *args))


def _encode_vector(vector: np.ndarray) -> str:
    return base64.b64encode(np.asarray(vector, "<f4").tobytes()).decode("ascii")


def _decode_vector(text: str, dim: int) -> np.ndarray:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise Unprocessable("vector: not base64") from None
    if len(raw) != 4 * dim:
        raise Unprocessable(f"vector: expected {dim} float32 values, got {len(raw) / 4:g}")
    vector = np.frombuffer(raw, "<f4").astype(np.float32)
    if not np.all(np.isfinite(vector)):
        raise Unprocessable("vector: values must be finite")
    return vector


def _hit_dicts(ranking: Ranking) -> list[dict[str, Any]]:
    out = []
    for hit in ranking.hits:
        row = hit.to_dict()
        row["score"], row["distance"] = hit.score, hit.distance  # full precision: clients round as they print
        out.append(row)
    return out


def _json_body(content: dict[str, Any]) -> bytes:
    """``content`` as the UTF-8 JSON text JSONResponse renders, strict as engine.output's JSON:
    undecodable bytes in names as ``\\xNN``, non-finite numbers as null. Encoded as it is when
    it already is strict (almost always), through ``json_ready`` only when that fails: walking
    every value first cost a fifth of a millisecond per search."""
    try:
        return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
    except ValueError:  # a NaN or infinity, or a lone surrogate (UnicodeEncodeError is a ValueError)
        return json.dumps(json_ready(content), ensure_ascii=False, allow_nan=False,
                          separators=(",", ":")).encode("utf-8")


def _answer(ranking: Ranking, started: float, query: dict[str, Any], vector: np.ndarray | None) -> Response:
    """The search answer. Returned as a response, so FastAPI skips validating it against
    SearchResponse (which still documents it): that cost a millisecond per search."""
    out: dict[str, Any] = {"hits": _hit_dicts(ranking), "images": ranking.snapshot.images,
                           "generation": ranking.snapshot.generation,
                           "took_ms": round((time.perf_counter() - started) * 1000, 3), "query": query}
    if vector is not None:
        out["vector"] = _encode_vector(vector)
    return Response(_json_body(out), media_type="application/json")


async def _read(upload: UploadFile, state: SearchState, field: str) -> bytes:
    return check_size(await upload.read(), state.config.max_upload_bytes, field)


@router.get("/health", response_model=HealthResponse, summary="Liveness, library size and generation")
async def health(state: State) -> dict[str, Any]:
    snapshot = state.snapshot
    return {"ok": True, "images": snapshot.images, "generation": snapshot.generation, "instance": state.instance}


# Search by upload is the hot path: its handler parses its own query (one pydantic model) and
# streams the multipart body through python-multipart's parser itself (no spooled file, no form
# object, no dependency solving), on a router without the bearer dependency (the middleware has
# checked the token already); its parameters are documented by hand.
upload_router = APIRouter(prefix="/api", responses=_errors)


@upload_router.post("/search", response_model=SearchResponse, response_model_exclude_unset=True,
                    summary="Search by an uploaded photo (multipart field 'image')",
                    openapi_extra=upload_search_openapi("image", "the query photo"))
async def search_upload(request: Request) -> Response:
    started = time.perf_counter()
    state: SearchState = request.app.state.search
    params = parse_upload_query(request.query_params)
    hit_filter = _hit_filter(params.max_distance, params.taken_after, params.taken_before, params.camera,
                             params.under)
    exclude_path = params.exclude_path or []
    data, name = await read_file_field(request.headers, request.stream(), "image", state.config.max_upload_bytes)

    def work() -> Response:
        # One job on one inference thread: embed, search and render the answer without a hop
        # between thread pools (torch's and FAISS's OpenMP teams would otherwise spin against each
        # other), the hits still in this core's cache when they become JSON. One snapshot: the
        # encoder that embeds and the index searched belong together.
        snapshot = state.snapshot
        limit = state.resolve_threshold(params.threshold, snapshot)
        found, indexed_id = state.query_vector(data, snapshot=snapshot)
        exclude = state.own_ids(exclude_path) if exclude_path else ()
        own = state.upload_own_ids(params.own_path or [], indexed_id)
        ranking = state.search_vector(found, params.k, threshold=limit, hit_filter=hit_filter, exclude=exclude,
                                      own=own, snapshot=snapshot)
        return _answer(ranking, started, {"name": name, "bytes": len(data)}, found if params.vector else None)

    return await _infer(state, work)


@router.get("/search", response_model=SearchResponse, response_model_exclude_unset=True,
            summary="Neighbours of an indexed image (its stored vector; nothing is decoded)")
async def search_id(state: State, id: Annotated[int, Query(ge=0, description="an indexed image's id")],
                    filters: Filters, k: K = 10, threshold: Threshold = None,
                    vector: WantVector = False) -> Response:
    started = time.perf_counter()
    hit_filter, exclude_path = filters

    def work(snapshot: Snapshot) -> Response:
        limit = state.resolve_threshold(threshold, snapshot)
        stored = state.stored_vectors([id], snapshot)[0]
        exclude = state.own_ids(exclude_path) if exclude_path else ()
        # The image itself is the query's own file, as for `engine query` on its path.
        ranking = state.search_vector(stored, k, threshold=limit, hit_filter=hit_filter, exclude=exclude,
                                      own=[id], snapshot=snapshot)
        return _answer(ranking, started, {"id": id, "path": state.record(id).path}, stored if vector else None)

    return await run_in_threadpool(state.consistent, work)


@router.post("/search/refine", response_model=SearchResponse, response_model_exclude_unset=True,
             summary="Relevance feedback: neighbours of the query moved towards 'more like this' and away "
                     "from 'less like this' results (Rocchio on stored vectors)")
async def search_refine(state: State, body: RefineRequest, vector: WantVector = False) -> Response:
    started = time.perf_counter()

    def work(snapshot: Snapshot) -> Response:
        original = None if body.vector is None else _decode_vector(body.vector, snapshot.dim)
        ranking, refined = state.refine(body.positive, body.negative, original, body.k, snapshot)
        return _answer(ranking, started, {"positive": body.positive, "negative": body.negative},
                       refined if vector else None)

    return await run_in_threadpool(state.consistent, work)


@router.get("/images/{image_id}", response_model=ImageResponse, summary="The stored record of an indexed image")
async def image_record(state: State, image_id: int) -> dict[str, Any]:
    def work() -> dict[str, Any]:
        out = state.record(image_id).to_dict()
        out["aliases"] = state.aliases(image_id)
        out["thumbnail"] = f"/api/images/{image_id}/thumbnail"
        return json_ready(out)

    return await run_in_threadpool(work)


@router.get("/images/{image_id}/thumbnail", response_class=FileResponse,
            responses={200: {"content": {"image/jpeg": {}}, "description": "a JPEG no larger than size x size"}},
            summary="A small JPEG of an indexed image, cached on disk in the library home")
async def image_thumbnail(state: State, image_id: int,
                          size: Annotated[int, Query(description="longest side in pixels, 32..1024; rounded up "
                                                                  "to a standard size")] = 256) -> FileResponse:
    path = await _infer(state, state.thumbnail, image_id, snap_size(size))
    # An id always names the same content (a changed file gets a new id), so browsers may keep it.
    return FileResponse(path, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400"})


@router.post("/compare", response_model=CompareResponse, summary="Are two uploaded photos similar?")
async def compare(state: State, a: Annotated[UploadFile, File()], b: Annotated[UploadFile, File()],
                  threshold: Annotated[Optional[float], Query(description="L2 distance; default: the "
                                                                          "encoder's calibrated one")] = None
                  ) -> dict[str, Any]:
    data_a, data_b = await _read(a, state, "a"), await _read(b, state, "b")
    if threshold is not None and not np.isfinite(threshold):
        raise Unprocessable("threshold must be finite")
    result = await _infer(state, state.compare, data_a, data_b, threshold)
    out = result.to_dict()
    out.update(a=a.filename or "a", b=b.filename or "b", distance=result.distance, threshold=result.threshold)
    return out


@router.get("/info", summary="What `engine info --json` prints")
async def info(state: State) -> dict[str, Any]:
    return json_ready(await run_in_threadpool(state.describe))
