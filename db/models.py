"""SQLAlchemy 2.0 models of a library."""

from __future__ import annotations

import os
from datetime import datetime

from sqlalchemy import DateTime, Float, ForeignKey, Integer, LargeBinary, String, Text
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


class FsPath(TypeDecorator):
    """A filesystem path kept as its raw bytes, so names that are not valid UTF-8 survive the
    round trip (Python holds them as surrogate escapes, which no SQL text column accepts)."""

    impl = LargeBinary
    cache_ok = True

    def process_bind_param(self, value: str | os.PathLike | None, dialect: Dialect) -> bytes | None:
        return None if value is None else os.fsencode(value)

    def process_result_value(self, value: bytes | None, dialect: Dialect) -> str | None:
        return None if value is None else os.fsdecode(bytes(value))


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
    """The stored vector of an image (float32 bytes), so the index can be rebuilt without decoding."""

    __tablename__ = "embeddings"

    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    vector: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)


class Meta(Base):
    """Key/value facts of the library (JSON text): schema version, encoder identity, generation."""

    __tablename__ = "meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text, nullable=False)
