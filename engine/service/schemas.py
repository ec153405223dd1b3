"""Request and response models of the JSON API: they validate requests and document the API on
FastAPI's OpenAPI page (``/docs``, ``/openapi.json``). A hit has the shape of a hit printed by
``engine query --json``; score and distance keep full precision here."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Mapping, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_K = 1000
MAX_MARKS = 200


class ErrorResponse(BaseModel):
    """Every error: a one-line message and the HTTP status. Upload errors also name the field and
    the bare reason."""

    error: str
    status: int
    field: Optional[str] = None
    reason: Optional[str] = None


class HealthResponse(BaseModel):
    ok: bool = True
    images: int = Field(description="vectors in the index snapshot that searches use")
    generation: int = Field(description="library generation that snapshot reflects")
    instance: str = Field(description="random id of this server process (its service.json names it too)")


class HitModel(BaseModel):
    rank: int
    id: int
    path: str
    score: float = Field(description="cosine similarity (1 = identical)")
    distance: float = Field(description="L2 distance of the unit vectors (0 = identical, 2 = opposite)")
    similar: Optional[bool] = Field(None, description="distance <= threshold, when a threshold was given")
    width: Optional[int] = None
    height: Optional[int] = None
    format: Optional[str] = None
    bytes: Optional[int] = None
    taken_at: Optional[str] = None
    camera: Optional[str] = None
    aliases: list[str] = Field(default_factory=list, description="byte-identical copies of this image")


class SearchResponse(BaseModel):
    hits: list[HitModel]
    images: int = Field(description="vectors in the index snapshot this search used")
    generation: int = Field(description="library generation of that snapshot")
    took_ms: float
    query: dict = Field(default_factory=dict, description="what was searched from (id and path, or upload facts)")
    vector: Optional[str] = Field(None, description="the query vector, base64 of float32 [D] (when vector=true)")


class RefineRequest(BaseModel):
    positive: list[int] = Field(default_factory=list, max_length=MAX_MARKS, description="ids marked 'more like this'")
    negative: list[int] = Field(default_factory=list, max_length=MAX_MARKS, description="ids marked 'less like this'")
    k: int = Field(10, ge=1, le=MAX_K)
    vector: Optional[str] = Field(None, max_length=1 << 20,
                                  description="the original query vector as a search returned it (base64 float32)")


class ImageResponse(BaseModel):
    id: int
    path: str
    content_hash: str
    bytes: int
    mtime: float
    width: Optional[int] = None
    height: Optional[int] = None
    format: Optional[str] = None
    taken_at: Optional[str] = None
    camera: Optional[str] = None
    added_at: str
    aliases: list[str] = Field(default_factory=list)
    thumbnail: str


class CompareResponse(BaseModel):
    a: str
    b: str
    distance: float
    threshold: float
    verdict: str = Field(description="similar or different")


class UploadSearchQuery(BaseModel):
    """The query parameters of ``POST /api/search``, validated as FastAPI validates query
    parameters (the route reads its multipart body itself: see ``parse_upload_query``)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    k: int = Field(10, ge=1, le=MAX_K, description="how many neighbours")
    threshold: Optional[str] = Field(None, description="an L2 distance, or 'model' for the encoder's calibrated "
                                                       "one: each hit then says whether it is similar")
    vector: bool = Field(False, description="also return the query vector (for /api/search/refine)")
    max_distance: Optional[float] = Field(None, description="only hits at this L2 distance or closer")
    taken_after: Optional[datetime] = Field(None, description="only photos captured at or after")
    taken_before: Optional[datetime] = Field(None, description="only photos captured before")
    camera: Optional[str] = Field(None, max_length=128, description="camera make/model contains")
    under: Optional[list[str]] = Field(None, description="only files in this folder (repeatable)")
    exclude_path: Optional[list[str]] = Field(None, max_length=8, description="leave out the image indexed at this "
                                              "path (the query's own file; repeatable: the path and its real path)")
    own_path: Optional[list[str]] = Field(None, max_length=8, description="the query's own file as the library "
                                          "indexed it (repeatable: the path and its real path), which never expands "
                                          "the query; default: the indexed image with the upload's bytes")


_LISTS = frozenset(name for name, f in UploadSearchQuery.model_fields.items() if "list" in str(f.annotation))


def parse_upload_query(params: Any) -> UploadSearchQuery:
    """``UploadSearchQuery`` from Starlette ``QueryParams`` (a repeated scalar: its last value, as
    FastAPI takes it). Raises FastAPI's RequestValidationError, answered 422 as any other."""
    from fastapi.exceptions import RequestValidationError

    given: dict[str, Any] = {}
    for name in UploadSearchQuery.model_fields:
        if name in params:
            given[name] = params.getlist(name) if name in _LISTS else params[name]
    if not given:
        return _DEFAULT_QUERY
    try:
        return UploadSearchQuery.model_validate(given)
    except ValidationError as exc:
        errors = [dict(err, loc=("query", *err.get("loc", ()))) for err in exc.errors()]
        raise RequestValidationError(errors) from None


_DEFAULT_QUERY = UploadSearchQuery()


def upload_search_openapi(field: str, description: str) -> dict[str, Any]:
    """The OpenAPI description of ``POST /api/search``'s parameters and multipart body (FastAPI
    cannot infer them from a handler that parses its own request)."""
    schema = UploadSearchQuery.model_json_schema()
    parameters = [{"name": name, "in": "query", "required": False, "schema": prop,
                   "description": prop.get("description", "")}
                  for name, prop in schema["properties"].items()]
    body: Mapping[str, Any] = {"type": "object", "required": [field],
                               "properties": {field: {"type": "string", "format": "binary", "description": description}}}
    return {"parameters": parameters, "security": [{"HTTPBearer": []}],
            "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": body}}}}
