"""Bulk indexing of a photo library: walk, decode in worker processes, embed in batches, commit rows
and vectors batch by batch.

The names below are loaded on first use: ``ingest.pipeline`` imports torch (seconds), which
``engine import`` (``ingest.importer``) and the distributed driver never need."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ingest.pipeline import IngestConfig, IngestReport, ingest_paths, remove_paths
    from ingest.reindex import ReindexReport, reindex_library

_HOMES = {"IngestConfig": "ingest.pipeline", "IngestReport": "ingest.pipeline", "ingest_paths": "ingest.pipeline",
          "remove_paths": "ingest.pipeline", "ReindexReport": "ingest.reindex", "reindex_library": "ingest.reindex"}

__all__ = ["IngestConfig", "IngestReport", "ReindexReport", "ingest_paths", "reindex_library", "remove_paths"]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'ingest' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
