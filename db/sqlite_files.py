"""The SQLite file of a library as something that may be damaged or read-only: the error for a
damaged file, and an engine that reads a database without writing anything beside it.

A WAL-mode database keeps its latest commits in ``NAME-wal`` until a checkpoint folds them into
``NAME``, and its readers share ``NAME-shm``, which SQLite creates when missing. On a read-only
folder it cannot be created, so a read-only open uses:

* ``mode=ro`` when both ``-wal`` and ``-shm`` are there: every commit is seen, a writer too;
* ``immutable=1`` otherwise: nothing beside the file is touched, no lock is taken and no
  concurrent writer is seen (on read-only media there is none). Without a ``-wal`` nothing is
  lost; a non-empty ``-wal`` without its ``-shm`` (a writer killed, then the folder copied) holds
  commits that such an open cannot see, which is logged as a warning.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from urllib.parse import quote

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine

from db.common import StoreError

log = logging.getLogger(__name__)


class DatabaseDamagedError(StoreError):
    """The database file is damaged: SQLite reports it malformed or not a database at all."""


def _read_only_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA query_only=ON")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def read_only_uri(path: str | os.PathLike) -> str:
    """The SQLite URI that opens ``path`` read-only (see the module docstring for the choice)."""
    path = os.path.abspath(os.fspath(path))
    wal, shm = f"{path}-wal", f"{path}-shm"
    has_wal = os.path.exists(wal) and os.path.getsize(wal) > 0
    if has_wal and os.path.exists(shm):
        params = "mode=ro"
    else:
        params = "mode=ro&immutable=1"
        if has_wal:
            log.warning("database %s is read-only and its %s file is missing: the commits still in %s are not seen "
                        "(open it once with write access to fold them into the database)", path,
                        os.path.basename(shm), os.path.basename(wal))
    return f"file:{quote(os.fsencode(path))}?{params}"


def read_only_engine(path: str | os.PathLike) -> Engine:
    """A SQLAlchemy engine that reads the SQLite database at ``path`` and writes nothing (its
    connections are ``query_only``)."""
    uri = read_only_uri(path)
    engine = create_engine(f"sqlite:///{os.fspath(path)}",
                           creator=lambda: sqlite3.connect(uri, uri=True, check_same_thread=False))
    event.listen(engine, "connect", _read_only_pragmas)
    return engine
