"""The files of a library home read as untrusted input: which record in ``index.json`` describes
the index file on disk, setting damaged files aside, telling a read-only home, and the part of
``engine.library.Library`` built on these (``LibraryFiles``: reading the index file checked, the
database's damage and what to do about it).

The index state file (``index.json``) records, for the last save, what the index reflects
(database generation, ...) and which file that is (size, mtime, checksum); a save writes it
*before* its new index file replaces the old one and keeps the old file's record as
``previous``, so a crash between the two leaves a state that still describes the file on disk.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from db.store import DatabaseDamagedError, MetadataStore, StoreError
from engine.config import AUTO_INDEX
from engine.errors import EngineError, ReadOnlyError
from engine.index import IndexFileError, IndexFileInfo, SearchSettings, VectorIndex, file_identity

if TYPE_CHECKING:
    from engine.config import IndexConfig, LibraryPaths
    from engine.model_switch import ModelInfo

log = logging.getLogger(__name__)

READ_ONLY_ENV = "ENGINE_READ_ONLY"  # set (not "0"): open every library read-only (the CLI's --read-only)


def state_entry(state: dict[str, Any], index_path: str | os.PathLike) -> dict[str, Any]:
    """The record of ``state`` (the parsed ``index.json``) that describes the index file now at
    ``index_path``: the last save's, or the one before when the file is still that one (matched by
    size and mtime, which an atomic save keeps). ``{}`` when neither does, so nothing recorded is
    trusted of that file. A state written before files were recorded is returned as it is."""
    if not isinstance(state, dict):
        return {}
    if "file" not in state:
        return state
    on_disk = file_identity(index_path)
    previous = state.get("previous")
    # the older record first: should both match (a clock too coarse to tell two saves apart),
    # claiming less (an older generation) only makes the next open do more
    for entry in (previous, state):
        if isinstance(entry, dict) and isinstance(entry.get("file"), dict):
            recorded = entry["file"]
            if on_disk is not None and on_disk == (recorded.get("bytes"), recorded.get("mtime_ns")):
                return {k: v for k, v in entry.items() if k != "previous"}
    return {}


def entry_with_checksum(state: dict[str, Any], checksum: str) -> dict[str, Any]:
    """The record of ``state`` (last save or the one before) whose file had ``checksum``; ``{}``."""
    if not isinstance(state, dict):
        return {}
    for entry in (state, state.get("previous")):
        if isinstance(entry, dict) and isinstance(entry.get("file"), dict) and entry["file"].get("checksum") == checksum:
            return {k: v for k, v in entry.items() if k != "previous"}
    return {}


def recorded_checksums(state: dict[str, Any]) -> list[str]:
    """Checksums of the index files ``state`` records (the last save's and the one before)."""
    if not isinstance(state, dict):
        return []
    found = []
    for entry in (state, state.get("previous")):
        if isinstance(entry, dict) and isinstance(entry.get("file"), dict):
            checksum = entry["file"].get("checksum")
            if isinstance(checksum, str):
                found.append(checksum)
    return found


def _aside_name(path: Path, tag: str, stamp: str, n: int) -> Path:
    return path.with_name(f"{path.name}.{tag}-{stamp}" + (f"-{n}" if n > 1 else ""))


def set_aside(path: str | os.PathLike, tag: str = "damaged", companions: tuple[str, ...] = ()) -> list[Path]:
    """Rename ``path`` to ``NAME.TAG-YYYYmmdd-HHMMSS`` beside it (never overwriting anything), and
    each existing ``NAME + suffix`` of ``companions`` to the new name + suffix, so files that
    belong together stay together (``library.db`` with ``-wal`` and ``-shm``: SQLite finds the
    journal of ``library.db.damaged-...`` at ``library.db.damaged-...-wal``). Returns the new paths,
    the main file first."""
    path = Path(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    n = 1
    while any(Path(f"{_aside_name(path, tag, stamp, n)}{suffix}").exists() for suffix in ("", *companions)):
        n += 1
    target = _aside_name(path, tag, stamp, n)
    moved = []
    for suffix in ("", *companions):
        source = Path(f"{path}{suffix}")
        if source.exists():
            os.replace(source, f"{target}{suffix}")
            moved.append(Path(f"{target}{suffix}"))
    return moved


def read_only_reason(home: Path, database: Path | None, explicit: bool | None) -> str | None:
    """Why a library must be opened read-only, or None. explicit: True/False decides; None looks
    at ``$ENGINE_READ_ONLY`` and then at the files (a home folder, or a database file, that this
    process may not write). A home that does not exist yet is writable (it is created)."""
    if explicit:
        return "opened read-only"
    if explicit is None:
        if os.environ.get(READ_ONLY_ENV, "") not in ("", "0"):
            return f"${READ_ONLY_ENV} is set"
        if home.is_dir() and not os.access(home, os.W_OK):
            return "its folder is not writable"
        if database is not None and database.exists() and not os.access(database, os.W_OK):
            return "its database file is not writable"
    return None


def database_advice(database: Path | None) -> str:
    """What to do about a damaged database, naming the journal files that belong with it."""
    if database is None:
        return ("it is left untouched: restore it from a backup "
                "(`engine doctor` checks the whole library)")
    return (f"it is left untouched: `engine doctor --repair` moves it aside together with {database.name}-wal and "
            f"{database.name}-shm (which may hold its latest committed rows) and rebuilds what can be read, or "
            "restore a backup of all three files together (`engine doctor` checks the whole library)")


def _damage_reason(exc: Exception) -> str:
    """SQLite's words from a "database file X is damaged (WORDS)" message."""
    text = str(exc)
    start = text.find(" is damaged (")
    return text[start + len(" is damaged ("):].rstrip(")") if start >= 0 and text.endswith(")") else text


class LibraryFiles:
    """The methods of ``engine.library.Library`` that read its files as untrusted: the index file
    against the record of it, the database's damage, read-only homes. (Library provides the
    attributes named below.)"""

    paths: LibraryPaths
    database_url: str | None
    read_only_reason: str | None
    _store: MetadataStore | None

    if TYPE_CHECKING:
        @property
        def store(self) -> MetadataStore: ...

        def model_info(self) -> ModelInfo | None: ...

        def index_config(self) -> IndexConfig: ...

    def database_damage(self) -> list[str]:
        """SQLite's page check of the database (``PRAGMA quick_check``), read through a read-only
        connection: a damaged file and its journal are left exactly as found (a writable
        connection's close would fold the ``-wal`` into the damaged file). An empty list when sound;
        reads the whole file, so it is for ``engine doctor``."""
        db = self.paths.database
        journal_alone = Path(f"{db}-wal").exists() and not Path(f"{db}-shm").exists()  # needs a -shm made
        if self.database_url is not None or self._store is not None or (journal_alone and not self.read_only):
            return self.store.integrity_errors()
        try:
            probe = MetadataStore(f"sqlite:///{db}", read_only=True)
        except StoreError as exc:  # damaged at open; or no tables yet, which is no damage
            return [_damage_reason(exc)] if isinstance(exc, DatabaseDamagedError) else []
        try:
            return probe.integrity_errors()
        except StoreError as exc:
            return [_damage_reason(exc)]
        finally:
            probe.close()

    def database_advice(self) -> str:
        """What to do about a damaged database, naming the journal files that belong with it."""
        return database_advice(None if self.database_url else self.paths.database)

    @property
    def read_only(self) -> bool:
        """True when the library is opened for searching only (see ``read_only_reason``)."""
        return self.read_only_reason is not None

    def require_writable(self) -> None:
        """Raise ReadOnlyError when the library is opened read-only."""
        if self.read_only_reason is not None:
            raise ReadOnlyError(f"the library in {self.paths.home} is read-only ({self.read_only_reason}): it can be "
                                "searched, but not changed; copy it to a writable folder to change it")

    def _raw_state(self) -> dict[str, Any]:
        try:
            state = json.loads(self.paths.index_state.read_text())
        except (OSError, ValueError):
            return {}
        return state if isinstance(state, dict) else {}

    def _read_state(self) -> dict[str, Any]:
        """What the state file records of the index file now on disk ({} when it describes another
        file: nothing is then trusted of this one; see ``engine.home_files.state_entry``)."""
        return state_entry(self._raw_state(), self.paths.index)

    def index_is_current(self, index: VectorIndex) -> bool:
        """True when the state file beside the index records the database's current generation and
        ``index``'s size: the index file was saved after the last database write. For an index read
        from its file, the record of that file (by checksum) is the one compared."""
        source: IndexFileInfo | None = getattr(index, "source", None)
        state = entry_with_checksum(self._raw_state(), source.checksum) if source is not None else self._read_state()
        return state.get("generation") == self.store.generation() and state.get("ntotal") == index.ntotal

    def read_index(self) -> VectorIndex:
        """The index file as it is on disk, checked, not reconciled: its checksum must be one the
        state file recorded when it was saved, and it must be an inner-product index holding row ids
        (``engine.index``), of the library's dimension and recorded type. Raises IndexFileError (a CorruptFileError) with the
        reason otherwise (a missing file included). A file replaced by a save while it was read is
        read again. The search settings recorded with the file (``engine.index_tuning``) are applied,
        and what it was built for is set (``built_rows``)."""
        factory = self._read_state().get("factory") or self.index_config().factory  # what the file was built as
        if not isinstance(factory, str) or factory == AUTO_INDEX:
            factory = None  # nothing recorded: the type is read from the file itself
        info = self.model_info()
        for attempt in range(3):
            before = file_identity(self.paths.index)
            try:
                index = VectorIndex.load(self.paths.index, factory, dim=info.dim if info is not None else None,
                                         checksums=lambda: recorded_checksums(self._raw_state()),
                                         check_type=factory is not None)
            except IndexFileError as exc:
                if attempt == 2 or exc.identity is None or file_identity(self.paths.index) in (before, exc.identity):
                    raise
            else:
                self._restore_settings(index)
                return index
        raise AssertionError("unreachable")

    def _restore_settings(self, index: VectorIndex) -> None:
        """Apply to ``index`` (just read) the search settings and the built-for row count recorded
        with its file; settings that do not fit it (a hand-edited state) are ignored, with a note."""
        entry = entry_with_checksum(self._raw_state(), index.source.checksum) if index.source is not None else {}
        built = entry.get("built_rows")
        if isinstance(built, int) and built >= 0:
            index.built_rows = built
        settings = SearchSettings.from_dict(entry.get("search"))
        if settings is not None:
            try:
                index.apply(settings)
            except EngineError as exc:
                log.info("search settings recorded for the index not applied: %s", exc)

    def set_aside_index(self) -> Path | None:
        """Rename the index file to ``index.faiss.damaged-<time>`` (kept for inspection, never read
        again) and forget its state; returns the new path, None when there was no file."""
        self.require_writable()
        moved = set_aside(self.paths.index)
        self.paths.index_state.unlink(missing_ok=True)
        return moved[0] if moved else None
