"""The database's part of a library's write lock.

A library whose database is its home's SQLite file is locked by a file in that home (see
``engine.library.Library.write_lock``). A PostgreSQL library can be written from several machines,
each with a home of its own, so the lock must live in the database: a session-level advisory lock
(``pg_advisory_lock``) held on a connection of its own for as long as the writer works. PostgreSQL
releases it when that connection ends, so a writer that is killed (``kill -9``, a lost machine
once the server notices its connection gone) never leaves the library locked.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from typing import TYPE_CHECKING, Callable, Iterator

from sqlalchemy import func, select

from db.common import StoreError

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

log = logging.getLogger(__name__)

# One library per database: a fixed key (64-bit, from a name, so no other program's key is taken by chance).
WRITE_LOCK_KEY = int.from_bytes(hashlib.sha256(b"engine library write lock").digest()[:8], "big", signed=True)


class StoreLockedError(StoreError):
    """Another process (on this machine or another) holds the library's write lock."""


@contextlib.contextmanager
def database_write_lock(engine: Engine, *, wait: bool = True,
                        on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold the write lock of the library in ``engine``'s database: a PostgreSQL advisory lock;
    nothing for other databases. A second holder waits (after ``on_wait()``) or, with
    wait=False, gets StoreLockedError."""
    if engine.dialect.name != "postgresql":
        yield
        return
    conn = engine.connect()
    held = False
    try:
        # Each statement is committed at once: a session lock outlives its transaction, and a
        # transaction left open for a whole ingest would keep an old snapshot alive on the server.
        held = bool(conn.scalar(select(func.pg_try_advisory_lock(WRITE_LOCK_KEY))))
        conn.commit()
        if not held:
            if not wait:
                raise StoreLockedError("another process is writing to this library's database")
            if on_wait is not None:
                on_wait()
            conn.scalar(select(func.pg_advisory_lock(WRITE_LOCK_KEY)))
            conn.commit()
            held = True
        yield
    finally:
        if held:
            try:
                conn.scalar(select(func.pg_advisory_unlock(WRITE_LOCK_KEY)))
                conn.commit()
            except Exception as exc:  # the connection is gone (so is the lock) or broken: never pool it
                log.info("advisory lock not released on its connection (%s); closing it instead", exc)
                conn.invalidate()
        conn.close()
