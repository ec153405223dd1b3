"""The one preprocessing path shared by training, ingest and query.

``open_image`` decodes any file Pillow reads into an RGB image (EXIF orientation applied, alpha
composited onto white, 16-bit and CMYK scaled to 8-bit RGB, large images reduced while they are
decoded); ``build_transform`` turns an encoder's timm data config into the tensor transform;
``engine.loader`` applies the two to files in batches.

Memory: an image over ``MAX_PIXELS`` is refused before any pixel is decoded (the one
decompression-bomb limit, used by every reader: ingest, query, train, eval and the service). Below
it, decoding any image stays within ``DECODE_BUDGET_BYTES``: JPEGs are reduced by the decoder itself
(``draft_size``); other formats are decoded once (at most 4 bytes a pixel in any mode Pillow decodes
to) and then converted, composited onto white and reduced strip by strip into the result, never
copied at full size.
"""

from __future__ import annotations

import io
import math
import re
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from engine.errors import ImageError

Source = Union[str, Path, bytes, BinaryIO]

# The decompression-bomb limit: an image of more pixels (width x height) than this is refused with
# its size, before it is decoded. Pillow's own check is tied to it (it warns above, errors above twice).
MAX_PIXELS = 180_000_000
# The most memory decoding one image takes (bytes, on top of the process itself), whatever the image:
# the full decode of an image at MAX_PIXELS (4 bytes a pixel at most, 720 MB), the RGB result (Pillow
# keeps 4 bytes a pixel: 720 MB more when nothing can be reduced, a quarter of that or less with a draft
# size), the strips converted on the way and, with ingest, the file's bytes (IN_MEMORY_FILE_BYTES at
# most): about 1.4 GiB at worst. engine.resources caps the decode worker count by it.
DECODE_BUDGET_BYTES = 3 << 29  # 1.5 GiB
# Files up to this size are read once into memory, hashed and decoded from the same bytes; larger ones are
# hashed in chunks and decoded from disk (engine.loader).
IN_MEMORY_FILE_BYTES = 64 << 20
# Pixels converted at a time when an image is composited and reduced strip by strip.
_STRIP_PIXELS = 1 << 22
_EXIF_ORIENTATION = 0x0112
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}

Image.MAX_IMAGE_PIXELS = MAX_PIXELS

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


def _orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # malformed EXIF must never make a readable image fail
        return 1
    return value if isinstance(value, int) else 1


def _intensity_top(img: Image.Image) -> float | None:
    """The value that maps to 255 for 16- and 32-bit single-channel modes (None for the others):
    65535 for I;16, else the image's maximum (or 255 when it already fits 8 bits)."""
    mode = img.mode
    if mode.startswith("I;16"):
        return 65535.0
    if mode in ("I", "F"):
        low, high = img.getextrema()
        if high <= 255 and low >= 0:
            return 255.0
        return float(max(high, 1.0))
    return None


