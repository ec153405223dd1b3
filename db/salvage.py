"""Reading back what is readable of a damaged library database into a new one.

Python's sqlite3 has no ``.recover``; this does the simple, honest part of it. It works on a copy
of the damaged file and its ``-wal`` journal (the committed rows a crash left there included; the
originals are never opened), and:

1. when SQLite refuses the copy as "not a database" (a damaged 100-byte header), rewrites the
   header fields SQLite checks with the values every library database has (page size taken from
   the journal's header, or from the file's size and first page);
2. copies each table row by row in rowid order into a fresh database with the library's schema,
   stepping over rows it cannot read (a damaged page loses the rows on it, and only those);
3. drops rows that point at an image that was not recovered, keeps the id counter past every
   id recovered, and bumps the generation so nothing derived from the old file is taken as current.

The result is written beside the target and renamed over it only when complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

# Copied in this order; a row that names an image (aliases, vectors) is kept only if that image was.
_TABLES = ("meta", "images", "aliases", "embeddings", "pending_embeddings", "library_files")
_BATCH = 256
_MAGIC = b"SQLite format 3\x00"
_WAL_MAGICS = (0x377F0682, 0x377F0683)


@dataclass
class SalvageResult:
    """rows: table -> rows copied; unreadable: table -> rows (or runs of rows) stepped over;
    dropped: rows left out because the image they belong to was not recovered; header_restored:
    whether the file header had to be rewritten; error: why nothing could be read (then no
    database was written)."""

    rows: dict[str, int] = field(default_factory=dict)
    unreadable: dict[str, int] = field(default_factory=dict)
    dropped: int = 0
    header_restored: bool = False
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _page_size(db: Path, wal: Path | None) -> int:
    """The page size of a database whose header cannot be trusted: from its journal's header when
    there is a valid one, else the smallest usual size that divides the file and holds every cell
    of page 1 (its b-tree header follows the 100-byte file header; cells are written from the end
    of the page backwards, so the farthest cell pointer shows where the page ends: a library of
    8 KB pages is not mistaken for one of 4 KB, though both sizes divide the file)."""
    if wal is not None and wal.exists() and wal.stat().st_size >= 32:
        magic, _version, size = struct.unpack(">III", wal.read_bytes()[:12])
        if magic in _WAL_MAGICS and size >= 512 and size & (size - 1) == 0:
            return size
    length = db.stat().st_size
    with open(db, "rb") as fh:
        fh.seek(100)
        head = fh.read(12)
        kind = head[:1]
        cells = struct.unpack(">H", head[3:5])[0] if len(head) >= 5 else 0
        fh.seek(100 + (12 if kind in (b"\x05", b"\x02") else 8))
        raw = fh.read(2 * cells)
    farthest = max(struct.unpack(f">{len(raw) // 2}H", raw[:len(raw) // 2 * 2]), default=0)
    for size in (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536):
        if length % size == 0 and kind in (b"\x05", b"\x0d") and farthest < size:
            return size
    return 4096

def _restore_header(db: Path, wal: Path | None) -> None:
    """Rewrite the header fields SQLite validates with the values of a library database (UTF-8,
    no auto-vacuum, schema format 4), keeping those that only count things."""
    with open(db, "r+b") as fh:
        old = bytearray(fh.read(100).ljust(100, b"\0"))
        size = _page_size(db, wal)
        pages = max(1, os.fstat(fh.fileno()).st_size // size)
        journal = 2 if wal is not None and wal.exists() and wal.stat().st_size > 0 else 1
        header = bytearray(100)
        header[0:16] = _MAGIC
        header[16:18] = struct.pack(">H", 1 if size == 65536 else size)
        header[18], header[19], header[20] = journal, journal, 0
        header[21], header[22], header[23] = 64, 32, 32
        header[24:28] = old[24:28]  # change counter
        header[28:32] = struct.pack(">I", pages)
        header[40:44] = old[40:44]  # schema cookie
        header[44:48] = struct.pack(">I", 4)
        header[56:60] = struct.pack(">I", 1)  # UTF-8
        header[92:96] = old[24:28]  # version-valid-for: the page count above is valid
        header[96:100] = old[96:100]
        fh.seek(0)
        fh.write(bytes(header))


def _open_readable(db: Path, wal: Path | None, result: SalvageResult) -> sqlite3.Connection | None:
    for attempt in range(2):
        conn = sqlite3.connect(db)
        try:
            conn.execute("SELECT name FROM sqlite_master").fetchall()
            return conn
        except sqlite3.DatabaseError as exc:
            conn.close()
            if attempt == 0 and "not a database" in str(exc):
                _restore_header(db, wal)
                result.header_restored = True
                continue
            result.error = str(exc)
    return None


def _columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [row[1] for row in conn.execute(f'PRAGMA table_info("{table}")')]


_BROKEN = object()


def _first_readable(conn: sqlite3.Connection, table: str, after: int) -> int | None:
    """The smallest rowid > ``after`` from which rows can be read again (reading right after
    ``after`` fails), or None when no row beyond can be reached: probes ever further ahead, then
    narrows down to where the damage ends."""
    def seek(start: int) -> object:
        try:
            row = conn.execute(f'SELECT rowid FROM "{table}" WHERE rowid >= ? ORDER BY rowid LIMIT 1',
                               (start,)).fetchone()
        except sqlite3.DatabaseError:
            return _BROKEN
        return None if row is None else int(row[0])

    low, step = after + 1, 1  # a seek from low fails
    while True:
        high = low + step
        if high > (1 << 62):
            return None
        if seek(high) is not _BROKEN:
            break
        low, step = high, step * 2
    while high - low > 1:
        mid = (low + high) // 2
        if seek(mid) is _BROKEN:
            low = mid
        else:
            high = mid
    found = seek(high)
    return found if isinstance(found, int) else None


def _copy_table(src: sqlite3.Connection, dst: sqlite3.Connection, table: str, result: SalvageResult) -> None:
    try:
        wanted = _columns(dst, table)
        have = set(_columns(src, table))
    except sqlite3.DatabaseError:
        result.unreadable[table] = result.unreadable.get(table, 0) + 1
        return
    columns = [c for c in wanted if c in have]
    if not columns:
        return
    names = ", ".join(f'"{c}"' for c in columns)
    insert = f'INSERT OR IGNORE INTO "{table}" ({names}) VALUES ({", ".join("?" * len(columns))})'
    last, batch, copied = -(1 << 63), _BATCH, 0
    while True:
        try:
            rows = src.execute(f'SELECT rowid, {names} FROM "{table}" WHERE rowid > ? ORDER BY rowid LIMIT ?',
                               (last, batch)).fetchall()
        except sqlite3.DatabaseError:
            if batch > 1:
                batch = 1
                continue
            result.unreadable[table] = result.unreadable.get(table, 0) + 1
            nxt = _first_readable(src, table, last)
            if nxt is None:
                break
            last, batch = nxt - 1, 1
            continue
        if not rows:
            break
        dst.executemany(insert, [row[1:] for row in rows])
        copied += len(rows)
        last, batch = int(rows[-1][0]), min(batch * 2, _BATCH)
    result.rows[table] = copied


def _tidy(dst: sqlite3.Connection, src: sqlite3.Connection, result: SalvageResult) -> None:
    """Drop rows whose image was lost, keep the id counter past every id, bump the generation."""
    for table in ("aliases", "embeddings", "pending_embeddings"):
        with contextlib.suppress(sqlite3.DatabaseError):
            result.dropped += dst.execute(f'DELETE FROM "{table}" WHERE image_id NOT IN (SELECT id FROM images)').rowcount
    seq = 0
    with contextlib.suppress(sqlite3.DatabaseError, TypeError):
        seq = int(src.execute("SELECT seq FROM sqlite_sequence WHERE name = 'images'").fetchone()[0])
    top = dst.execute("SELECT coalesce(max(id), 0) FROM images").fetchone()[0]
    dst.execute("DELETE FROM sqlite_sequence WHERE name = 'images'")
    dst.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('images', ?)", (max(seq, int(top)),))
    row = dst.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
    try:
        generation = int(json.loads(row[0])) if row else 0
    except (TypeError, ValueError):
        generation = 0
    dst.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('generation', ?)", (json.dumps(generation + 1),))


def salvage_database(damaged: str | os.PathLike, out: str | os.PathLike, *,
                     wal: str | os.PathLike | None = None) -> SalvageResult:
    """Copy what is readable of the database ``damaged`` (with its journal ``wal``, if any) into
    a new library database at ``out`` (which must not exist). The damaged files are only read.
    Returns what was copied; on ``error`` nothing was written."""
    from db.store import MetadataStore  # the library's schema, created in the new file

    damaged, out = Path(damaged), Path(out)
    wal_path = Path(wal) if wal is not None else None
    result = SalvageResult()
    work = Path(tempfile.mkdtemp(prefix=".salvage-", dir=out.parent))
    try:
        copy = work / "damaged.db"
        shutil.copyfile(damaged, copy)
        copy_wal = None
        if wal_path is not None and wal_path.exists() and wal_path.stat().st_size > 0:
            copy_wal = work / "damaged.db-wal"
            shutil.copyfile(wal_path, copy_wal)
        src = _open_readable(copy, copy_wal, result)
        if src is None:
            return result
        fresh = work / "salvaged.db"
        MetadataStore(f"sqlite:///{fresh}").close()
        dst = sqlite3.connect(fresh)
        try:
            dst.execute("PRAGMA foreign_keys=OFF")
            dst.execute("DELETE FROM meta")  # the fresh file's own facts give way to the recovered ones
            with dst:
                for table in _TABLES:
                    _copy_table(src, dst, table, result)
                _tidy(dst, src, result)
            if not sum(result.rows.values()):
                result.error = "no row could be read"
                return result
            dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file to move into place
            problems = dst.execute("PRAGMA quick_check").fetchall()
            if problems != [("ok",)]:
                result.error = f"the rebuilt database does not check out ({problems[0][0]})"
                return result
        finally:
            dst.close()
            src.close()
        os.replace(fresh, out)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)
