"""Where indexed files are and what they hold, a part of the MetadataStore: the paths under a
folder, the rows holding given content, a streamed listing of every known path (``engine doctor
--deep``), and ``apply_changes``, the one transaction in which an ingest moves, forgets, adds and
aliases files.

A path is recorded at most once: as the path of one image row, or as one alias.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import numpy as np
from sqlalchemy import and_, delete, insert, or_, select, update

from db.bulk import insert_images, insert_vectors
from db.common import chunks as _chunks
from db.models import Alias, Embedding, Image
from db.vectors import as_stored, encode_vectors

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine


@dataclass(frozen=True)
class StoredFile:
    """A path the library knows: the image row it shows (``image_id``), whether it is an alias,
    its size and mtime when last seen, and the content hash of its row (blake2b-256 hex)."""

    path: str
    image_id: int
    is_alias: bool
    bytes: int
    mtime: float
    content_hash: str


@dataclass(frozen=True)
class Move:
    """Image row ``image_id`` (its id, vector and facts kept) now lives at ``path``, a file with
    the same bytes, seen with this size and mtime."""

    image_id: int
    path: str
    bytes: int
    mtime: float


@dataclass
class ChangeSet:
    """What one transaction does, applied in this order (so any mix of them is consistent):

    1. the rows in ``moves`` leave their current paths;
    2. ``forget``: an alias at one of these paths is dropped; a row still there is deleted with its
       vector and its aliases (no alias inherits it: the caller promotes copies explicitly by a move);
    3. the rows in ``moves`` land at their new paths (an alias recorded there is dropped first);
    4. ``new_rows`` (Image column dicts) are inserted with ``vectors`` (float32 [len(new_rows), D]),
       which ``apply_changes`` then replaces by the values as stored (float16, see db.vectors);
    5. ``aliases`` (dicts of path, bytes, mtime and either image_id or new_row, a position in
       ``new_rows``) are recorded, replacing any alias at the same path;
    6. ``touched`` (is_alias, path, bytes, mtime): files whose content did not change, seen anew.
    """

    forget: list[str] = field(default_factory=list)
    moves: list[Move] = field(default_factory=list)
    new_rows: list[dict] = field(default_factory=list)
    vectors: np.ndarray | None = None
    aliases: list[dict] = field(default_factory=list)
    touched: list[tuple[bool, str, int, float]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.forget or self.moves or self.new_rows or self.aliases or self.touched)


@dataclass(frozen=True)
class Applied:
    """What ``apply_changes`` did: ids of the inserted rows (in ``new_rows`` order), ids of the
    rows deleted (their vectors must leave the index), and alias paths not recorded because the
    row they named no longer exists (an ingest reports them; the next one indexes them)."""

    new_ids: list[int]
    dropped_ids: list[int]
    orphaned: list[str]


def _moving_placeholder(image_id: int) -> str:
    """A path no file can have (a NUL byte is never part of one), unique per row."""
    return f"\0moving\0{image_id}"


def _prefix_range(root: str) -> tuple[bytes, bytes, bytes]:
    """(the root itself, lowest and first-above byte strings of the paths inside it) as stored."""
    exact = os.fsencode(root)
    low = os.fsencode(root.rstrip(os.sep) + os.sep)
    return exact, low, low[:-1] + bytes([low[-1] + 1])


class ChangesMixin:
    """The file-change methods of ``db.store.MetadataStore`` (which provides the engine and the
    generation counter)."""

    _engine: Engine

    if TYPE_CHECKING:
        @staticmethod
        def _bump(conn: Connection) -> None: ...

    # -- reads ---------------------------------------------------------------------------------
    def paths_under(self, roots: Iterable[str]) -> dict[str, StoredFile]:
        """Every known path (canonical or alias) equal to one of ``roots`` (absolute) or inside it."""
        found: dict[str, StoredFile] = {}
        with self._engine.connect() as conn:
            for root in roots:
                exact, low, high = _prefix_range(os.fspath(root))
                for row in conn.execute(select(Image.id, Image.path, Image.bytes, Image.mtime, Image.content_hash)
                                        .where(or_(Image.path == exact, and_(Image.path >= low, Image.path < high)))):
                    found[row.path] = StoredFile(row.path, row.id, False, row.bytes, row.mtime, row.content_hash)
                for row in conn.execute(select(Alias.image_id, Alias.path, Alias.bytes, Alias.mtime, Image.content_hash)
                                        .join(Image, Image.id == Alias.image_id)
                                        .where(or_(Alias.path == exact, and_(Alias.path >= low, Alias.path < high)))):
                    found[row.path] = StoredFile(row.path, row.image_id, True, row.bytes, row.mtime, row.content_hash)
        return found

    def rows_by_hash(self, hashes: Iterable[str]) -> dict[str, list[StoredFile]]:
        """content hash -> the image rows holding it (oldest id first), for the hashes indexed."""
        found: dict[str, list[StoredFile]] = {}
        with self._engine.connect() as conn:
            for chunk in _chunks(sorted(set(hashes))):
                for row in conn.execute(select(Image.id, Image.path, Image.bytes, Image.mtime, Image.content_hash)
                                        .where(Image.content_hash.in_(chunk)).order_by(Image.id)):
                    found.setdefault(row.content_hash, []).append(
                        StoredFile(row.path, row.id, False, row.bytes, row.mtime, row.content_hash))
        return found

    def aliases_by_image(self, ids: Iterable[int]) -> dict[int, list[StoredFile]]:
        """image id -> its aliases (by path), for the ids among ``ids`` that have any."""
        found: dict[int, list[StoredFile]] = {}
        with self._engine.connect() as conn:
            for chunk in _chunks(sorted({int(i) for i in ids})):
                for row in conn.execute(select(Alias.image_id, Alias.path, Alias.bytes, Alias.mtime, Image.content_hash)
                                        .join(Image, Image.id == Alias.image_id)
                                        .where(Alias.image_id.in_(chunk)).order_by(Alias.path)):
                    found.setdefault(row.image_id, []).append(
                        StoredFile(row.path, row.image_id, True, row.bytes, row.mtime, row.content_hash))
        return found

    def iter_files(self, chunk: int = 1000) -> Iterator[list[StoredFile]]:
        """Every known path in slices of at most ``chunk``: image rows by id, then aliases by path.
        Each slice is its own short read, so a library of any size streams in bounded memory."""
        last_id = -1
        while True:
            with self._engine.connect() as conn:
                rows = conn.execute(select(Image.id, Image.path, Image.bytes, Image.mtime, Image.content_hash)
                                    .where(Image.id > last_id).order_by(Image.id).limit(chunk)).all()
            if not rows:
                break
            last_id = rows[-1].id
            yield [StoredFile(r.path, r.id, False, r.bytes, r.mtime, r.content_hash) for r in rows]
        last_path = b""
        while True:
            with self._engine.connect() as conn:
                rows = conn.execute(select(Alias.image_id, Alias.path, Alias.bytes, Alias.mtime, Image.content_hash)
                                    .join(Image, Image.id == Alias.image_id).where(Alias.path > last_path)
                                    .order_by(Alias.path).limit(chunk)).all()
            if not rows:
                return
            last_path = os.fsencode(rows[-1].path)
            yield [StoredFile(r.path, r.image_id, True, r.bytes, r.mtime, r.content_hash) for r in rows]

    # -- writes --------------------------------------------------------------------------------
    def mark_unverified(self, paths: Sequence[str]) -> None:
        """Forget the last-seen mtime of these paths (rows or aliases), so the next ingest of them
        reads and hashes their bytes instead of trusting size and mtime."""
        with self._engine.begin() as conn:
            for chunk in _chunks(list(paths)):
                conn.execute(update(Image).where(Image.path.in_(chunk)).values(mtime=-1.0))
                conn.execute(update(Alias).where(Alias.path.in_(chunk)).values(mtime=-1.0))
            self._bump(conn)

    def apply_changes(self, changes: ChangeSet) -> Applied:
        """Apply ``changes`` (see ChangeSet for the order) in one transaction, bumping the generation."""
        now = datetime.now(timezone.utc).replace(tzinfo=None)
        new_ids: list[int] = []
        orphaned: list[str] = []
        with self._engine.begin() as conn:
            for move in changes.moves:
                conn.execute(update(Image).where(Image.id == move.image_id).values(path=_moving_placeholder(move.image_id)))
            dropped = _forget(conn, changes.forget)
            for move in changes.moves:
                conn.execute(delete(Alias).where(Alias.path == move.path))
                conn.execute(update(Image).where(Image.id == move.image_id)
                             .values(path=move.path, bytes=move.bytes, mtime=move.mtime))
            if changes.new_rows:
                for chunk in _chunks([r["path"] for r in changes.new_rows]):
                    conn.execute(delete(Alias).where(Alias.path.in_(chunk)))
                new_ids = insert_images(conn, [dict(r, added_at=r.get("added_at") or now) for r in changes.new_rows])
                if changes.vectors is not None:
                    insert_vectors(conn, Embedding, new_ids, encode_vectors(changes.vectors))
                    # what the caller adds to its index is then exactly what the database holds, so
                    # an index built now and one rebuilt later from the store answer alike
                    changes.vectors = as_stored(changes.vectors)
            if changes.aliases:
                resolved = [{"path": a["path"], "bytes": a["bytes"], "mtime": a["mtime"],
                             "image_id": a["image_id"] if a.get("new_row") is None else new_ids[a["new_row"]]}
                            for a in changes.aliases]
                alive: set[int] = set()
                for chunk in _chunks(sorted({a["image_id"] for a in resolved})):
                    alive.update(conn.scalars(select(Image.id).where(Image.id.in_(chunk))).all())
                orphaned = [a["path"] for a in resolved if a["image_id"] not in alive]
                resolved = [a for a in resolved if a["image_id"] in alive]
                for chunk in _chunks([a["path"] for a in resolved]):
                    conn.execute(delete(Alias).where(Alias.path.in_(chunk)))
                if resolved:
                    conn.execute(insert(Alias), resolved)
            for is_alias, path, size, mtime in changes.touched:
                table = Alias if is_alias else Image
                conn.execute(update(table).where(table.path == path).values(bytes=size, mtime=mtime))
            self._bump(conn)
        return Applied(new_ids, dropped, orphaned)


def _forget(conn: Connection, paths: Sequence[str]) -> list[int]:
    """Drop the aliases at ``paths`` and delete the rows still at them (vector and aliases with
    them). Returns the deleted row ids."""
    dropped: list[int] = []
    for chunk in _chunks(list(paths)):
        conn.execute(delete(Alias).where(Alias.path.in_(chunk)))
        ids = [int(i) for i in conn.scalars(select(Image.id).where(Image.path.in_(chunk))).all()]
        if ids:
            conn.execute(delete(Embedding).where(Embedding.image_id.in_(ids)))
            conn.execute(delete(Alias).where(Alias.image_id.in_(ids)))
            conn.execute(delete(Image).where(Image.id.in_(ids)))
            dropped += ids
    return dropped
