"""The commit step of a Ray ingest: the shards the actors wrote are imported by ``engine import``'s
loop (each shard validated whole, then committed in transactions), with ingest's own rules for
each row instead of the import's: ``ingest.changes.Reconciler`` decides, as for a decoded batch of
plain ingest, whether a file is new content, a byte-identical copy (an alias), a renamed photo (a
move) or a changed file (its old row replaced). So a Ray ingest leaves the same rows as plain
ingest."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from engine.shards import ShardError
from ingest.importer import CommitFn, unit_rows

if TYPE_CHECKING:
    from engine.library import Library
    from engine.loader import Decoded
    from engine.shards import Shard
    from ingest.changes import Reconciler
    from ingest.importer import ImportStages

REQUIRED = ("content_hash", "bytes", "mtime")  # what the Reconciler needs of every file


def decoded_items(shard: Shard, start: int, stop: int) -> list[Decoded]:
    """Rows [start, stop) of a shard the actors wrote, as the decoded items ingest commits (no
    tensors: the vectors are the shard's)."""
    from engine.loader import Decoded
    from engine.preprocess import ImageInfo

    cols: dict[str, Any] = shard.columns
    missing = [c for c in REQUIRED if c not in cols]
    if missing:
        raise ShardError(f"shard {shard.name} lacks {', '.join(missing)}: not written by a Ray ingest")
    width, height, fmt = cols.get("width"), cols.get("height"), cols.get("format")
    taken, camera = cols.get("taken_at"), cols.get("camera")
    items = []
    for i in range(start, stop):
        info = ImageInfo(width[i] if width else None, height[i] if height else None, fmt[i] if fmt else None,
                         taken[i] if taken else None, camera[i] if camera else None)
        items.append(Decoded(i - start, cols["path"][i], None, info, cols["content_hash"][i], cols["bytes"][i],
                             cols["mtime"][i]))
    return items


def ingest_committer(library: Library, reconciler: Reconciler, stages: ImportStages) -> CommitFn:
    """A commit function for ``ingest.importer.import_shards`` that applies ingest's rules (see the
    module): (rows added, rows that were copies, moves, changes or unchanged)."""
    store = library.store

    def commit(shard: Shard, start: int, stop: int) -> tuple[int, int]:
        with stages.timing("lookup"):
            changes, embed = reconciler.resolve(decoded_items(shard, start, stop))
        if not changes:
            return 0, stop - start
        with stages.timing("commit"):
            if embed:
                changes.vectors = unit_rows(shard.vectors[start:stop][np.asarray(embed)])
            applied = store.apply_changes(changes)
            reconciler.committed(applied)
        return len(applied.new_ids), (stop - start) - len(applied.new_ids)

    return commit
