"""Staged re-embedding (``engine reindex --model``), a part of the MetadataStore.

New vectors are written to ``pending_embeddings`` beside the live ones, batch by batch, and
switched in by one transaction once every row has one. Until then nothing a query reads
(embeddings, meta, generation) changes, and a killed run resumes from what is staged. The table is
additive: the store's ``create_all`` adds it to a library written before it existed, and an engine
that predates it ignores it.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from sqlalchemy import delete, exists, func, insert, select

from db.bulk import insert_vectors
from db.common import StoreError, chunks as _chunks
from db.models import Alias, Embedding, Image, Meta, PendingEmbedding
from db.shared_files import put_files
from db.vectors import encode_vectors

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine

_PENDING_KEY = "pending_embeddings"  # meta: what the staged vectors are (see start_pending)
_EPOCH_KEY = "embeddings_epoch"  # meta: bumped whenever every vector is replaced at once


class StagingMixin:
    """The staging methods of ``db.store.MetadataStore`` (which provides the engine and the meta
    helpers named below)."""

    _engine: Engine
    where: str

    if TYPE_CHECKING:
        def get_meta(self, key: str, default: Any = None) -> Any: ...

        @staticmethod
        def _set_meta(conn: Connection, key: str, value: Any) -> None: ...

        @staticmethod
        def _bump(conn: Connection) -> None: ...

        def _decode(self, blobs: Sequence[bytes], dim: int) -> np.ndarray: ...

    def pending_record(self) -> dict[str, Any] | None:
        """What the staged vectors are (the record given to ``start_pending``), or None when
        nothing is staged."""
        return self.get_meta(_PENDING_KEY)

    def start_pending(self, record: dict[str, Any]) -> None:
        """Begin staging anew: forget any staged vectors and remember ``record`` (JSON-ready: which
        encoder the vectors to come are made with), in one transaction. The live library is not
        touched (no generation bump)."""
        with self._engine.begin() as conn:
            conn.execute(delete(PendingEmbedding))
            self._set_meta(conn, _PENDING_KEY, record)

    def discard_pending(self) -> None:
        """Forget the staged vectors and their record (the live library is not touched)."""
        with self._engine.begin() as conn:
            conn.execute(delete(PendingEmbedding))
            conn.execute(delete(Meta).where(Meta.key == _PENDING_KEY))

    def put_pending(self, ids: Sequence[int], vectors: np.ndarray) -> None:
        """Stage (or restage) float32 [N, D] vectors for rows ``ids`` (int [N]), in one
        transaction; ids of rows deleted meanwhile are skipped. No generation bump: queries do not
        see staged vectors."""
        blobs = encode_vectors(vectors)
        wanted = [int(i) for i in ids]
        with self._engine.begin() as conn:
            alive: set[int] = set()
            for chunk in _chunks(wanted):
                conn.execute(delete(PendingEmbedding).where(PendingEmbedding.image_id.in_(chunk)))
                alive.update(conn.scalars(select(Image.id).where(Image.id.in_(chunk))).all())
            kept = [(i, blob) for i, blob in zip(wanted, blobs) if i in alive]
            insert_vectors(conn, PendingEmbedding, [i for i, _ in kept], [blob for _, blob in kept])

    def pending_ids(self) -> np.ndarray:
        """The ids that have a staged vector, int64 [M] ascending."""
        with self._engine.connect() as conn:
            return np.asarray(conn.scalars(select(PendingEmbedding.image_id)
                                           .order_by(PendingEmbedding.image_id)).all(), np.int64)

    def get_pending(self, ids: Sequence[int], dim: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 [M], vectors float32 [M, dim]) of the requested ids that have a staged vector."""
        got_ids: list[int] = []
        vecs: list[bytes] = []
        with self._engine.connect() as conn:
            for chunk in _chunks([int(i) for i in ids]):
                for row in conn.execute(select(PendingEmbedding.image_id, PendingEmbedding.vector)
                                        .where(PendingEmbedding.image_id.in_(chunk))):
                    got_ids.append(row.image_id)
                    vecs.append(row.vector)
        return np.asarray(got_ids, np.int64), self._decode(vecs, dim)

    def embeddings_epoch(self) -> int:
        """How many times the whole set of vectors was replaced (``switch_to_pending``); the index
        file records the epoch it was built in, so an index of the previous vectors is never
        reconciled by id with the new ones."""
        return int(self.get_meta(_EPOCH_KEY, 0))

    def switch_to_pending(self, meta: dict[str, Any], drop_ids: Sequence[int] = (),
                          files: dict[str, bytes] | None = None) -> int:
        """Make the staged vectors the library's vectors, in one transaction: forget the rows
        ``drop_ids`` (with their aliases and vectors), check that every other row has a staged
        vector, replace every stored vector by the staged one, set the ``meta`` keys (JSON-ready
        values), keep ``files`` (name -> content: the new encoder for other homes, see
        db.shared_files), forget the pending record, bump the embeddings epoch and the generation.

        Returns how many vectors were switched in. Raises StoreError, changing nothing, when a
        row has no staged vector."""
        with self._engine.begin() as conn:
            for chunk in _chunks(sorted({int(i) for i in drop_ids})):
                for table in (PendingEmbedding, Embedding):
                    conn.execute(delete(table).where(table.image_id.in_(chunk)))
                conn.execute(delete(Alias).where(Alias.image_id.in_(chunk)))
                conn.execute(delete(Image).where(Image.id.in_(chunk)))
            unstaged = int(conn.scalar(select(func.count()).select_from(Image).where(
                ~exists().where(PendingEmbedding.image_id == Image.id))))
            if unstaged:
                raise StoreError(f"{unstaged} row(s) of {self.where} have no staged vector; nothing was switched")
            conn.execute(delete(Embedding))
            conn.execute(insert(Embedding).from_select(["image_id", "vector"],
                                                       select(PendingEmbedding.image_id, PendingEmbedding.vector)))
            switched = int(conn.scalar(select(func.count()).select_from(Embedding)))
            conn.execute(delete(PendingEmbedding))
            for key, value in meta.items():
                self._set_meta(conn, key, value)
            put_files(conn, files or {})
            conn.execute(delete(Meta).where(Meta.key == _PENDING_KEY))
            epoch = conn.scalar(select(Meta.value).where(Meta.key == _EPOCH_KEY))
            self._set_meta(conn, _EPOCH_KEY, (json.loads(epoch) if epoch else 0) + 1)
            self._bump(conn)
        return switched
