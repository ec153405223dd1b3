"""Which photos the benchmarks read: a fixed, sorted subset of a folder, by default the sample
shipped with engine."""

from __future__ import annotations

import os
from pathlib import Path


def sample_folder() -> Path:
    """The photo folder shipped with engine (used when no ``data`` is given)."""
    import engine

    return Path(engine.__file__).parent / "sample" / "library"


def image_files(folder: str | os.PathLike, limit: int | None = None) -> list[str]:
    """The first ``limit`` image files under ``folder``, sorted by path (a fixed subset)."""
    from engine.files import find_images
    from engine.preprocess import image_suffixes

    files = sorted(find_images([folder], image_suffixes()).files)
    return files[:limit] if limit else files


def query_image(fallback: str | os.PathLike | None = None) -> Path:
    """A query image that is not in the library: the first of the sample's query photos, else
    ``fallback``. Raises BenchError when there is neither."""
    from bench.errors import BenchError

    queries = sorted((sample_folder().parent / "query").glob("*.jpg"))
    if queries:
        return queries[0]
    if fallback is None:
        raise BenchError(f"no query photos in {sample_folder().parent / 'query'} and no fallback image given")
    return Path(fallback)
