"""``engine doctor --repair`` on a damaged database: keep the damaged files, rebuild what is readable.

The damaged ``library.db`` is renamed together with its ``-wal`` and ``-shm`` files (the ``-wal``
may hold the latest committed rows: after a crash they are nowhere else), so the kept copy stays
a database SQLite can open with its journal. A new database is then built from what a copy of
those files still gives (``db.salvage``); the index, derived from the damaged database, is
dropped and rebuilt from the recovered one. Nothing is ever written to the damaged files.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from db.salvage import SalvageResult, salvage_database
from engine.home_files import set_aside

if TYPE_CHECKING:
    from engine.library import Library

JOURNALS = ("-wal", "-shm")


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _summary(result: SalvageResult) -> str:
    rows = result.rows
    text = (f"{_n(rows.get('images', 0), 'image')}, {_n(rows.get('embeddings', 0), 'stored vector')} and "
            f"{_n(rows.get('aliases', 0), 'alias')}")
    if result.header_restored:
        text += "; its damaged file header was rewritten"
    lost = sum(result.unreadable.values())
    if lost:
        where = ", ".join(f"{table} {count}" for table, count in sorted(result.unreadable.items()))
        text += f"; {_n(lost, 'unreadable row or run')} of rows stepped over ({where})"
    if result.dropped:
        text += f"; {_n(result.dropped, 'row')} left out whose image was lost"
    return text


def repair_database(library: Library, actions: list[str]) -> bool:
    """Set the damaged SQLite database of ``library`` (its own file, not a ``database_url``) aside
    with its journal files and rebuild one from what is readable (the caller holds the write
    lock). Appends what was done to ``actions``; returns True when a database was rebuilt."""
    paths = library.paths
    library.close()
    library.forget_encoder()
    moved = set_aside(paths.database, "damaged", companions=JOURNALS)
    actions.append(f"moved the damaged database aside, its journal files with it: {', '.join(p.name for p in moved)} "
                   "(kept as they were)")
    for derived in (paths.index, paths.index_state):  # they describe the damaged database, not the rebuilt one
        derived.unlink(missing_ok=True)
    wal = Path(f"{moved[0]}-wal")
    result = salvage_database(moved[0], paths.database, wal=wal if wal.exists() else None)
    if not result.ok:
        actions.append(f"nothing could be read back from it ({result.error}); restore a backup of "
                       f"{paths.database.name} with its -wal and -shm files, or run `engine ingest PATH --model MODEL` "
                       "again")
        return False
    actions.append(f"rebuilt {paths.database} from what was readable: {_summary(result)}")
    if library.model_info() is not None:
        index = library.rebuild_index()
        actions.append(f"rebuilt the index from {_n(index.ntotal, 'stored embedding')}")
    else:
        actions.append("the library's model record could not be read back; `engine ingest PATH --model MODEL` with "
                       "the model it was built with records it again")
    return True
