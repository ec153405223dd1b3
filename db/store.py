"""The metadata store: one SQLAlchemy engine over the library database.

All writes of an ingest batch happen in one transaction (rows, embeddings, aliases and the
generation counter together), so after a crash the database is either before or after a batch.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, ContextManager, Iterable, Iterator, Sequence

import numpy as np
from sqlalchemy import create_engine, delete, event, func, insert, select, update
from sqlalchemy.engine import URL, Connection, Engine, ExceptionContext, make_url
from sqlalchemy.exc import (ArgumentError, DatabaseError, IntegrityError, NoSuchModuleError, OperationalError,
                            ProgrammingError)

from db.bulk import insert_images, insert_vectors, path_chunks, path_in, vector_rows
from db.common import CHUNK as _CHUNK, PG_DISK_FULL, StoreError, StoreFullError, chunks as _chunks
from db.locks import database_write_lock
from db.migrations import CURRENT as CURRENT_SCHEMA, FLOAT16_SCHEMA, compact, upgrade
from db.models import Alias, Base, Embedding, Image, Meta
from db.sqlite_files import DatabaseDamagedError, read_only_engine
from db.browse import BrowseMixin
from db.changes import ChangesMixin
from db.shared_files import SharedFilesMixin
from db.staging import StagingMixin
from db.vectors import LEGACY_DTYPE, blob_size, decode_vectors, encode_vectors, stack_vectors, widen

SCHEMA_VERSION = CURRENT_SCHEMA  # db/migrations.py upgrades older files


@dataclass(frozen=True)
class ImageRecord:
    """One indexed image as stored."""

    id: int
    path: str
    content_hash: str
    bytes: int
    mtime: float
    width: int | None
    height: int | None
    format: str | None
    taken_at: datetime | None
    camera: str | None
    added_at: datetime

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        for key in ("taken_at", "added_at"):
            if out[key] is not None:
                out[key] = out[key].isoformat()
        return out


@dataclass(frozen=True)
class PathState:
    """What the store knows of a path: its image id, and the size/mtime/hash when last seen."""

    image_id: int
    bytes: int
    mtime: float
    content_hash: str | None
    is_alias: bool


# Pages of a new SQLite file. A 1280-d float16 vector (2.5 KB) fits in a page but two do not fit
# in SQLite's default 4 KB page, which would cost a whole page per vector; 8 KB pages hold three.
# (The size is fixed once the file has content, so an older library keeps its pages.)
SQLITE_PAGE_SIZE = 8192


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA page_size={SQLITE_PAGE_SIZE}")  # only a new, empty file takes it
    # WAL lets queries read while an ingest writes; NORMAL sync is crash-safe in WAL mode
    # (a power cut may lose the last commit, never corrupt the file).
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26


def _is_corruption(exc: BaseException | None) -> bool:
    """True for SQLite's "database disk image is malformed" and "file is not a database"."""
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
    text = str(exc)
    return "malformed" in text or "not a database" in text


class StoreURLError(StoreError):
    """The database URL is not one this installation can open (malformed, an unknown kind of
    database, its driver is not installed, or its server refuses or cannot be reached)."""


_SQLITE_FULL = 13


def _is_full(exc: BaseException | None) -> bool:
    """True for SQLite's "database or disk is full" and PostgreSQL's "disk full"."""
    if getattr(exc, "sqlstate", None) == PG_DISK_FULL:
        return True
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF == _SQLITE_FULL if code is not None else "disk is full" in str(exc)


def _masked(url: str) -> str:
    """``url`` without a password, for messages."""
    return re.sub(r"(//[^:/@]*:)[^@/]*@", r"\1***@", url)


def _parse_url(url: str) -> URL:
    """``url`` parsed; StoreURLError saying what a database URL looks like when it is not one."""
    try:
        return make_url(url)
    except ArgumentError:
        raise StoreURLError(f"{_masked(url)!r} is not a database URL (expected e.g. sqlite:///path/to/library.db "
                            "or postgresql://user@host/name)") from None


