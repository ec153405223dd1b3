"""Upgrades of a library database written by an earlier engine, run when it is opened for writing.

Schema 1 -> 2: SQLite paths become readable. Schema 1 kept every path as raw bytes (a BLOB), which
``sqlite3`` and datasette show as binary; schema 2 keeps a path that is valid UTF-8 as TEXT and
only the others as bytes (see ``db.models.FsPath``). The upgrade rewrites the paths of ``images``
and ``aliases`` in one transaction, so a crash leaves the file at schema 1, upgraded again next
time.

Schema 2 -> 3: stored vectors become float16 (``db.vectors``), half their size. A library may hold
millions of vectors, so they are converted in batches, each its own transaction that also records
the last image id converted (meta ``upgrade_vectors``); a process killed mid-way leaves every
vector either converted or not, with the record saying which, and the next open carries on from
there. The transaction that finds nothing left to convert sets the version, so no vector written
meanwhile is missed. Until then the version stays 2, and readers accept both sizes (``legacy``
in ``db.vectors.decode_vectors``).

A SQLite file keeps its page size for life, and a float16 vector of 1280 values (2.5 KB) takes a
whole page of the 4 KB SQLite used to start files with, where the 8 KB pages of new files hold
three. So once its vectors are converted, an older SQLite library is compacted into 8 KB pages
(``compact``: one ``VACUUM``, atomic like any SQLite transaction, which needs the file to itself:
while another process has it open the compaction waits for a later open, meanwhile the file works
as it is, its freed pages reused by new rows).

An engine that knows only an earlier schema refuses a later file (it would misread paths or
vectors) rather than misreading it.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from typing import Callable

from sqlalchemy import Engine, bindparam, delete, insert, select, text, update
from sqlalchemy.engine import Connection

from db.models import Alias, Embedding, Image, Meta, PendingEmbedding
from db.vectors import halve_blob

log = logging.getLogger(__name__)

CURRENT = 3
FLOAT16_SCHEMA = 3  # the first schema whose vectors are float16
_PROGRESS_KEY = "upgrade_vectors"  # meta: {table name: last image id converted}
BATCH = 2000  # vectors per transaction (about 10 MB of 1280-d float32)
COMPACT_KEY = "upgrade_compact"  # meta: the SQLite file's pages are to be enlarged (see compact)


def _readable_paths(conn: Connection, table) -> int:
    """Rewrite the BLOB paths of ``table`` that are valid UTF-8 as TEXT; returns how many."""
    name = table.__tablename__
    rows = conn.execute(text(f"SELECT rowid, path FROM {name} WHERE typeof(path) = 'blob'")).all()
    changes = []
    for rowid, raw in rows:
        try:
            changes.append({"r": rowid, "p": bytes(raw).decode("utf-8")})
        except UnicodeDecodeError:
            continue  # stays as its exact bytes
    for start in range(0, len(changes), 5000):
        conn.execute(text(f"UPDATE {name} SET path = :p WHERE rowid = :r"), changes[start:start + 5000])
    return len(changes)


def _locked_version(conn: Connection, found: str) -> int:
    """The schema version as this transaction sees it, after taking the database's write lock.

    Written first, so that the transaction holds the write lock (all of SQLite; the version row in
    PostgreSQL) before it reads: two processes upgrading at once then take turns instead of
    working from a stale snapshot."""
    conn.execute(update(Meta).where(Meta.key == "schema_version").values(value=Meta.value))
    return json.loads(conn.scalar(select(Meta.value).where(Meta.key == "schema_version")) or found)


def _set(conn: Connection, key: str, value: object) -> None:
    if conn.execute(update(Meta).where(Meta.key == key).values(value=json.dumps(value))).rowcount == 0:
        conn.execute(insert(Meta).values(key=key, value=json.dumps(value)))


def _set_version(conn: Connection, version: int) -> None:
    conn.execute(update(Meta).where(Meta.key == "schema_version").values(value=bindparam("v")),
                 {"v": json.dumps(version)})


def _to_readable_paths(engine: Engine, found: str) -> None:
    """Schema 1 -> 2, in one transaction."""
    with engine.begin() as conn:
        if _locked_version(conn, found) >= 2:
            return
        if engine.dialect.name == "sqlite":
            for table in (Image, Alias):
                _readable_paths(conn, table)
        _set_version(conn, 2)


def _convert_batch(conn: Connection, table, progress: dict[str, int], batch: int) -> bool:
    """Convert the next ``batch`` vectors of ``table`` after the recorded id to float16 and record
    the last id; False when none is left."""
    name = table.__tablename__
    last = int(progress.get(name, -1))
    rows = conn.execute(select(table.image_id, table.vector).where(table.image_id > last)
                        .order_by(table.image_id).limit(batch)).all()
    if not rows:
        return False
    changes = []
    for row in rows:
        halved = halve_blob(bytes(row.vector))
        if halved is not None:
            changes.append({"i": row.image_id, "v": halved})
    if changes:
        conn.execute(update(table).where(table.image_id == bindparam("i")).values(vector=bindparam("v")), changes)
    progress[name] = int(rows[-1].image_id)
    _set(conn, _PROGRESS_KEY, progress)
    return True


def _to_float16_vectors(engine: Engine, found: str, batch: int, after_batch: Callable[[], None] | None) -> None:
    """Schema 2 -> 3, batch by batch (see the module docstring)."""
    while True:
        with engine.begin() as conn:
            if _locked_version(conn, found) >= FLOAT16_SCHEMA:
                return
            raw = conn.scalar(select(Meta.value).where(Meta.key == _PROGRESS_KEY))
            progress = json.loads(raw) if raw else {}
            if not any(_convert_batch(conn, table, progress, batch) for table in (Embedding, PendingEmbedding)):
                conn.execute(delete(Meta).where(Meta.key == _PROGRESS_KEY))
                if engine.dialect.name == "sqlite":
                    _set(conn, COMPACT_KEY, True)
                _set_version(conn, FLOAT16_SCHEMA)
                return
        if after_batch is not None:
            after_batch()


def upgrade(engine: Engine, found: str, *, batch: int | None = None,
            after_batch: Callable[[], None] | None = None) -> str:
    """Bring the database from schema ``found`` (JSON text) to ``CURRENT``; returns the version it
    is at now (JSON text). A newer version than ``CURRENT`` is left alone (the caller refuses it).
    batch: vectors converted per transaction (default ``BATCH``); after_batch() is called after
    each committed batch of the vector conversion (progress)."""
    version = json.loads(found)
    if version >= CURRENT:
        return found
    if version < 2:
        _to_readable_paths(engine, found)
    _to_float16_vectors(engine, found, batch or BATCH, after_batch)
    return json.dumps(CURRENT)


def compact(engine: Engine, page_size: int) -> bool:
    """Rewrite the SQLite file of ``engine`` into pages of ``page_size`` bytes, dropping the pages
    freed by the vector conversion, when the upgrade asked for it (meta ``upgrade_compact``) and
    no other connection has the file open; True when it was done. Never raises: a file that
    cannot be compacted now works as it is, and the next writable open tries again."""
    path = engine.url.database
    if engine.dialect.name != "sqlite" or not path or path == ":memory:":
        return False
    with engine.connect() as conn:
        if conn.scalar(select(Meta.value).where(Meta.key == COMPACT_KEY)) is None:
            return False
    engine.dispose()  # this process's own pooled connections would count as other users
    conn = sqlite3.connect(path, timeout=0.5, isolation_level=None)
    try:
        # Leaving WAL needs the only connection to the file; a page size change needs a rollback
        # journal. VACUUM then rewrites the whole file in one transaction: a crash leaves it as before.
        if str(conn.execute("PRAGMA journal_mode=DELETE").fetchone()[0]).lower() != "delete":
            return False
        current = int(conn.execute("PRAGMA page_size").fetchone()[0])
        conn.execute(f"PRAGMA page_size={max(int(page_size), current)}")
        conn.execute("VACUUM")
        conn.execute("DELETE FROM meta WHERE key = ?", (COMPACT_KEY,))
        log.info("database %s compacted after its vectors became float16", path)
        return True
    except sqlite3.Error as exc:
        log.info("database %s not compacted now (%s); the next open tries again", path, exc)
        return False
    finally:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
        except sqlite3.Error:
            pass  # every connection of the store sets WAL again when it opens
        conn.close()
