"""What the files an ingest found do to the library, so that any mix of renames, copies, edits and
deletions since the last run converges to: every file indexed exactly once, byte-identical files as
aliases of one row, and every row at a path that holds its bytes.

Terms. A row is *live* when its path holds its content; *homeless* when its content is known not
to be there any more (the file is gone, or holds other bytes). A file whose bytes equal a live row
becomes an alias of it; a file whose bytes equal a homeless row *claims* it: the row moves there,
keeping its id and vector (a rename is a move, never an alias of a dead path). A homeless row that
no file claims is handed to one of its aliases that still holds the bytes (a move too); failing
that it is forgotten when its path gets new content, and kept (until ``--prune``) when its file is
gone.

Moves are found before anything is decoded: every file the size and mtime say may have changed
and every new file of the same size as a homeless row is hashed first (a move needs identical
bytes, so other sizes cannot claim one), and the first transaction of the run applies all the
moves, aliases and touches that need no model. The decode batches then only meet new content.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Iterable, Sequence

from db.changes import ChangeSet, Move, StoredFile
from engine.loader import hash_file
from ingest.presence import GONE, PRESENT, probe

if TYPE_CHECKING:
    from db.changes import Applied
    from db.store import MetadataStore
    from engine.loader import Decoded
    from ingest.pipeline import IngestReport

LIVE, HOMELESS, UNKNOWN = "live", "homeless", "unknown"
Stat = tuple[int, float]  # (size in bytes, mtime)


def _hash_or_none(path: str) -> str | None:
    try:
        return hash_file(path)
    except OSError:
        return None


class Reconciler:
    """One ingest run's knowledge of which indexed content is where; it decides each change and
    counts it in ``report`` (added, moved, updated, duplicates, unchanged). Not thread-safe."""

    def __init__(self, store: MetadataStore, report: IngestReport, hash_workers: int = 4):
        self.store = store
        self.report = report
        self.hash_workers = max(1, hash_workers)
        self.seen: dict[str, Stat] = {}  # files of this walk -> (size, mtime)
        self.verified: set[str] = set()  # paths known to hold what the library now records for them
        self.homeless: dict[int, StoredFile] = {}
        self.moved: dict[int, str] = {}  # rows moved this run -> their new path
        self.checked: dict[int, str] = {}  # state of rows outside the walk, checked once
        self.hashes: dict[str, str] = {}  # files hashed before decoding -> content hash

    # -- the first transaction: everything that needs no model ---------------------------------
    def plan(self, files: Sequence[str], seen: dict[str, Stat], known: dict[str, StoredFile],
             gone: Iterable[StoredFile]) -> tuple[ChangeSet, list[str]]:
        """files: the regular files found (walk order) with their ``seen`` (size, mtime);
        known: what the library records for those of them it knows; gone: the recorded paths under
        the walked roots whose file no longer exists. Returns the first transaction and the files
        left to decode (walk order)."""
        report = self.report
        self.seen.update(seen)
        new: list[str] = []
        changed: list[str] = []
        for path in files:
            state = known.get(path)
            if state is None:
                new.append(path)
            elif (state.bytes, state.mtime) == seen[path]:
                self.verified.add(path)
                report.unchanged += 1
            else:
                changed.append(path)
        for state in gone:
            if not state.is_alias:
                self.homeless[state.image_id] = state
        # Same size, other mtime: maybe only touched. Hash it now (no decode needed if so).
        self._prehash([p for p in changed if seen[p][0] == known[p].bytes])
        changes = ChangeSet()
        for path in changed:
            state = known[path]
            if self.hashes.get(path) == state.content_hash:
                changes.touched.append((state.is_alias, path, *seen[path]))
                self.verified.add(path)
                report.unchanged += 1
            elif (path in self.hashes or seen[path][0] != state.bytes) and not state.is_alias:
                self.homeless[state.image_id] = state  # its bytes are no longer at its path
        sizes = {row.bytes for row in self.homeless.values()}
        self._prehash([p for p in new + changed if p not in self.hashes and seen[p][0] in sizes])
        claimants = [p for p in files if p in self.hashes and p not in self.verified]
        rows = self.store.rows_by_hash(self.hashes[p] for p in claimants)
        resolved: set[str] = set()
        for path in claimants:
            state = known.get(path)
            if self._place(path, self.hashes[path], seen[path], state is not None, rows, changes):
                resolved.add(path)
                if state is not None:
                    changes.forget.append(path)
        self._hand_over(list(self.homeless.values()), changes)
        todo = [p for p in files if p not in self.verified and p not in resolved]
        return changes, todo

    # -- a decoded batch -----------------------------------------------------------------------
    def resolve(self, items: Sequence[Decoded]) -> tuple[ChangeSet, list[int]]:
        """The transaction for a decoded batch (each item with content_hash, size and mtime) and
        the positions in ``items`` whose images must be embedded for its ``new_rows`` (same order)."""
        report = self.report
        changes = ChangeSet()
        embed: list[int] = []
        states = self.store.lookup_paths([it.path for it in items])  # fresh: earlier commits moved rows
        pending: list[tuple[int, Decoded, bool]] = []
        for n, it in enumerate(items):
            self.seen[it.path] = (it.size, it.mtime)
            state = states.get(it.path)
            if state is not None and state.content_hash == it.content_hash:
                changes.touched.append((state.is_alias, it.path, it.size, it.mtime))
                self.verified.add(it.path)
                report.unchanged += 1
                continue
            if state is not None:
                changes.forget.append(it.path)
                if not state.is_alias:
                    self.homeless[state.image_id] = StoredFile(it.path, state.image_id, False, state.bytes,
                                                               state.mtime, state.content_hash)
            pending.append((n, it, state is not None))
        rows = self.store.rows_by_hash({it.content_hash for _, it, _ in pending})
        fresh: dict[str, int] = {}  # content hash -> its position in changes.new_rows
        for n, it, was_known in pending:
            content = it.content_hash
            if content in fresh:
                changes.aliases.append({"path": it.path, "bytes": it.size, "mtime": it.mtime, "new_row": fresh[content]})
                self._count(was_known, "duplicates")
            elif not self._place(it.path, content, (it.size, it.mtime), was_known, rows, changes):
                fresh[content] = len(changes.new_rows)
                info = it.info
                changes.new_rows.append({"path": it.path, "content_hash": content, "bytes": it.size, "mtime": it.mtime,
                                         "width": info.width, "height": info.height, "format": info.format,
                                         "taken_at": info.taken_at,
                                         "camera": info.camera[:128] if info.camera else None})
                embed.append(n)
                self._count(was_known, "added")
            self.verified.add(it.path)
        forgotten = set(changes.forget)
        self._hand_over([r for r in self.homeless.values() if r.path in forgotten], changes)
        return changes, embed

    def committed(self, applied: Applied) -> None:
        """Take note of a committed transaction: deleted rows are gone for good; alias paths that
        could not be recorded (their row vanished meanwhile) are reported and left to the next run."""
        for image_id in applied.dropped_ids:
            self.homeless.pop(image_id, None)
            self.checked.pop(image_id, None)
        for path in applied.orphaned:
            self.verified.discard(path)
            self.report.failed.append((path, "the indexed copy it duplicates vanished during this run; "
                                             "the next ingest indexes it"))

    # -- decisions -----------------------------------------------------------------------------
    def _place(self, path: str, content: str, stat: Stat, was_known: bool, rows: dict[str, list[StoredFile]],
               changes: ChangeSet) -> bool:
        """Record ``path`` (holding ``content``) without the model when the library already has
        that content: as an alias of a live row, or as the new home of a homeless row. False when
        the content is new."""
        candidates = rows.get(content, [])
        states = [(row, self._state_of(row)) for row in candidates]
        live = next((row for row, s in states if s == LIVE), None)
        if live is None:
            homeless = next((row for row, s in states if s == HOMELESS), None)
            if homeless is not None:
                changes.moves.append(Move(homeless.image_id, path, *stat))
                self._moved(homeless.image_id, path)
                self._count(was_known, "moved")
                return True
            live = next((row for row, s in states if s == UNKNOWN), None)  # cannot be checked: trust it
        if live is None:
            return False
        changes.aliases.append({"path": path, "bytes": stat[0], "mtime": stat[1], "image_id": live.image_id})
        self._count(was_known, "duplicates")
        return True

    def _hand_over(self, rows: list[StoredFile], changes: ChangeSet) -> None:
        """Move each homeless row of ``rows`` that nothing claimed to the first of its aliases
        that still holds its bytes."""
        rows = [r for r in rows if r.image_id in self.homeless]
        if not rows:
            return
        taken = set(changes.forget) | {a["path"] for a in changes.aliases} | {m.path for m in changes.moves}
        aliases = self.store.aliases_by_image(r.image_id for r in rows)
        for row in rows:
            for alias in aliases.get(row.image_id, []):
                stat = None if alias.path in taken else self._alias_holds(alias)
                if stat is not None:
                    changes.moves.append(Move(row.image_id, alias.path, *stat))
                    taken.add(alias.path)
                    self._moved(row.image_id, alias.path)
                    self.report.moved += 1
                    break

    def _state_of(self, row: StoredFile) -> str:
        """LIVE, HOMELESS or UNKNOWN (cannot be checked) for an image row."""
        image_id = row.image_id
        if image_id in self.homeless:
            return HOMELESS
        if image_id in self.moved or row.path in self.verified:
            return LIVE
        if row.path in self.seen:  # walked, but its bytes could not be read
            return UNKNOWN
        if image_id not in self.checked:  # outside the walk (another folder, excluded, hidden)
            self.checked[image_id] = self._check(row.path, row.bytes, row.mtime, row.content_hash)
            if self.checked[image_id] == HOMELESS:
                self.homeless[image_id] = row
        return self.checked[image_id]

    def _alias_holds(self, alias: StoredFile) -> Stat | None:
        """The (size, mtime) of an alias's file when it holds its row's bytes, else None."""
        if alias.path in self.seen:  # walked: verified, or seen with another size or mtime (other bytes)
            return self.seen[alias.path] if alias.path in self.verified else None
        if self._check(alias.path, alias.bytes, alias.mtime, alias.content_hash) != LIVE:
            return None
        st = os.stat(alias.path)
        return st.st_size, st.st_mtime

    @staticmethod
    def _check(path: str, size: int, mtime: float, content: str) -> str:
        """Whether a file outside the walk holds ``content``: trusted when size and mtime match
        (as the walk trusts them), hashed when they do not."""
        found, st = probe(path)
        if found == GONE:
            return HOMELESS
        if found != PRESENT:
            return UNKNOWN
        if (st.st_size, st.st_mtime) == (size, mtime):
            return LIVE
        digest = _hash_or_none(path)
        return UNKNOWN if digest is None else LIVE if digest == content else HOMELESS

    def _moved(self, image_id: int, path: str) -> None:
        self.homeless.pop(image_id, None)
        self.moved[image_id] = path
        self.verified.add(path)

    def _count(self, was_known: bool, kind: str) -> None:
        """A new path counts as ``kind`` (added, moved, duplicates); a known path whose content
        changed counts as updated, whatever became of it."""
        name = "updated" if was_known else kind
        setattr(self.report, name, getattr(self.report, name) + 1)

    def _prehash(self, paths: list[str]) -> None:
        """Hash these files now (threads: reading and hashing release the GIL); unreadable ones
        are left to the decoder, which reports them."""
        if not paths:
            return
        if len(paths) == 1:
            found = [(paths[0], _hash_or_none(paths[0]))]
        else:
            with ThreadPoolExecutor(min(self.hash_workers, len(paths))) as pool:
                found = list(zip(paths, pool.map(_hash_or_none, paths)))
        self.hashes.update((p, h) for p, h in found if h is not None)
