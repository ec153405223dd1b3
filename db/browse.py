"""Reads of the metadata store that look at a library as a whole: indexed folders with their
counts, the ids of images that match metadata filters, the known paths under a folder streamed
in slices, and how many there are. Each is one SQL query (in SQLite), or a series of short
bounded ones, rather than a load of every row: a library of a million photos is read in pieces.
"""

from __future__ import annotations

import os
from collections import Counter
from datetime import datetime
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
from sqlalchemy import LargeBinary, String, and_, func, literal, or_, select, union

from db.changes import StoredFile
from db.models import Alias, Image, path_as_stored

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine
    from sqlalchemy.sql.elements import ColumnElement


def _folder_of(path: str) -> str:
    return os.path.dirname(path) or os.sep


def _stored_literal(value: str | bytes):
    """``value`` as a SQL literal of the type it is stored as (TEXT or BLOB; see FsPath), so a
    comparison with the raw column is made as SQLite orders the column itself."""
    return literal(value, LargeBinary if isinstance(value, bytes) else String)


STREAM_CHUNK = 1000  # rows per read of the streaming readers: a few hundred KB of paths


class BrowseMixin:
    """Mixed into MetadataStore (which provides ``_engine``)."""

    _engine: Engine

    def folder_counts(self) -> list[tuple[str, int]]:
        """(folder, indexed files in it) for every folder holding an indexed file (canonical paths
        and byte-identical aliases alike; files of subfolders count for the subfolder), by folder.

        SQLite groups text paths in SQL (the folder is the path up to its last separator); the
        rare paths kept as bytes, and other databases, are grouped here as they stream by."""
        counts: Counter[str] = Counter()
        with self._engine.connect() as conn:
            for table in (Image, Alias):
                if self._engine.dialect.name == "sqlite":
                    column = table.__table__.c.path  # the raw column: TEXT or BLOB as stored
                    folder = func.rtrim(column, func.replace(column, os.sep, ""))
                    query = (select(folder.label("folder"), func.count().label("n"))
                             .where(func.typeof(column) == "text").group_by(folder))
                    for row in conn.execute(query):
                        counts[(row.folder[:-1] if len(row.folder) > 1 else row.folder) or os.sep] += row.n
                    raw = conn.execute(select(table.path).where(func.typeof(column) != "text"))
                else:
                    raw = conn.execute(select(table.path).execution_options(yield_per=5000))
                for (path,) in raw:
                    counts[_folder_of(path)] += 1
        return sorted(counts.items())

    def ids_matching(self, *, taken_after: datetime | None = None, taken_before: datetime | None = None,
                     camera: str | None = None, under: Sequence[str] = ()) -> np.ndarray:
        """Ids (int64, ascending) of the images that pass every filter given: captured at or after
        ``taken_after`` and before ``taken_before`` (an image without a capture time passes
        neither), a camera whose make/model contains ``camera`` (case-insensitive), and a file (its
        path or a byte-identical alias) inside one of the ``under`` folders (absolute)."""
        conditions: list[ColumnElement] = []
        if taken_after is not None:
            conditions.append(Image.taken_at >= taken_after)
        if taken_before is not None:
            conditions.append(Image.taken_at < taken_before)
        if camera:
            conditions.append(func.lower(Image.camera).contains(camera.lower(), autoescape=True))
        query = select(Image.id).where(*conditions)
        if under:
            inside = union(select(Image.id).where(self._under(Image, under)),
                           select(Alias.image_id).where(self._under(Alias, under))).subquery()
            query = query.where(Image.id.in_(select(inside.c[0])))
        with self._engine.connect() as conn:
            return np.asarray(sorted(conn.scalars(query).all()), np.int64)

    def _under(self, table, folders: Sequence[str]) -> ColumnElement:
        """``table``'s path lies inside one of ``folders``: compared as stored (see FsPath), text
        against text by characters and bytes against bytes, so no name is misread."""
        column = table.__table__.c.path
        sqlite = self._engine.dialect.name == "sqlite"
        tests = []
        for folder in folders:
            prefix = os.fsencode(os.path.join(os.fsdecode(folder), ""))
            tests.append(func.substr(column, 1, len(prefix)) == literal(prefix, LargeBinary))
            if sqlite:
                try:
                    as_text = prefix.decode("utf-8")
                except UnicodeDecodeError:
                    continue
                tests.append(func.substr(column, 1, len(as_text)) == literal(as_text, String))
        return or_(*tests)

    def file_sizes(self) -> np.ndarray:
        """The distinct sizes (bytes) of every known file, image rows and aliases alike: int64
        ascending, computed in SQL (a million rows hold far fewer distinct sizes)."""
        query = union(select(Image.bytes), select(Alias.bytes))  # UNION: distinct already
        with self._engine.connect() as conn:
            return np.asarray(sorted(int(v) for v in conn.scalars(query)), np.int64)

    # -- known paths under a folder, streamed ------------------------------------------------------
    def _ranges(self, table, folder: str, *, itself: bool) -> list[ColumnElement]:
        """Conditions, each a plain range (or equality) of ``table``'s raw path column that the
        ``path`` index answers in order, which together say "inside ``folder`` (absolute), or with
        ``itself`` equal to it". In SQLite both the text range and the bytes range are needed, since
        a name that is not valid UTF-8 is kept as bytes (see FsPath), and bytes sort after all text.
        (One OR of them would make SQLite sort the whole match for every slice.)"""
        column = table.__table__.c.path
        low = os.fsencode(os.path.join(os.fsdecode(folder), ""))
        high = low[:-1] + bytes([low[-1] + 1])
        ranges = []
        if itself:
            ranges.append(column == _stored_literal(self._as_stored(folder)))
        if self._engine.dialect.name == "sqlite":
            try:
                ranges.append(and_(column >= literal(low.decode("utf-8"), String),
                                   column < literal(high.decode("utf-8"), String)))
            except UnicodeDecodeError:
                pass
        ranges.append(and_(column >= literal(low, LargeBinary), column < literal(high, LargeBinary)))
        return ranges

    def _as_stored(self, path: str) -> str | bytes:
        """What the database holds for ``path``: see FsPath."""
        return path_as_stored(path) if self._engine.dialect.name == "sqlite" else os.fsencode(path)

    def count_under(self, folder: str, *, itself: bool = False) -> int:
        """How many known paths (image rows and aliases) lie inside ``folder`` (absolute), counted
        in SQL; with ``itself``, a path equal to ``folder`` counts too."""
        with self._engine.connect() as conn:
            return sum(int(conn.scalar(select(func.count()).select_from(table).where(condition)))
                       for table in (Image, Alias) for condition in self._ranges(table, folder, itself=itself))

    def iter_files_under(self, folder: str, chunk: int = STREAM_CHUNK) -> Iterator[list[StoredFile]]:
        """Every known path equal to ``folder`` (absolute) or inside it, as StoredFile slices of at
        most ``chunk``: image rows, then aliases, each by path. Each slice is its own short read
        that resumes after the last path of the one before (no offset, no open cursor), so memory
        stays bounded and a writer is never held up, whatever the size of the library."""
        for table in (Image, Alias):
            column = table.__table__.c.path
            if table is Image:
                columns = select(Image.id.label("image_id"), Image.path, Image.bytes, Image.mtime, Image.content_hash)
            else:
                columns = (select(Alias.image_id, Alias.path, Alias.bytes, Alias.mtime, Image.content_hash)
                           .join(Image, Image.id == Alias.image_id))
            for condition in self._ranges(table, folder, itself=True):
                query = columns.where(condition).order_by(column).limit(int(chunk))
                after = None
                while True:
                    page = query if after is None else query.where(column > _stored_literal(after))
                    with self._engine.connect() as conn:
                        rows = conn.execute(page).all()
                    if rows:
                        yield [StoredFile(r.path, r.image_id, table is Alias, r.bytes, r.mtime, r.content_hash)
                               for r in rows]
                    if len(rows) < chunk:
                        break
                    after = self._as_stored(rows[-1].path)
