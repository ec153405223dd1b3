"""Bulk indexing of a photo library: walk, decode in worker processes, embed in batches, commit rows
and vectors batch by batch."""

from ingest.pipeline import IngestConfig, IngestReport, ingest_paths, remove_paths
from ingest.reindex import ReindexReport, reindex_library

__all__ = ["IngestConfig", "IngestReport", "ReindexReport", "ingest_paths", "reindex_library", "remove_paths"]
