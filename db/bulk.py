"""Many rows in one statement, in whatever way each database is fast at: the inserts of an ingest
or import batch and the lookups of many paths.

PostgreSQL: new image rows take their ids from the table's sequence (``nextval``, so ids are never
reused, exactly as with a plain INSERT) and go in by ``COPY``, vectors by binary ``COPY``; a list
of paths is one text parameter instead of thousands of bound values. Elsewhere
(SQLite): a multi-row ``INSERT ... RETURNING`` and ``IN (...)`` lists of at most ``CHUNK`` values.
Everything runs inside the caller's transaction.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Iterator, Sequence

from sqlalchemy import Text, bindparam, func, insert, select, text
from sqlalchemy.exc import DBAPIError

from db.common import CHUNK, PG_DISK_FULL, StoreFullError, chunks
from db.models import Image

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection
    from sqlalchemy.sql.elements import ColumnElement

PG_CHUNK = 20000  # paths per array parameter: one statement for a typical lookup


def is_postgres(conn: Connection) -> bool:
    return conn.dialect.name == "postgresql"


def path_chunks(conn: Connection, paths: Sequence[str]) -> Iterator[Sequence[str]]:
    """``paths`` in slices sized for ``path_in`` on this database."""
    return chunks(list(paths), PG_CHUNK if is_postgres(conn) else CHUNK)


def path_in(conn: Connection, table, paths: Sequence[str]) -> ColumnElement:
    """``table.path`` is one of ``paths`` (at most a ``path_chunks`` slice). In PostgreSQL the
    paths travel as one text value, hex-encoded and comma-separated, split and decoded by the
    server: several times faster than the driver adapting a list of ``bytea`` values."""
    if is_postgres(conn):
        column = table.__table__.c.path  # the raw bytea column (see db.models.FsPath)
        joined = ",".join(os.fsencode(p).hex() for p in paths)
        listed = func.decode(func.unnest(func.string_to_array(bindparam(None, joined, type_=Text), ",")), "hex")
        return column.in_(select(listed))
    return table.path.in_(paths)


@contextlib.contextmanager
def _copy_into(conn: Connection, statement: str) -> Iterator:
    """A psycopg ``COPY ... FROM STDIN`` on the connection of ``conn`` (so in its transaction).
    Its errors come out as SQLAlchemy's would (IntegrityError for a path already indexed ...), a
    full disk as StoreFullError."""
    import psycopg

    cursor = conn.connection.driver_connection.cursor()
    try:
        with cursor.copy(statement) as copy:
            yield copy
    except psycopg.Error as exc:
        if getattr(exc, "sqlstate", None) == PG_DISK_FULL:
            raise StoreFullError(f"no space left to write the database ({exc}); free some space and run the "
                                 "command again (everything committed so far is kept)") from None
        raise DBAPIError.instance(statement, None, exc, psycopg.Error) from None
    finally:
        cursor.close()


def insert_images(conn: Connection, rows: Sequence[dict]) -> list[int]:
    """Insert ``rows`` (Image column dicts, ``added_at`` included); returns their ids in order."""
    if not rows:
        return []
    if not is_postgres(conn):
        return [int(i) for i in conn.scalars(insert(Image).returning(Image.id, sort_by_parameter_order=True), rows)]
    ids = sorted(int(i) for i in conn.scalars(
        text("SELECT nextval(pg_get_serial_sequence('images', 'id')) FROM generate_series(1, :n)"), {"n": len(rows)}))
    columns = sorted({key for row in rows for key in row} - {"id"})
    names = ", ".join(f'"{c}"' for c in ["id", *columns])
    with _copy_into(conn, f"COPY images ({names}) FROM STDIN") as copy:
        for image_id, row in zip(ids, rows):
            copy.write_row([image_id, *(os.fsencode(row["path"]) if c == "path" else row.get(c) for c in columns)])
    return ids


def insert_vectors(conn: Connection, table, ids: Sequence[int], blobs: Sequence[bytes]) -> None:
    """Insert one vector blob per id into ``table`` (``embeddings`` or ``pending_embeddings``)."""
    if not len(ids):
        return
    if not is_postgres(conn):
        conn.execute(insert(table), [{"image_id": int(i), "vector": blob} for i, blob in zip(ids, blobs)])
        return
    with _copy_into(conn, f"COPY {table.__tablename__} (image_id, vector) FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types(["int4", "bytea"])
        for image_id, blob in zip(ids, blobs):
            copy.write_row((int(image_id), blob))


def vector_rows(conn: Connection, ids: Sequence[int]) -> Iterator[tuple[int, bytes]]:
    """(image id, vector blob) of each of ``ids`` that has a stored vector, in no set order.

    Exact re-ranking fetches tens of candidates per query by primary key, so the per-row cost is
    the query's cost: on SQLite the rows go through the driver's own cursor (SQLAlchemy's result
    rows cost more than the lookup itself: 9 against 5 us a vector, measured on a 1M-row
    library), on PostgreSQL one ``= ANY(array)`` statement per ``PG_CHUNK`` ids."""
    wanted = [int(i) for i in ids]
    if is_postgres(conn):
        statement = text("SELECT image_id, vector FROM embeddings WHERE image_id = ANY(:ids)")
        for chunk in chunks(wanted, PG_CHUNK):
            for image_id, blob in conn.execute(statement, {"ids": list(chunk)}):
                yield int(image_id), bytes(blob)
        return
    cursor = conn.connection.driver_connection.cursor()
    try:
        for chunk in chunks(wanted, CHUNK):
            marks = ",".join("?" * len(chunk))
            yield from cursor.execute(f"SELECT image_id, vector FROM embeddings WHERE image_id IN ({marks})", chunk)
    finally:
        cursor.close()
