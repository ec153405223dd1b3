"""Request and response models of the JSON API: they validate requests and document the API on
FastAPI's OpenAPI page (``/docs``, ``/openapi.json``). A hit has the shape of a hit printed by
``engine query --json``; score and distance keep full precision here."""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, Field

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
