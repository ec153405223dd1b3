"""Reads of the metadata store that look at a library as a whole: indexed folders with their
counts, and the ids of images that match metadata filters. Each is one SQL query (in SQLite)
rather than a load of every row.
"""

from __future__ import annotations

import os
from collections import Counter
from datetime import datetime
from typing import TYPE_CHECKING, Sequence

import numpy as np
from sqlalchemy import LargeBinary, String, func, literal, or_, select, union

from db.models import Alias, Image

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine
    from sqlalchemy.sql.elements import ColumnElement


def _folder_of(path: str) -> str:
    return os.path.dirname(path) or os.sep


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
