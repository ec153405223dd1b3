"""Thumbnails of indexed images, cached as JPEG files in the library home
(``HOME/thumbnails/ID-SIZE.jpg``).

A thumbnail is made from the file the library indexed under that id, found through the database,
never from a path in a request. Ids are never reused and a changed file gets a new id, so a cached
thumbnail never goes stale. Sizes snap up to a few standard ones so the cache stays bounded.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Sequence

from engine.atomic import write_atomic
from engine.errors import ImageError
from engine.service.errors import NotFound, Unprocessable

MIN_SIZE, MAX_SIZE = 32, 1024
SIZES = (64, 128, 256, 384, 512, 768, 1024)
JPEG_QUALITY = 85


def snap_size(size: int) -> int:
    """The smallest standard size at least ``size`` (which must lie in MIN_SIZE..MAX_SIZE)."""
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise Unprocessable(f"size must be between {MIN_SIZE} and {MAX_SIZE} pixels, not {size}")
    return next(s for s in SIZES if s >= size)


def render_thumbnail(source: str, size: int) -> bytes:
    """JPEG bytes of ``source`` reduced to fit in ``size`` x ``size`` (aspect kept, never enlarged).
    Raises ImageError for a file that cannot be decoded."""
    from PIL import Image

    from engine.preprocess import open_image

    image, _ = open_image(source, draft_size=size)
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return out.getvalue()


class ThumbnailCache:
    """Thumbnails under ``folder`` (created on first write)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def path_for(self, image_id: int, size: int) -> Path:
        return self.folder / f"{int(image_id)}-{int(size)}.jpg"

    def get(self, image_id: int, size: int, files: Sequence[str]) -> Path:
        """The cached thumbnail of ``image_id`` at ``size`` (already snapped), made from the first
        of ``files`` (the image's indexed path, then its aliases) that still decodes.

        Raises NotFound when none of them can be read any more."""
        path = self.path_for(image_id, size)
        if path.exists():
            return path
        reasons = []
        for source in files:
            try:
                data = render_thumbnail(source, size)
            except ImageError as exc:
                reasons.append(str(exc))
                continue
            write_atomic(path, data)
            return path
        why = reasons[0] if reasons else "no file"
        raise NotFound(f"image {image_id} can no longer be read from disk ({why}); "
                       "`engine ingest --prune` forgets files that are gone")