def _to_rgb(img: Image.Image, top: float | None = None) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is composited onto white (in place, on the one
    new RGB image). top: what maps to 255 in 16/32-bit single-channel modes (see _intensity_top)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # Pillow's own I;16 -> L conversion clips at 255; scale the real range instead.
        top = top if top is not None else _intensity_top(img)
        arr = np.asarray(img, dtype=np.float32)
        arr = np.clip(arr * (255.0 / float(top or 255.0)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode == "P" and "transparency" in img.info or mode == "PA":
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBa", "La"):  # premultiplied alpha
        img = img.convert("RGBA" if mode == "RGBa" else "LA")
        mode = img.mode
    if mode in ("RGBA", "LA"):
        canvas = Image.new("RGB", img.size, (255, 255, 255))
        canvas.paste(img, (0, 0), img)  # "over" onto white: the alpha band is the mask
        return canvas
    return img.convert("RGB")


def _rgb_reduced(img: Image.Image, factor: int) -> Image.Image:
    """``img`` (loaded) as RGB, reduced by ``factor`` (box average) when factor > 1, converted strip
    by strip so that no full-size copy of it is ever made."""
    if img.mode == "RGB":
        return img.reduce(factor) if factor > 1 else img
    width, height = img.size
    top = _intensity_top(img)
    rows = max(factor, (_STRIP_PIXELS // max(width, 1)) // factor * factor)
    if rows >= height and factor == 1:
        return _to_rgb(img, top)
    out = Image.new("RGB", (-(-width // factor), -(-height // factor)))
    for y in range(0, height, rows):
        strip = _to_rgb(img.crop((0, y, width, min(height, y + rows))), top)
        out.paste(strip.reduce(factor) if factor > 1 else strip, (0, y // factor))
    return out


def _pixel_limit() -> int:
    """MAX_PIXELS, or Pillow's limit when something lowered it below that."""
    pillow = Image.MAX_IMAGE_PIXELS
    return min(MAX_PIXELS, int(pillow)) if pillow else MAX_PIXELS


def _megapixels(pixels: float) -> str:
    return f"{pixels / 1e6:.0f} MP" if pixels >= 1e6 else f"{int(pixels)} pixels"


def _check_pixels(width: int, height: int) -> None:
    limit = _pixel_limit()
    if width * height > limit:
        raise ImageError(f"decompression bomb refused: image is {width}x{height} ({_megapixels(width * height)}), "
                         f"over the {_megapixels(limit)} limit; not decoded")


def open_image(source: Source, *, draft_size: int | None = None) -> tuple[Image.Image, ImageInfo]:
    """Decode ``source`` (a path, bytes or a binary file) into an RGB image and its facts.

    draft_size: the smallest side the caller needs. The image is then reduced while it is decoded:
    JPEGs at the largest DCT reduction (1/2 .. 1/8) that keeps both sides at least this large, other
    formats by the largest whole factor that keeps them at least twice as large. Small images are
    unchanged. Decoding stays within DECODE_BUDGET_BYTES (see the module notes).

    Raises ImageError with a one-line reason for anything that is not a readable image, and for an
    image of more than MAX_PIXELS pixels.
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
            # Pillow warns between its limit (MAX_PIXELS) and twice it; _check_pixels refuses there.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(fp)
            img.seek(0)  # animated images: the first frame
            width, height = img.size
            _check_pixels(width, height)
            fmt = img.format
            taken, camera = _exif_fields(img)
            orientation = _orientation(img)
            if draft_size and fmt == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            img.load()
            factor = 1
            if draft_size:
                factor = max(1, min(img.size) // (2 * draft_size))
            img = _rgb_reduced(img, factor)
            if orientation in _TRANSPOSE:
                img = img.transpose(_TRANSPOSE[orientation])
    except Image.DecompressionBombError as exc:  # Pillow's own check, at twice the limit, came first
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f" ({_megapixels(int(found.group(1)))})" if found else ""
        raise ImageError(f"decompression bomb refused: image{size} over the {_megapixels(_pixel_limit())} limit; "
                         "not decoded") from None
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

    train=True adds timm's training augmentation (random resized crop, flip, colour jitter). The eval
    transform of a centre crop to a square input (every config the engine makes) is ``EvalTransform``:
    the same steps as timm's ``create_transform(is_training=False)``, equal to it bit for bit
    (tests/test_cold_start.py), without importing timm and torchvision (over a second of a cold
    query); any other eval config goes to timm.
    """
    if not train:
        fast = EvalTransform.for_config(data_config)
        if fast is not None:
            return fast
    from timm.data import create_transform

    cfg = {k: data_config[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct") if k in data_config}
    if "crop_mode" in data_config and not train:
        cfg["crop_mode"] = data_config["crop_mode"]
    if train:
        return create_transform(**cfg, is_training=True, color_jitter=0.3, hflip=0.5, scale=(0.5, 1.0))
    return create_transform(**cfg, is_training=False)


_RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
             "bicubic": Image.Resampling.BICUBIC, "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING,
             "lanczos": Image.Resampling.LANCZOS}
_DEFAULT_CROP_PCT = 0.875  # timm's, when a config has none


@dataclass(frozen=True)
class EvalTransform:
    """timm's eval transform for a centre crop to a square: the shorter side resized to
    ``floor(size / crop_pct)`` (the longer in proportion, truncated), a centre crop of ``size``
    (zero-padded when the image is smaller), pixels / 255, then (x - mean) / std per channel.

    __call__: PIL RGB image -> float32 tensor [3, size, size].
    """

    size: int
    scale: int
    resample: Image.Resampling
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def for_config(cls, data_config: Mapping[str, Any]) -> EvalTransform | None:
        """The transform for ``data_config``, or None when it is not a centre crop to a square
        with a known interpolation (then timm's own is used)."""
        size = tuple(int(v) for v in data_config.get("input_size", (3, 224, 224)))[-2:]
        mode = data_config.get("crop_mode") or "center"
        resample = _RESAMPLE.get(str(data_config.get("interpolation", "bilinear")))
        crop_pct = float(data_config.get("crop_pct") or _DEFAULT_CROP_PCT)
        mean, std = data_config.get("mean"), data_config.get("std")
        if len(size) != 2 or size[0] != size[1] or mode != "center" or resample is None or mean is None or std is None:
            return None
        if any(float(v) == 0.0 for v in std) or len(mean) != 3 or len(std) != 3:
            return None
        return cls(size[0], int(math.floor(size[0] / crop_pct)), resample, tuple(float(v) for v in mean),
                   tuple(float(v) for v in std))

    def __call__(self, img: Image.Image) -> Any:
        import torch

        width, height = img.size
        short, long = (width, height) if width <= height else (height, width)
        if short != self.scale:
            new_long = int(self.scale * long / short)
            img = img.resize((self.scale, new_long) if width <= height else (new_long, self.scale), self.resample)
        img = self._center_crop(img)
        arr = torch.from_numpy(np.array(img, np.uint8, copy=True)).view(img.size[1], img.size[0], len(img.getbands()))
        tensor = arr.permute((2, 0, 1)).contiguous().to(dtype=torch.get_default_dtype()).div(255)
        mean = torch.tensor(self.mean).view(-1, 1, 1)
        std = torch.tensor(self.std).view(-1, 1, 1)
        return tensor.sub_(mean).div_(std)

    def _center_crop(self, img: Image.Image) -> Image.Image:
        width, height = img.size
        size = self.size
        if size > width or size > height:  # zero padding, split as torchvision splits it
            left = (size - width) // 2 if size > width else 0
            top = (size - height) // 2 if size > height else 0
            right = (size - width + 1) // 2 if size > width else 0
            bottom = (size - height + 1) // 2 if size > height else 0
            canvas = Image.new(img.mode, (width + left + right, height + top + bottom), 0)
            canvas.paste(img, (left, top))
            img = canvas
            width, height = img.size
            if (width, height) == (size, size):
                return img
        top = int(round((height - size) / 2.0))
        left = int(round((width - size) / 2.0))
        return img.crop((left, top, left + size, top + size))
