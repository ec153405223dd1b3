"""Homes that share one library database (PostgreSQL through ``--database-url``).

Each home keeps its own index, built from the shared stored vectors and caught up by generation
when it opens (``engine.library``), and its own copy of the library's encoder file. The database
keeps that file too (``db.shared_files``), put there by the home that set or switched the encoder,
so a second home (another machine) gets the encoder from the database: on first use, and again
whenever the database's copy differs from the home's (another home re-embedded the library with
``engine reindex --model``). A library whose database is its home's own SQLite file keeps nothing
extra.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from engine.atomic import write_atomic

if TYPE_CHECKING:
    from engine.library import Library

log = logging.getLogger(__name__)

ENCODER_FILE = "encoder.pt"  # its name in the database (db.shared_files)


def shares_database(library: Library) -> bool:
    """True when the library's database lives outside its home (other homes may use it)."""
    return library.database_url is not None


def encoder_files(library: Library, path: Path) -> dict[str, bytes]:
    """What the database should keep once the encoder file at ``path`` is the library's: for
    ``db.staging.switch_to_pending``'s ``files``. Empty when the database is the home's own."""
    return {ENCODER_FILE: Path(path).read_bytes()} if shares_database(library) else {}


def publish_encoder(library: Library) -> None:
    """Keep the home's encoder file in a shared database (after the library's encoder was set)."""
    if shares_database(library) and not library.read_only:
        library.store.put_library_file(ENCODER_FILE, library.paths.encoder.read_bytes())


def sync_encoder(library: Library) -> bool:
    """Give the home the database's copy of the encoder file when it lacks the file or holds
    another one (written atomically; the identity check of ``Library.encoder`` follows); keep
    the home's file in the database when the database has none yet (a library shared before
    databases kept it). True when the home's file was written. Nothing happens for a home's own
    database or a read-only home."""
    if not shares_database(library) or library.read_only:
        return False
    digest = library.store.library_file_digest(ENCODER_FILE)
    if digest is None:
        if library.paths.encoder.exists():
            publish_encoder(library)
        return False
    from engine.scripted import file_sha256

    if library.paths.encoder.exists() and file_sha256(library.paths.encoder) == digest:
        return False
    content = library.store.library_file(ENCODER_FILE)
    if content is None:
        return False
    library.paths.home.mkdir(parents=True, exist_ok=True)
    write_atomic(library.paths.encoder, content)
    log.info("encoder file %s fetched from the library's database", library.paths.encoder)
    return True
