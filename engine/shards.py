"""The ``engine-shards/1`` format: precomputed embeddings with their file facts, the one reader and
writer of it (``engine import`` reads it, the Ray ingest writes it, and users' own pipelines can).

```
DIR/manifest.json        {"format": "engine-shards/1", "model": {"identity": ID, "dim": D}, "shards": [NAME, ...]}
DIR/NAME.npy             float32 [n, D], L2-normalised rows (little-endian, no pickled objects)
DIR/NAME.parquet         n rows in the same order: "path" (required), and optionally content_hash,
                         bytes, mtime, width, height, format, taken_at, camera
```

Every file is read as hostile: each problem is refused with a ShardError naming the file and
one reason, before anything of the shard is used (``read_shard`` validates a shard whole: header,
size, every vector finite and unit-length, every column typed, every path absolute, normal and
unique). A shard name is a plain file name, so a manifest cannot reach outside its folder.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np

from engine.atomic import atomic_path, write_atomic
from engine.errors import DataError

if TYPE_CHECKING:
    import pyarrow as pa

FORMAT = "engine-shards/1"
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 64 << 20  # ten million shard names fit; a larger file is not a manifest
MAX_HEADER_BYTES = 1 << 16  # an .npy header is a short dict; numpy itself refuses more than 10,000 characters
MAX_DIM = 1 << 16
MAX_PATH_BYTES = 4096  # PATH_MAX on Linux
NORM_TOLERANCE = 1e-3  # |norm - 1| allowed: room for float16 pipelines, none for unnormalised vectors
CHECK_ROWS = 1 << 16  # rows checked at a time: bounded memory for shards of any size
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
_HASH = re.compile(r"[0-9a-f]{64}")
_MAGIC = b"\x93NUMPY"

# optional columns -> the kind of values they must hold (and the longest text the store keeps)
OPTIONAL_COLUMNS: dict[str, str] = {"content_hash": "hash", "bytes": "count", "mtime": "number", "width": "count",
                                    "height": "count", "format": "text16", "taken_at": "time", "camera": "text"}
COLUMNS = ("path", *OPTIONAL_COLUMNS)
CAMERA_CHARS = 128  # the store's camera column; longer names are cut as ingest cuts them


class ShardError(DataError):
    """A shard folder, its manifest or one of its shard files is not valid ``engine-shards/1``.
    The message names the file and the reason; ``file`` and ``reason`` hold them apart (None for
    a mistake of a writer's caller, which names no file)."""

    def __init__(self, message: str, *, file: str | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.file = file
        self.reason = reason if reason is not None else message


@dataclass(frozen=True)
class Manifest:
    """A validated manifest: the folder it lives in, the encoder identity and dimension of its
    vectors, and its shard names (unique plain file names, in order)."""

    folder: Path
    identity: str
    dim: int
    shards: tuple[str, ...]

    def files(self, name: str) -> tuple[Path, Path]:
        """(vectors ``NAME.npy``, rows ``NAME.parquet``) of shard ``name``."""
        return self.folder / f"{name}.npy", self.folder / f"{name}.parquet"


@dataclass(frozen=True)
class Shard:
    """One validated shard. vectors: float32 [n, D], read-only and memory-mapped (slice it to
    read; every row is finite with norm within NORM_TOLERANCE of 1); columns: the columns the
    parquet file has among COLUMNS, each a list of n Python values (path: str, never None;
    content_hash: 64 lowercase hex digits or None; bytes, width, height: int >= 0 or None; mtime:
    finite float or None; format, camera: str or None (camera cut to 128 characters); taken_at:
    naive UTC datetime or None)."""

    name: str
    vectors: np.ndarray
    columns: Mapping[str, list[Any]]

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def paths(self) -> list[str]:
        return self.columns["path"]


def _refuse(path: str | os.PathLike, reason: str) -> ShardError:
    return ShardError(f"{os.fspath(path)}: {reason}", file=os.fspath(path), reason=reason)


# -- manifest ----------------------------------------------------------------------------------
def read_manifest(folder: str | os.PathLike) -> Manifest:
    """Read and validate ``folder/manifest.json``. Raises ShardError (naming the file) when the
    folder or the manifest is missing, the file is not a JSON object of this format, the model
    has no identity or a bad dimension, or a shard name is not a plain unique file name
    ("../x", "a/b", hidden names) or its two files are missing."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise _refuse(folder, "no such folder of embedding shards")
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise _refuse(path, f"missing: a shard folder holds a {MANIFEST} ({FORMAT})") from None
    except OSError as exc:
        raise _refuse(path, f"cannot be read ({exc.strerror or exc})") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise _refuse(path, f"larger than {MAX_MANIFEST_BYTES >> 20} MiB: not a manifest")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _refuse(path, f"not JSON ({str(exc).splitlines()[0][:200]})") from None
    if not isinstance(doc, dict):
        raise _refuse(path, "not a JSON object")
    if doc.get("format") != FORMAT:
        raise _refuse(path, f"format is {_shown(doc.get('format'))}, expected {FORMAT!r}")
    model = doc.get("model")
    if not isinstance(model, dict):
        raise _refuse(path, 'no "model" object ({"identity": ..., "dim": ...})')
    identity, dim = model.get("identity"), model.get("dim")
    if not isinstance(identity, str) or not identity or len(identity) > 200:
        raise _refuse(path, f'model identity must be the text `engine info --json` shows, found {_shown(identity)}')
    if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= MAX_DIM:
        raise _refuse(path, f"model dim must be a whole number from 1 to {MAX_DIM}, found {_shown(dim)}")
    shards = doc.get("shards")
    if not isinstance(shards, list):
        raise _refuse(path, '"shards" must be a list of shard names')
    seen: set[str] = set()
    for name in shards:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise _refuse(path, f"shard name {_shown(name)} is not a plain file name in the folder "
                                "(letters, digits, '.', '_', '-'; no '/', no leading dot)")
        if name in seen:
            raise _refuse(path, f"shard {name!r} is listed twice")
        seen.add(name)
    manifest = Manifest(folder, identity, dim, tuple(shards))
    for name in manifest.shards:
        for file in manifest.files(name):
            if not file.is_file():  # a fifo or device would block a reader or never end
                what = "not a regular file" if os.path.lexists(file) else "missing"
                raise _refuse(file, f"{what} (listed in {path})")
    return manifest


def _shown(value: Any) -> str:
    """A short, safe rendering of a value found in a file, for a message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def write_manifest(folder: str | os.PathLike, identity: str, dim: int, shards: Sequence[str]) -> Path:
    """Write ``folder/manifest.json`` atomically, listing ``shards`` (written before with
    ``write_shard``); the manifest is the last file of a shard folder, so a folder whose writer
    died has none, or the previous one. Returns its path."""
    for name in shards:
        _check_name(name)
    doc = {"format": FORMAT, "model": {"identity": identity, "dim": int(dim)}, "shards": list(shards)}
    return write_atomic(Path(folder) / MANIFEST, json.dumps(doc, indent=1) + "\n")


def remove_manifest(folder: str | os.PathLike) -> None:
    """Delete ``folder/manifest.json`` if there is one (a writer starting over: until it writes
    the new one, nothing in the folder is importable)."""
    try:
        os.unlink(Path(folder) / MANIFEST)
    except FileNotFoundError:
        pass


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ShardError(f"shard name {_shown(name)} is not a plain file name")


# -- vectors -----------------------------------------------------------------------------------
def _npy_header_length(fh: Any, path: Path) -> None:
    """Check the magic and that the header is short, before numpy reads it (a header length field
    of gigabytes would otherwise be read into memory)."""
    head = fh.read(8)
    if len(head) < 8 or head[:6] != _MAGIC:
        raise _refuse(path, "not a .npy file (no NUMPY magic)")
    major = head[6]
    if major not in (1, 2, 3):
        raise _refuse(path, f".npy format version {major} is not one numpy writes")
    size = 2 if major == 1 else 4
    field = fh.read(size)
    if len(field) < size:
        raise _refuse(path, "truncated .npy header")
    length = struct.unpack("<H" if size == 2 else "<I", field)[0]
    if length > MAX_HEADER_BYTES:
        raise _refuse(path, f".npy header of {length} bytes (at most {MAX_HEADER_BYTES}): not an array of vectors")


def _open_vectors(path: Path, dim: int) -> np.ndarray:
    """float32 [n, dim] memory-mapped from ``path``, its header, type, shape and size checked."""
    try:
        with open(path, "rb") as fh:
            _npy_header_length(fh, path)
            size = os.fstat(fh.fileno()).st_size
        vectors = np.load(path, mmap_mode="r", allow_pickle=False, max_header_size=MAX_HEADER_BYTES)
    except ShardError:
        raise
    except (ValueError, SyntaxError, TypeError, EOFError) as exc:  # numpy's words for a bad header or a short file
        if "greater than file size" in str(exc):
            raise _refuse(path, "truncated: its header promises more vectors than the file holds") from None
        raise _refuse(path, f"not a readable .npy array ({str(exc).splitlines()[0][:200]})") from None
    except OSError as exc:
        raise _refuse(path, f"cannot be read ({exc.strerror or exc})") from None
    if not isinstance(vectors, np.ndarray) or vectors.dtype != np.dtype("<f4"):
        found = vectors.dtype.str if isinstance(vectors, np.ndarray) else type(vectors).__name__
        raise _refuse(path, f"vectors must be float32 (little-endian), found {found}")
    if vectors.ndim != 2:
        raise _refuse(path, f"vectors must be a 2-D array [n, {dim}], found shape {vectors.shape}")
    if vectors.shape[1] != dim:
        raise _refuse(path, f"vectors are {vectors.shape[1]}-d, the manifest says {dim}")
    offset = getattr(vectors, "offset", None)
    expected = None if offset is None else offset + vectors.size * 4
    if expected is not None and size != expected:  # numpy ignores bytes past the array: a sign of a mixed-up file
        raise _refuse(path, f"longer than its array: {size} bytes where a {list(vectors.shape)} float32 array "
                            f"takes {expected}")
    return vectors


def check_vectors(vectors: np.ndarray, path: str | os.PathLike) -> None:
    """Raise ShardError naming ``path`` and the first bad row when a row of ``vectors`` (float32
    [n, D]) holds NaN or infinity or is not L2-normalised (norm off 1 by more than NORM_TOLERANCE).
    Reads CHECK_ROWS rows at a time."""
    for start in range(0, vectors.shape[0], CHECK_ROWS):
        block = np.asarray(vectors[start:start + CHECK_ROWS])
        finite = np.isfinite(block).all(axis=1)
        if not finite.all():
            raise _refuse(path, f"row {start + int(np.argmin(finite))} holds NaN or infinity")
        norms = np.sqrt(np.einsum("ij,ij->i", block, block))  # float32 sums: ample for NORM_TOLERANCE
        off = np.abs(norms - 1.0) > NORM_TOLERANCE
        if off.any():
            row = int(np.argmax(off))
            raise _refuse(path, f"row {start + row} is not L2-normalised (norm {norms[row]:.6g}; every row must "
                                f"have norm 1 within {NORM_TOLERANCE})")


# -- rows --------------------------------------------------------------------------------------
def _read_table(path: Path, rows: int) -> pa.Table:
    """The known columns of the parquet file ``path``, checked to hold ``rows`` rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with pq.ParquetFile(path) as parquet:
            schema = parquet.schema_arrow
            if "path" not in schema.names:
                raise _refuse(path, f'no "path" column (columns: {", ".join(schema.names[:20]) or "none"})')
            if schema.names.count("path") > 1:
                raise _refuse(path, 'the "path" column appears twice')
            if parquet.metadata.num_rows != rows:
                raise _refuse(path, f"{parquet.metadata.num_rows} rows where its .npy has {rows} vectors")
            wanted = [c for c in COLUMNS if c in schema.names]
            return parquet.read(columns=wanted)
    except ShardError:
        raise
    except (pa.ArrowException, OSError, ValueError, IndexError, TypeError) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise _refuse(path, f"not a readable parquet file ({reason})") from None


def _column_values(path: Path, name: str, column: pa.ChunkedArray) -> list[Any]:
    """The values of one column as Python objects, checked for its kind (see Shard)."""
    import pyarrow as pa
    import pyarrow.types as t

    kind = "path" if name == "path" else OPTIONAL_COLUMNS[name]
    typ = column.type
    if t.is_dictionary(typ):
        column = column.cast(typ.value_type)
        typ = column.type
    if t.is_null(typ):
        if kind == "path":
            raise _refuse(path, 'column "path" holds no paths (every value is null)')
        return [None] * len(column)
    textual = t.is_string(typ) or t.is_large_string(typ)
    binary = t.is_binary(typ) or t.is_large_binary(typ)
    if kind == "path" and (textual or binary):
        values = column.to_pylist()
        if binary:  # raw file-name bytes (names that are not UTF-8), as the file system gives them
            values = [os.fsdecode(v) if v is not None else None for v in values]
        return values
    if kind in ("hash", "text", "text16") and textual:
        return column.to_pylist()
    if kind == "count" and t.is_integer(typ):
        return column.to_pylist()
    if kind == "number" and (t.is_integer(typ) or t.is_floating(typ)):
        return [None if v is None else float(v) for v in column.to_pylist()]
    if kind == "time" and (t.is_timestamp(typ) or t.is_date(typ)):
        try:  # a time zone is converted to UTC; the store keeps naive times
            return column.cast(pa.timestamp("us")).to_pylist()
        except (pa.ArrowException, ValueError, OverflowError) as exc:
            raise _refuse(path, f'column "taken_at" holds a time out of range ({exc})') from None
    wants = {"path": "strings", "hash": "strings", "text": "strings", "text16": "strings", "count": "integers",
             "number": "numbers", "time": "timestamps"}[kind]
    raise _refuse(path, f'column "{name}" must hold {wants}, found {typ}')


def _check_paths(path: Path, paths: list[Any]) -> None:
    """Every path a string, absolute, in normal form, at most MAX_PATH_BYTES, unique in the shard."""
    seen: set[str] = set()
    longest = MAX_PATH_BYTES // 4  # no shorter text can exceed MAX_PATH_BYTES encoded
    for row, value in enumerate(paths):
        if not isinstance(value, str) or not value:
            raise _refuse(path, f"row {row}: path {_shown(value)} is not a file path (a non-empty string)")
        if "\x00" in value:
            raise _refuse(path, f"row {row}: path {_shown(value)} holds a NUL character")
        if not os.path.isabs(value):
            raise _refuse(path, f"row {row}: path {_shown(value)} is not absolute")
        # only a path with "/.", "//" or a trailing "/" can differ from its normal form: normpath is
        # asked about those alone (it costs more than every other check of a row together)
        if ("/." in value or "//" in value or value.endswith("/")) and os.path.normpath(value) != value:
            raise _refuse(path, f"row {row}: path {_shown(value)} is not in normal form "
                                f"({_shown(os.path.normpath(value))})")
        if len(value) > longest and len(os.fsencode(value)) > MAX_PATH_BYTES:
            raise _refuse(path, f"row {row}: path longer than {MAX_PATH_BYTES} bytes")
        if value in seen:
            raise _refuse(path, f"row {row}: path {_shown(value)} appears twice in the shard")
        seen.add(value)


def _check_values(path: Path, name: str, values: list[Any]) -> list[Any]:
    """Range checks of an optional column; returns the values as the store keeps them."""
    kind = OPTIONAL_COLUMNS[name]
    for row, value in enumerate(values):
        if value is None:
            continue
        if kind == "hash" and not _HASH.fullmatch(value):
            raise _refuse(path, f"row {row}: content_hash {_shown(value)} is not a BLAKE2b-256 hex digest "
                                "(64 lowercase hex digits, as `engine` hashes files)")
        if kind == "count" and value < 0:
            raise _refuse(path, f"row {row}: {name} is negative ({value})")
        if kind == "count" and value >= 1 << 63:
            raise _refuse(path, f"row {row}: {name} is too large ({value})")
        if kind == "number" and not math.isfinite(value):
            raise _refuse(path, f"row {row}: {name} is not a finite number ({value})")
        if kind == "text16" and len(value) > 16:
            raise _refuse(path, f"row {row}: {name} {_shown(value)} is longer than 16 characters")
    if kind == "text":
        return [v[:CAMERA_CHARS] if v is not None and len(v) > CAMERA_CHARS else v for v in values]
    return values


def read_shard(manifest: Manifest, name: str, *, taken: set[str] | None = None) -> Shard:
    """Read and validate shard ``name`` of ``manifest`` whole (see Shard for what it holds).

    taken: paths of shards read before in the same import; a path among them is refused (and the
    shard's paths are added to it once the shard is valid). Raises ShardError naming the file and
    the first problem: bad .npy header, type, shape or size; a row with NaN, infinity or a norm
    off 1; an unreadable parquet file, missing "path" column, row count unlike the vectors', a
    column of the wrong type, a path that is not an absolute normal string or appears twice."""
    npy_path, table_path = manifest.files(name)
    vectors = _open_vectors(npy_path, manifest.dim)
    table = _read_table(table_path, int(vectors.shape[0]))
    columns: dict[str, list[Any]] = {}
    for column in table.column_names:
        values = _column_values(table_path, column, table.column(column))
        columns[column] = values if column == "path" else _check_values(table_path, column, values)
    _check_paths(table_path, columns["path"])
    if taken is not None:
        clash = next((p for p in columns["path"] if p in taken), None)
        if clash is not None:
            raise _refuse(table_path, f"path {_shown(clash)} also appears in an earlier shard of {manifest.folder}")
    check_vectors(vectors, npy_path)
    if taken is not None:
        taken.update(columns["path"])
    return Shard(name, vectors, columns)


def count_rows(manifest: Manifest) -> int | None:
    """The rows all shards declare (from their parquet footers; nothing validated), or None when
    a footer cannot be read: for a progress total."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    total = 0
    for name in manifest.shards:
        try:
            total += pq.read_metadata(manifest.files(name)[1]).num_rows
        except (pa.ArrowException, OSError, ValueError):
            return None
    return total


# -- writing -----------------------------------------------------------------------------------
def write_shard(folder: str | os.PathLike, name: str, vectors: np.ndarray, columns: Mapping[str, Sequence[Any]]) -> \
        tuple[Path, Path]:
    """Write shard ``name`` into ``folder``: ``vectors`` (float32 [n, D], L2-normalised) as
    ``NAME.npy`` and ``columns`` (``path`` and any of the optional columns, n values each; None
    for unknown) as ``NAME.parquet``, each file atomically, so writing a shard again (a retried
    task) replaces it whole. A path that is not valid UTF-8 makes the path column raw bytes.
    Returns the two paths. Raises ShardError for a bad name, unknown column or length mismatch."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    _check_name(name)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ShardError(f"shard {name}: vectors must be [n, D], got shape {vectors.shape}")
    unknown = sorted(set(columns) - set(COLUMNS))
    if "path" not in columns or unknown:
        raise ShardError(f"shard {name}: columns must include path and be among {', '.join(COLUMNS)}"
                         + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    if any(len(values) != len(vectors) for values in columns.values()):
        raise ShardError(f"shard {name}: every column must have {len(vectors)} values, one per vector")
    arrays = {c: _arrow_column(c, list(columns[c]), pa) for c in COLUMNS if c in columns}
    folder = Path(folder)
    npy_path, table_path = folder / f"{name}.npy", folder / f"{name}.parquet"
    with atomic_path(npy_path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, vectors, allow_pickle=False)
    with atomic_path(table_path) as tmp:
        pq.write_table(pa.table(arrays), tmp)
    return npy_path, table_path


def _arrow_column(name: str, values: list[Any], pa: Any) -> pa.Array:
    """The Arrow array of one column of ``write_shard``."""
    if name == "path":
        try:
            return pa.array(values, pa.string())
        except (UnicodeEncodeError, pa.ArrowException):  # surrogate-escaped bytes: keep the exact name
            return pa.array([os.fsencode(v) for v in values], pa.binary())
    kind = OPTIONAL_COLUMNS[name]
    typ = {"hash": pa.string(), "text": pa.string(), "text16": pa.string(), "count": pa.int64(),
           "number": pa.float64(), "time": pa.timestamp("us")}[kind]
    return pa.array(values, typ)


def shard_names(count: int, prefix: str = "part") -> list[str]:
    """``part-00000`` ... for ``count`` partitions (the names clip-retrieval-style writers use)."""
    return [f"{prefix}-{n:05d}" for n in range(count)]


def existing_shards(folder: str | os.PathLike, names: Iterable[str]) -> list[str]:
    """The names among ``names`` whose two files are both in ``folder``."""
    folder = Path(folder)
    return [n for n in names if (folder / f"{n}.npy").is_file() and (folder / f"{n}.parquet").is_file()]
