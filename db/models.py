"""SQLAlchemy 2.0 models of a library."""

from __future__ import annotations

import os
from datetime import datetime

from sqlalchemy import DateTime, Float, ForeignKey, Integer, LargeBinary, String, Text
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator, TypeEngine


class FsPath(TypeDecorator):
    """A filesystem path, kept exactly. In SQLite a name that is valid UTF-8 is stored as TEXT, so
    ``sqlite3`` and datasette show it as it reads; any other name (Python holds its undecodable
    bytes as surrogate escapes, which no text column accepts) is stored as its raw bytes (a BLOB).
    The choice depends on the name alone, so every lookup binds the same value that was stored.
    Other databases keep every path as raw bytes. Reads give ``str`` either way."""

    impl = LargeBinary
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine:
        return dialect.type_descriptor(Text() if dialect.name == "sqlite" else LargeBinary())

    def process_bind_param(self, value: str | bytes | os.PathLike | None, dialect: Dialect) -> str | bytes | None:
        if value is None:
            return None
        raw = os.fsencode(value)
        if dialect.name == "sqlite":
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                return raw
        return raw

    def process_result_value(self, value: str | bytes | None, dialect: Dialect) -> str | None:
        if value is None or isinstance(value, str):
            return value
        return os.fsdecode(bytes(value))


def path_as_stored(path: str | bytes | os.PathLike) -> str | bytes:
    """What SQLite holds for ``path`` (see FsPath): the text of a valid UTF-8 name, else its bytes."""
    raw = os.fsencode(path)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw


class Base(DeclarativeBase):
    pass


class Image(Base):
    """One indexed image. ``id`` is also its vector's id in the FAISS index."""

    __tablename__ = "images"
    # Ids are never reused, so a stale vector left in an index after a crash can never point at
    # a different image; reconciling the index is then a plain difference of id sets.
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    path: Mapped[str] = mapped_column(FsPath, unique=True, nullable=False)
    content_hash: Mapped[str] = mapped_column(String(64), index=True, nullable=False)
    bytes: Mapped[int] = mapped_column(Integer, nullable=False)
    mtime: Mapped[float] = mapped_column(Float, nullable=False)
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    format: Mapped[str | None] = mapped_column(String(16))
    taken_at: Mapped[datetime | None] = mapped_column(DateTime)
    camera: Mapped[str | None] = mapped_column(String(128))
    added_at: Mapped[datetime] = mapped_column(DateTime, nullable=False)


class Alias(Base):
    """Another path whose content is byte-identical to an indexed image: recorded, never embedded."""

    __tablename__ = "aliases"

    path: Mapped[str] = mapped_column(FsPath, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    bytes: Mapped[int] = mapped_column(Integer, nullable=False)
    mtime: Mapped[float] = mapped_column(Float, nullable=False)


class Embedding(Base):
    """The stored vector of an image (float16 bytes, see ``db.vectors``), so the index can be
    rebuilt and re-ranked without decoding."""

    __tablename__ = "embeddings"
    # PostgreSQL: keep a vector in its row, uncompressed (float16 does not compress), rather than
    # try to compress and then move every vector over ~2 KB out to the TOAST table.
    __table_args__ = {"postgresql_with": {"toast_tuple_target": 8160}}

    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    vector: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)


class PendingEmbedding(Base):
    """A vector made by an encoder the library is being re-embedded with (``engine reindex
    --model``), staged beside the live one until every row has one; then all of them replace the
    ``embeddings`` in one transaction. Nothing reads this table but the re-embedding itself."""

    __tablename__ = "pending_embeddings"
    __table_args__ = {"postgresql_with": {"toast_tuple_target": 8160}}  # as in Embedding

    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    vector: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)


class Meta(Base):
    """Key/value facts of the library (JSON text): schema version, encoder identity, generation."""

    __tablename__ = "meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text, nullable=False)


class LibraryFile(Base):
    """A file of the library kept in its database (the encoder checkpoint), for the homes that
    share a database they did not create: a second home fetches it from here (``engine.shared_home``)."""

    __tablename__ = "library_files"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    content: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
