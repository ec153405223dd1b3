"""Metadata store: SQLAlchemy models and the store that reads and writes them.

Imports nothing else of the project. Row ids are the FAISS ids of the vectors.
"""

from db.locks import StoreLockedError
from db.store import ImageRecord, MetadataStore, PathState, SCHEMA_VERSION

__all__ = ["ImageRecord", "MetadataStore", "PathState", "SCHEMA_VERSION", "StoreLockedError"]
