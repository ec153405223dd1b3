"""Upgrades of a library database written by an earlier engine, run when it is opened for writing.

Schema 1 -> 2: SQLite paths become readable. Schema 1 kept every path as raw bytes (a BLOB), which
``sqlite3`` and datasette show as binary; schema 2 keeps a path that is valid UTF-8 as TEXT and
only the others as bytes (see ``db.models.FsPath``). The upgrade rewrites the paths of ``images``
and ``aliases`` in one transaction, so a crash leaves the file at schema 1, upgraded again next
time. An engine that knows only schema 1 refuses a schema 2 file (it would look paths up as
bytes) rather than misreading it.
"""

from __future__ import annotations

import json

from sqlalchemy import Engine, bindparam, select, text, update

from db.models import Alias, Image, Meta

CURRENT = 2


def _readable_paths(conn, table) -> int:
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


def upgrade(engine: Engine, found: str) -> str:
    """Bring the database from schema ``found`` (JSON text) to ``CURRENT``; returns the version it
    is at now (JSON text). A newer version than ``CURRENT`` is left alone (the caller refuses it)."""
    if json.loads(found) >= CURRENT:
        return found
    with engine.begin() as conn:
        # Write first, so that this transaction holds SQLite's write lock before it reads: two
        # processes upgrading at once then take turns instead of failing on a stale snapshot.
        conn.execute(update(Meta).where(Meta.key == "schema_version").values(value=Meta.value))
        now = conn.scalar(select(Meta.value).where(Meta.key == "schema_version")) or found
        if json.loads(now) >= CURRENT:
            return now
        if engine.dialect.name == "sqlite":
            for table in (Image, Alias):
                _readable_paths(conn, table)
        conn.execute(update(Meta).where(Meta.key == "schema_version").values(value=bindparam("v")),
                     {"v": json.dumps(CURRENT)})
    return json.dumps(CURRENT)
