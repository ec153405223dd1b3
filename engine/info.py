"""``engine info``: what a library holds, with which encoder, and where its files are."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.library import Library


def _size(path: str | os.PathLike) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def describe_library(library: Library) -> dict[str, Any]:
    """Counts, model, dimensions, index type and state, the indexed folders with their file counts
    (``folders``: [{"folder", "files"}], by folder; counted in SQL), file paths and sizes (bytes),
    as a JSON-ready dict. A home without a library gives only ``home`` and ``state``."""
    paths = library.paths
    facts: dict[str, Any] = {"home": str(paths.home)}
    if not library.exists():
        facts["state"] = "empty: run `engine ingest PATH` to create the library"
        return facts
    store = library.store
    model = library.model_info()
    index = library.open_index(required=False)
    facts.update({
        "images": store.count(),
        "aliases": store.count_aliases(),
        "embeddings": store.count_embeddings(),
        "vectors": index.ntotal if index is not None else 0,
        "model": model.to_dict() if model is not None else None,
        "index_type": f"IDMap2,{library.index_config().factory}",
        "metric": "inner product on L2-normalised vectors (cosine)",
        "folders": [{"folder": folder, "files": n} for folder, n in store.folder_counts()],
        "files": {
            "database": library.database_url or str(paths.database),
            "database_bytes": _size(paths.database),
            "index": str(paths.index),
            "index_bytes": _size(paths.index),
            "encoder": str(paths.encoder),
            "encoder_bytes": _size(paths.encoder),
            "failure_report": str(paths.report),
        },
    })
    return facts
