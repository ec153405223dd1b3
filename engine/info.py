"""``engine info``: what a library holds, with which encoder, and where its files are."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.index import VectorIndex
    from engine.library import Library


def _size(path: str | os.PathLike) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def describe_index(library: Library, index: VectorIndex | None) -> dict[str, Any]:
    """The index's facts: ``chosen`` (``auto``, or the type chosen by hand), ``type`` (its FAISS
    factory string), ``why`` (the policy's reason, for ``auto``), ``search`` (parameters),
    ``rerank`` (candidates re-scored exactly from the stored vectors for 10 hits; 0: none),
    ``recall`` (recall@10 measured after the last build; 1.0 for an exact index; None when not
    measured) against its
    ``recall_target``, on ``recall_queries`` held-out vectors, ``built_for`` (rows),
    ``memory_budget`` (bytes; the default share of RAM when none was set)."""
    from engine.config import AUTO_INDEX
    from engine.index_policy import default_memory_budget

    config = library.index_config()
    settings = index.settings if index is not None else None
    facts: dict[str, Any] = {"chosen": config.factory, "type": index.factory if index is not None else None}
    if config.factory == AUTO_INDEX and index is not None:
        facts["why"] = library.plan_index(index.built_rows or index.ntotal).reason
    facts.update({
        "search": (settings.params if settings is not None else "") or "default",
        "rerank": settings.rerank if settings is not None else 0,
        "recall": 1.0 if index is not None and index.is_exact else settings.recall if settings is not None else None,
        "recall_target": config.recall,
        "recall_queries": settings.queries if settings is not None else 0,
        "built_for": index.built_rows if index is not None else 0,
        "memory_budget": config.memory_budget or default_memory_budget(),
    })
    return facts


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
        "index_type": index.factory if index is not None else library.index_config().factory,
        "index": describe_index(library, index),
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