def _create_engine(url: URL) -> Engine:
    """The SQLAlchemy engine of ``url``; StoreURLError for an unknown kind of database or a driver
    that is not installed."""
    shown = url.render_as_string(hide_password=True)
    try:
        return create_engine(url)
    except NoSuchModuleError:
        raise StoreURLError(f"unknown kind of database {url.drivername!r} in the database URL {shown!r} "
                            "(sqlite, postgresql, mysql ... with their driver installed)") from None
    except ImportError as exc:
        raise StoreURLError(f"the database URL {shown!r} needs the Python package {exc.name or 'of its driver'}, "
                            "which is not installed") from None
    except ArgumentError as exc:
        raise StoreURLError(f"the database URL {shown!r} cannot be used: {exc}") from None


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


ID_SCAN_INDEX = "embeddings_ids"  # SQLite: see MetadataStore._add_id_scan_index


class MetadataStore(StagingMixin, ChangesMixin, BrowseMixin, SharedFilesMixin):
    """Images, aliases, embeddings and library facts in one SQL database (SQLite by default)."""

    def __init__(self, url: str, *, on_corrupt: Callable[[str], Exception] | None = None, read_only: bool = False):
        """on_corrupt(message) makes the exception raised whenever SQLite finds the file damaged,
        at open or by any later read or write (default: DatabaseDamagedError, a StoreError).
        read_only: create nothing and write nothing (a SQLite file is opened as db.sqlite_files
        explains; other databases are only read)."""
        self.url = url
        parsed = _parse_url(url)
        self.where = parsed.database if parsed.get_backend_name() == "sqlite" and parsed.database \
            else parsed.render_as_string(hide_password=True)
        self._on_corrupt = on_corrupt or DatabaseDamagedError
        self.read_only = read_only
        try:
            if read_only and parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
                self._engine: Engine = read_only_engine(parsed.database)
            else:
                self._engine = _create_engine(parsed)  # private: SQL stays inside db/
                if self._engine.dialect.name == "sqlite":
                    event.listen(self._engine, "connect", _sqlite_pragmas)
            event.listen(self._engine, "handle_error", self._handle_error)
            found = self._read_schema() if read_only else self._create_schema()
        except (DatabaseError, OperationalError) as exc:
            reason = str(exc.orig) if exc.orig else str(exc)
            if isinstance(exc, OperationalError) and parsed.get_backend_name() != "sqlite":
                # a server that refuses or cannot be reached: a setup problem, not a damaged library
                raise StoreURLError(f"database {self.where} cannot be opened: {reason.strip().splitlines()[0]}") from None
            raise StoreError(f"database {self.where} is unreadable: {reason}") from None
        if json.loads(found) > SCHEMA_VERSION:
            raise StoreError(f"database {self.where} was written by a newer engine (schema {found})")
        # float32 vectors of an earlier schema are still read when the file could not be upgraded
        # (a read-only open) or another process is upgrading it now (see db.migrations)
        self._legacy_vectors = json.loads(found) < FLOAT16_SCHEMA

    def _create_schema(self, attempts: int = 3) -> str:
        """Create the tables and the schema version row where missing; returns the version found
        (JSON text). Two processes opening a new library at once can both see no table and both
        create it: the loser's CREATE or INSERT fails, and trying again finds the winner's."""
        for _ in range(attempts - 1):
            try:
                return self._create_schema_once()
            except (OperationalError, ProgrammingError, IntegrityError) as exc:
                if not (isinstance(exc, IntegrityError) or "already exists" in str(exc.orig)):
                    raise  # (PostgreSQL says DuplicateTable, a ProgrammingError; SQLite an OperationalError)
        return self._create_schema_once()

    def _read_schema(self) -> str:
        """The schema version found (JSON text), creating nothing (a read-only open)."""
        with self._engine.connect() as conn:
            if not self._engine.dialect.has_table(conn, Meta.__tablename__):
                raise StoreError(f"database {self.where} holds no library")
            found = conn.scalar(select(Meta.value).where(Meta.key == "schema_version"))
        return found if found is not None else json.dumps(SCHEMA_VERSION)

    def _create_schema_once(self) -> str:
        Base.metadata.create_all(self._engine)
        with self._engine.begin() as conn:
            found = conn.scalar(select(Meta.value).where(Meta.key == "schema_version"))
            if found is None:
                found = json.dumps(SCHEMA_VERSION)
                conn.execute(insert(Meta).values(key="schema_version", value=found))
        found = upgrade(self._engine, found)  # an older library's file is brought up to date
        compact(self._engine, SQLITE_PAGE_SIZE)  # and its file into pages that suit its vectors
        self._add_id_scan_index()
        return found

    def _add_id_scan_index(self) -> None:
        """On SQLite, an index of the embeddings' ids alone, made where missing (a file of any
        earlier engine gets it on its first writable open; older engines ignore it). A vector's row
        fills a third of a page, so listing or counting the ids by the table read every vector:
        1.4 s and 0.41 s at 1M rows, against 0.22 s and 0.002 s through this index of about 12 bytes
        a row (what an index open reconciles with, ``engine info`` counts and ``doctor`` checks)."""
        if self._engine.dialect.name != "sqlite":
            return  # PostgreSQL scans its primary key's own index for these
        with self._engine.begin() as conn:
            if conn.exec_driver_sql("SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = ?",
                                    (ID_SCAN_INDEX,)).first() is None:
                conn.exec_driver_sql(f"CREATE INDEX IF NOT EXISTS {ID_SCAN_INDEX} ON embeddings (image_id)")

    def _handle_error(self, context: ExceptionContext) -> None:
        error = self._store_error(context.original_exception)
        if error is not None:
            raise error from None

    def _store_error(self, exc: BaseException) -> Exception | None:
        """The project's error for a driver error that means a full disk or a damaged file, else None."""
        if _is_full(exc):
            return StoreFullError(f"no space left to write the database {self.where} ({exc}); free some space and "
                                  "run the command again (everything committed so far is kept)")
        if _is_corruption(exc):
            return self._on_corrupt(f"database file {self.where} is damaged ({exc})")
        return None

    def integrity_errors(self, limit: int = 20) -> list[str]:
        """SQLite's own page-level check (``PRAGMA quick_check``): an empty list when the file is
        sound. Reads the whole file, so it is for ``engine doctor``, not for every open."""
        if self._engine.dialect.name != "sqlite":
            return []
        with self._engine.connect() as conn:
            rows = [str(r[0]) for r in conn.exec_driver_sql(f"PRAGMA quick_check({int(limit)})").all()]
        return [] if rows == ["ok"] else rows

    @classmethod
    def for_file(cls, path: str | os.PathLike) -> "MetadataStore":
        return cls(f"sqlite:///{os.fspath(path)}")

    def on_commit(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` at every commit, before it reaches the database (the crash tests'
        ``commit`` fault point kills the process there)."""
        event.listen(self._engine, "commit", lambda _conn: callback())

    def close(self) -> None:
        self._engine.dispose()

    def write_lock(self, *, wait: bool = True, on_wait: Callable[[], None] | None = None) -> ContextManager[None]:
        """The database's share of the library's write lock (see db.locks): an advisory lock in
        PostgreSQL, so writers on other machines wait too; nothing for SQLite (its home holds the
        lock). With wait=False a held lock raises StoreLockedError."""
        return database_write_lock(self._engine, wait=wait, on_wait=on_wait)

    # -- library facts -------------------------------------------------------------------------
    def get_meta(self, key: str, default: Any = None) -> Any:
        with self._engine.connect() as conn:
            value = conn.scalar(select(Meta.value).where(Meta.key == key))
        return default if value is None else json.loads(value)

    def set_meta(self, key: str, value: Any) -> None:
        with self._engine.begin() as conn:
            self._set_meta(conn, key, value)

    @staticmethod
    def _set_meta(conn: Connection, key: str, value: Any) -> None:
        text = json.dumps(value)
        if conn.execute(update(Meta).where(Meta.key == key).values(value=text)).rowcount == 0:
            conn.execute(insert(Meta).values(key=key, value=text))

    def generation(self) -> int:
        """A counter bumped by every write; the index file records the one it reflects."""
        return int(self.get_meta("generation", 0))

    @staticmethod
    def _bump(conn: Connection) -> None:
        current = conn.scalar(select(Meta.value).where(Meta.key == "generation"))
        MetadataStore._set_meta(conn, "generation", (json.loads(current) if current else 0) + 1)

    # -- reads ---------------------------------------------------------------------------------
    def count(self) -> int:
        with self._engine.connect() as conn:
            return int(conn.scalar(select(func.count()).select_from(Image)))

    def count_aliases(self) -> int:
        with self._engine.connect() as conn:
            return int(conn.scalar(select(func.count()).select_from(Alias)))

    def count_embeddings(self) -> int:
        with self._engine.connect() as conn:
            return int(conn.scalar(select(func.count()).select_from(Embedding)))

    def lookup_paths(self, paths: Sequence[str]) -> dict[str, PathState]:
        """Known paths among ``paths`` (canonical or alias) with their last-seen size/mtime/hash."""
        found: dict[str, PathState] = {}
        with self._engine.connect() as conn:
            for chunk in path_chunks(conn, paths):
                for row in conn.execute(select(Image.id, Image.path, Image.bytes, Image.mtime, Image.content_hash)
                                        .where(path_in(conn, Image, chunk))):
                    found[row.path] = PathState(row.id, row.bytes, row.mtime, row.content_hash, False)
                for row in conn.execute(select(Alias.image_id, Alias.path, Alias.bytes, Alias.mtime, Image.content_hash)
                                        .join(Image, Image.id == Alias.image_id).where(path_in(conn, Alias, chunk))):
                    found[row.path] = PathState(row.image_id, row.bytes, row.mtime, row.content_hash, True)
        return found

    def lookup_hashes(self, hashes: Iterable[str]) -> dict[str, int]:
        """content hash -> image id for the hashes already indexed."""
        found: dict[str, int] = {}
        with self._engine.connect() as conn:
            for chunk in _chunks(sorted(set(hashes))):
                for row in conn.execute(select(Image.id, Image.content_hash).where(Image.content_hash.in_(chunk))):
                    found.setdefault(row.content_hash, row.id)
        return found

    def get_images(self, ids: Iterable[int]) -> dict[int, ImageRecord]:
        """Records by id; ids that no longer exist are simply absent."""
        out: dict[int, ImageRecord] = {}
        wanted = sorted({int(i) for i in ids if int(i) >= 0})
        with self._engine.connect() as conn:
            for chunk in _chunks(wanted):
                for row in conn.execute(select(Image).where(Image.id.in_(chunk))):
                    out[row.id] = ImageRecord(**{k: getattr(row, k) for k in ImageRecord.__dataclass_fields__})
        return out

    def aliases_of(self, ids: Iterable[int]) -> dict[int, list[str]]:
        """image id -> its alias paths, for the ids among ``ids`` that have any."""
        out: dict[int, list[str]] = {}
        with self._engine.connect() as conn:
            for chunk in _chunks(sorted({int(i) for i in ids})):
                for row in conn.execute(select(Alias.image_id, Alias.path).where(Alias.image_id.in_(chunk))):
                    out.setdefault(row.image_id, []).append(row.path)
        return out

    def alias_map(self) -> dict[int, list[str]]:
        """image id -> its alias paths, for every image that has any (reads the aliases table only)."""
        out: dict[int, list[str]] = {}
        with self._engine.connect() as conn:
            for row in conn.execute(select(Alias.image_id, Alias.path).order_by(Alias.image_id)):
                out.setdefault(row.image_id, []).append(row.path)
        return out

    def get_embeddings(self, ids: Sequence[int], dim: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 [M], vectors float32 [M, dim]) for the requested ids that have a vector."""
        found, stacked = self.get_stored(ids, dim)
        return found, widen(stacked)

    def get_stored(self, ids: Sequence[int], dim: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 [M], vectors [M, dim] as stored) for the requested ids that have a vector:
        float16 values, not yet converted (``db.vectors.widen`` converts rows of them to what
        ``get_embeddings`` gives), so a caller scoring thousands converts a few at a time; float32
        while the database holds older float32 vectors (see ``db.vectors.stack_vectors``)."""
        with self._engine.connect() as conn:
            try:
                rows = list(vector_rows(conn, ids))
            except sqlite3.DatabaseError as exc:  # the driver's own cursor: SQLAlchemy's hook does not see it
                raise (self._store_error(exc) or exc) from None
        return (np.asarray([r[0] for r in rows], np.int64),
                stack_vectors([r[1] for r in rows], dim, legacy=self._legacy_vectors))

    def _decode(self, blobs: Sequence[bytes], dim: int) -> np.ndarray:
        """Stored blobs -> float32 [len(blobs), dim] (see db.vectors.decode_vectors)."""
        return decode_vectors(blobs, dim, legacy=self._legacy_vectors)

    def vector_sizes(self, dim: int) -> tuple[int, ...]:
        """The byte sizes a well-formed stored ``dim``-d vector may have in this database: float16
        values, and float32 ones too while it is not yet upgraded (see db.migrations)."""
        if self._legacy_vectors:
            return blob_size(dim), blob_size(dim, LEGACY_DTYPE)
        return (blob_size(dim),)

    def iter_embeddings(self, dim: int, batch: int = 20000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """All stored vectors in id order, in slices: (ids int64 [n], vectors float32 [n, dim])."""
        last = -1
        while True:
            with self._engine.connect() as conn:
                rows = conn.execute(select(Embedding.image_id, Embedding.vector).where(Embedding.image_id > last)
                                    .order_by(Embedding.image_id).limit(batch)).all()
            if not rows:
                return
            last = rows[-1].image_id
            yield np.asarray([r.image_id for r in rows], np.int64), self._decode([r.vector for r in rows], dim)

    def image_ids(self) -> np.ndarray:
        """Every image id, int64 [N] ascending."""
        with self._engine.connect() as conn:
            return np.asarray(conn.scalars(select(Image.id).order_by(Image.id)).all(), np.int64)

    def embedding_ids(self) -> np.ndarray:
        """The ids that have a stored vector, int64 [M] ascending."""
        with self._engine.connect() as conn:
            return np.asarray(conn.scalars(select(Embedding.image_id).order_by(Embedding.image_id)).all(), np.int64)

    def malformed_embedding_ids(self, dim: int) -> list[int]:
        """Ids whose stored vector is not ``dim`` float16 values (``dim * 2`` bytes; see
        ``vector_sizes``), ascending."""
        with self._engine.connect() as conn:
            return [int(i) for i in conn.scalars(select(Embedding.image_id)
                                                 .where(func.length(Embedding.vector).not_in(self.vector_sizes(dim)))
                                                 .order_by(Embedding.image_id)).all()]

    def file_stats(self) -> list[tuple[str, int, float]]:
        """(path, bytes, mtime) as last seen, for every known path: canonical paths, then aliases."""
        with self._engine.connect() as conn:
            rows = conn.execute(select(Image.path, Image.bytes, Image.mtime)).all()
            rows += conn.execute(select(Alias.path, Alias.bytes, Alias.mtime)).all()
        return [(r.path, int(r.bytes), float(r.mtime)) for r in rows]

    def iter_paths(self) -> Iterator[tuple[str, int, bool]]:
        """(path, image id, is_alias) for every known path."""
        with self._engine.connect() as conn:
            rows = conn.execute(select(Image.path, Image.id)).all()
            alias_rows = conn.execute(select(Alias.path, Alias.image_id)).all()
        for row in rows:
            yield row.path, row.id, False
        for row in alias_rows:
            yield row.path, row.image_id, True

    # -- writes --------------------------------------------------------------------------------
    def write_batch(self, new_rows: Sequence[dict], new_vectors: np.ndarray | None = None, *,
                    replaced_paths: Sequence[str] = (), aliases: Sequence[dict] = (),
                    touched: Sequence[tuple[bool, str, float]] = ()) -> tuple[list[int], list[int]]:
        """One transaction: forget ``replaced_paths`` (files whose content changed; see
        ``remove_paths``), insert ``new_rows`` (Image column dicts) with their vectors (float32
        [N, D]), insert ``aliases`` (dicts of path, bytes, mtime and either image_id or ``new_row``,
        the position in ``new_rows`` of the image it duplicates) and refresh the mtime of
        ``touched`` (is_alias, path, mtime) files whose content did not change.

        A changed file gets a new id rather than a rewritten vector, so the index can always be
        reconciled by id sets alone. Returns (new row ids in order, ids whose vectors must go)."""
        now = _now()
        ids: list[int] = []
        with self._engine.begin() as conn:
            gone = self._remove_paths(conn, replaced_paths) if replaced_paths else []
            if new_rows:
                blobs = encode_vectors(new_vectors) if new_vectors is not None else None  # refused before any write
                ids = insert_images(conn, [dict(r, added_at=r.get("added_at") or now) for r in new_rows])
                if blobs is not None:
                    insert_vectors(conn, Embedding, ids, blobs)
            if aliases:
                resolved = [{"path": a["path"], "bytes": a["bytes"], "mtime": a["mtime"],
                             "image_id": a["image_id"] if a.get("new_row") is None else ids[a["new_row"]]}
                            for a in aliases]
                for chunk in _chunks([a["path"] for a in resolved]):
                    conn.execute(delete(Alias).where(Alias.path.in_(chunk)))
                conn.execute(insert(Alias), resolved)
            for is_alias, path, mtime in touched:
                table = Alias if is_alias else Image
                conn.execute(update(table).where(table.path == path).values(mtime=mtime))
            self._bump(conn)
        return ids, gone

    def insert_rows(self, rows: Sequence[dict]) -> list[int]:
        """Bulk-insert image rows without vectors (used by benchmarks and repair); returns ids."""
        return self.write_batch(rows)[0]

    def put_embeddings(self, ids: Sequence[int], vectors: np.ndarray) -> None:
        """Store (or replace) vectors (float32 [N, D]) for existing rows ``ids`` (int [N]), in one
        transaction."""
        blobs = encode_vectors(vectors)
        with self._engine.begin() as conn:
            for chunk_start in range(0, len(ids), _CHUNK):
                chunk = [int(i) for i in ids[chunk_start:chunk_start + _CHUNK]]
                conn.execute(delete(Embedding).where(Embedding.image_id.in_(chunk)))
            insert_vectors(conn, Embedding, ids, blobs)
            self._bump(conn)

    def remove_paths(self, paths: Sequence[str]) -> list[int]:
        """Forget ``paths``. An alias is dropped; a canonical path with aliases hands its row to the
        first alias (same content, same vector); otherwise row and vector go. Returns the image ids
        whose vectors must leave the index."""
        with self._engine.begin() as conn:
            gone = self._remove_paths(conn, paths)
            self._bump(conn)
        return gone

    @staticmethod
    def _remove_paths(conn: Connection, paths: Sequence[str]) -> list[int]:
        gone: list[int] = []
        for chunk in _chunks(list(paths)):
            conn.execute(delete(Alias).where(Alias.path.in_(chunk)))
            for row in conn.execute(select(Image.id, Image.path).where(Image.path.in_(chunk))).all():
                heir = conn.execute(select(Alias.path, Alias.bytes, Alias.mtime)
                                    .where(Alias.image_id == row.id).order_by(Alias.path).limit(1)).first()
                if heir is not None:
                    conn.execute(delete(Alias).where(Alias.path == heir.path))
                    conn.execute(update(Image).where(Image.id == row.id)
                                 .values(path=heir.path, bytes=heir.bytes, mtime=heir.mtime))
                else:
                    conn.execute(delete(Embedding).where(Embedding.image_id == row.id))
                    conn.execute(delete(Image).where(Image.id == row.id))
                    gone.append(int(row.id))
        return gone

    def delete_embeddings(self, ids: Sequence[int]) -> None:
        """Drop the stored vectors of these rows, keeping the rows (repair of malformed vectors)."""
        with self._engine.begin() as conn:
            for chunk in _chunks([int(i) for i in ids]):
                conn.execute(delete(Embedding).where(Embedding.image_id.in_(chunk)))
            self._bump(conn)

    def remove_ids(self, ids: Sequence[int]) -> None:
        """Delete rows (and their vectors and aliases) by id."""
        with self._engine.begin() as conn:
            for chunk in _chunks([int(i) for i in ids]):
                conn.execute(delete(Embedding).where(Embedding.image_id.in_(chunk)))
                conn.execute(delete(Alias).where(Alias.image_id.in_(chunk)))
                conn.execute(delete(Image).where(Image.id.in_(chunk)))
            self._bump(conn)
