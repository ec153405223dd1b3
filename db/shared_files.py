"""Files of a library kept in its database, a part of the MetadataStore (``library_files``).

A library in a shared database (PostgreSQL) is used from several homes, each on its own machine
with its own index; every home also needs the encoder the library's vectors were made with, which
the first home saved to its own folder. Keeping that file in the database too lets any other home
fetch it. The table is additive: ``create_all`` adds it to a database written before it existed.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from sqlalchemy import delete, insert, select

from db.models import LibraryFile

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine


def put_files(conn: Connection, files: dict[str, bytes]) -> None:
    """Store (or replace) ``files`` (name -> content) inside the caller's transaction."""
    for name, content in files.items():
        conn.execute(delete(LibraryFile).where(LibraryFile.name == name))
        conn.execute(insert(LibraryFile).values(name=name, content=content, sha256=hashlib.sha256(content).hexdigest()))


class SharedFilesMixin:
    """Mixed into MetadataStore (which provides ``_engine``)."""

    _engine: Engine

    def put_library_file(self, name: str, content: bytes) -> None:
        """Keep ``content`` as the library's file ``name`` (replacing any), in one transaction.
        No generation bump: no query reads it."""
        with self._engine.begin() as conn:
            put_files(conn, {name: content})

    def library_file_digest(self, name: str) -> str | None:
        """The SHA-256 (hex) of the library's file ``name``, or None when none is kept."""
        with self._engine.connect() as conn:
            return conn.scalar(select(LibraryFile.sha256).where(LibraryFile.name == name))

    def library_file(self, name: str) -> bytes | None:
        """The content of the library's file ``name``, or None when none is kept."""
        with self._engine.connect() as conn:
            content = conn.scalar(select(LibraryFile.content).where(LibraryFile.name == name))
        return None if content is None else bytes(content)
