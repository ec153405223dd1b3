"""The one preprocessing path shared by training, ingest and query.

``open_image`` decodes any file Pillow reads into an RGB image (EXIF orientation applied, alpha
composited onto white, 16-bit and CMYK scaled to 8-bit RGB, large JPEGs reduced at decode time);
``build_transform`` turns an encoder's timm data config into the tensor transform;
``engine.loader`` applies the two to files in batches.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from engine.errors import ImageError

Source = Union[str, Path, bytes, BinaryIO]

# Suffixes (lower case) that ingest and query treat as images.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
HEIF_SUFFIXES = frozenset({".heic", ".heif"})

_EXIF_DATETIME_ORIGINAL = 0x9003
_EXIF_DATETIME = 0x0132
_EXIF_MODEL = 0x0110
_EXIF_MAKE = 0x010F
_EXIF_IFD = 0x8769


def register_heif() -> bool:
    """Register the HEIF opener when the ``heif`` extra is installed; True when it is."""
    try:
        from pillow_heif import register_heif_opener  # type: ignore[import-not-found]
    except ImportError:
        return False
    register_heif_opener()
    return True


def image_suffixes() -> frozenset[str]:
    """Suffixes ingest should pick up on this installation (HEIC only with the ``heif`` extra)."""
    return IMAGE_SUFFIXES | HEIF_SUFFIXES if register_heif() else IMAGE_SUFFIXES


@dataclass(frozen=True)
class ImageInfo:
    """What the decoder learned about a file. width/height are the stored pixel size, before
    orientation and any draft reduction."""

    width: int
    height: int
    format: str | None
    taken_at: datetime | None
    camera: str | None


def _exif_fields(img: Image.Image) -> tuple[datetime | None, str | None]:
    try:
        exif = img.getexif()
    except Exception:  # malformed EXIF must never make a readable image fail
        return None, None
    if not exif:
        return None, None
    raw = None
    try:
        raw = exif.get_ifd(_EXIF_IFD).get(_EXIF_DATETIME_ORIGINAL)
    except Exception:
        raw = None
    raw = raw or exif.get(_EXIF_DATETIME)
    taken = None
    if isinstance(raw, str):
        try:
            taken = datetime.strptime(raw.strip("\x00 ")[:19], "%Y:%m:%d %H:%M:%S")
        except ValueError:
            taken = None
    make = str(exif.get(_EXIF_MAKE, "") or "").strip("\x00 ")
    model = str(exif.get(_EXIF_MODEL, "") or "").strip("\x00 ")
    camera = model if model.startswith(make) else f"{make} {model}".strip()
    return taken, camera or None


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is composited onto white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # Pillow's own I;16 -> L conversion clips at 255; scale the real range instead.
        arr = np.asarray(img, dtype=np.float32)
        top = 65535.0 if mode.startswith("I;16") else float(max(arr.max(), 1.0))
        if mode in ("I", "F") and arr.max() <= 255.0 and arr.min() >= 0:
            top = 255.0
        arr = np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


def open_image(source: Source, *, draft_size: int | None = None) -> tuple[Image.Image, ImageInfo]:
    """Decode ``source`` (a path, bytes or a binary file) into an RGB image and its facts.

    draft_size: the smallest side the caller needs. JPEGs are then decoded at the largest DCT
    reduction (1/2, 1/4, 1/8) that still keeps both sides at least this large, which is several
    times faster for camera photos and changes nothing for small images.

    Raises ImageError with a one-line reason for anything that is not a readable image.
    """
    if isinstance(source, bytes):
        if not source:
            raise ImageError("empty file (0 bytes)")
        fp: Any = io.BytesIO(source)
    elif isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise ImageError(f"no such file: {path}")
        if path.is_dir():
            raise ImageError(f"is a directory, not an image: {path}")
        if not path.is_file():  # a fifo would block the read, a device never end it
            raise ImageError(f"not a regular file: {path}")
        fp = path
    else:
        fp = source
    try:
        with warnings.catch_warnings():
            # Between Pillow's limit and twice it Pillow only warns; big panoramas are legitimate.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(fp)
            img.seek(0)  # animated images: the first frame
            width, height = img.size
            fmt = img.format
            taken, camera = _exif_fields(img)
            if draft_size and fmt == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            img.load()
            img = ImageOps.exif_transpose(img)
            img = _to_rgb(img)
    except Image.DecompressionBombError as exc:
        raise ImageError(f"decompression bomb refused: {exc}") from None
    except UnidentifiedImageError:
        raise ImageError("not an image Pillow can identify") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, PermissionError):
            reason = "permission denied"
        raise ImageError(f"cannot decode image: {reason}") from None
    except MemoryError:
        raise ImageError("image too large to decode in memory") from None
    if min(img.size) < 1:
        raise ImageError("image has no pixels")
    return img, ImageInfo(width, height, fmt, taken, camera)


def load_image(source: Source, *, draft_size: int | None = None) -> Image.Image:
    """``open_image`` without the facts: an RGB ``PIL.Image``."""
    return open_image(source, draft_size=draft_size)[0]


def draft_size_for(data_config: Mapping[str, Any]) -> int:
    """The smallest image side the eval transform reads, so decode can reduce down to it."""
    size = int(data_config["input_size"][-1])
    crop_pct = float(data_config.get("crop_pct") or 1.0)
    return int(math.floor(size / crop_pct))


def build_transform(data_config: Mapping[str, Any], *, train: bool = False) -> Callable[[Image.Image], Any]:
    """timm's transform for an encoder's data config: PIL RGB image -> float32 tensor [3, H, W].

    train=True adds timm's training augmentation (random resized crop, flip, colour jitter).
    """
    from timm.data import create_transform

    cfg = {k: data_config[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct") if k in data_config}
    if "crop_mode" in data_config and not train:
        cfg["crop_mode"] = data_config["crop_mode"]
    if train:
        return create_transform(**cfg, is_training=True, color_jitter=0.3, hflip=0.5, scale=(0.5, 1.0))
    return create_transform(**cfg, is_training=False)
