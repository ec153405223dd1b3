"""The project's exceptions. Library code raises these; only the CLI turns them into messages.

Every message is one line that a person can act on.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine reports to a user."""


class ImageError(EngineError):
    """An image file cannot be opened or decoded (missing, unreadable, truncated, not an image)."""


class ModelError(EngineError):
    """An encoder cannot be built or a checkpoint cannot be read."""


class ModelMismatchError(EngineError):
    """A query or ingest uses a different encoder from the one the library was built with."""


class IndexMissingError(EngineError):
    """The library has no index yet: nothing was ingested."""


class CorruptFileError(EngineError):
    """A database or index file exists but cannot be read."""


class DataError(EngineError):
    """Training or evaluation data is malformed (bad labels, missing files, too few images)."""


class LockError(EngineError):
    """Another process holds the library's write lock."""


class ReadOnlyError(LockError):
    """A command that changes a library was run on one opened read-only (a read-only folder or
    medium, ``--read-only`` or ``$ENGINE_READ_ONLY``): its write lock is never granted, so code
    that takes the lock only when it can (``wait=False``) passes over it as over a busy one."""
