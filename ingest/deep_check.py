"""``engine doctor --deep``: re-read and hash every indexed file (aliases too), to find content
that changed behind an unchanged size and mtime, the one change the fast path (ingest, plain
doctor) cannot see because it trusts size and mtime; ``--repair`` re-embeds those files.

The known paths are streamed from the database in slices and each file is hashed in pieces, so
memory stays bounded whatever the size of the library; the cost is reading every byte once.
Files that are missing, unreadable or whose size or mtime changed are left to the fast check,
which reports them already.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from engine.errors import EngineError
from engine.loader import hash_file
from ingest.doctor import PROBLEM, Finding
from ingest.pipeline import IngestConfig, ingest_paths

if TYPE_CHECKING:
    from engine.library import Library

_EXAMPLES = 3


@dataclass
class DeepResult:
    """hashed: files read and hashed; changed: canonical paths whose bytes are not the content
    their row was embedded from; changed_aliases: aliases whose bytes are no longer their row's;
    seconds: wall time of the check."""

    hashed: int = 0
    changed: list[str] = field(default_factory=list)
    changed_aliases: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def paths(self) -> list[str]:
        return self.changed + self.changed_aliases


def deep_check(library: Library, *, skip: set[str] = frozenset(), chunk: int = 500,
               progress: Callable[[int], None] | None = None) -> DeepResult:
    """Hash every indexed file whose size and mtime still match the database (``skip``: paths
    the fast check already reported) and compare with the stored content hash. progress(hashed)
    is called after each slice of ``chunk`` known paths."""
    started = time.perf_counter()
    result = DeepResult()
    for files in library.store.iter_files(chunk):
        for known in files:
            if known.path in skip:
                continue
            try:
                st = os.stat(known.path)
                if not stat.S_ISREG(st.st_mode) or (st.st_size, st.st_mtime) != (known.bytes, known.mtime):
                    continue  # the fast check sees (and reports) this one
                digest = hash_file(known.path)
            except OSError:
                continue  # missing or unreadable: reported by the fast check
            result.hashed += 1
            if digest != known.content_hash:
                (result.changed_aliases if known.is_alias else result.changed).append(known.path)
        if progress:
            progress(result.hashed)
    result.seconds = time.perf_counter() - started
    return result


def deep_findings(result: DeepResult, facts: dict[str, Any]) -> list[Finding]:
    """The findings of a deep check (and ``facts["hashed"]``, the files it read)."""
    facts["hashed"] = result.hashed
    if not result.paths:
        return []
    n = len(result.paths)
    what = f"{n} indexed file{'s' if n != 1 else ''}"
    return [Finding("content-changed", f"{what} whose bytes changed behind an unchanged size and mtime (the fast "
                    "path cannot see this; queries return vectors of the old content); repair re-embeds them",
                    severity=PROBLEM, count=n, examples=result.paths[:_EXAMPLES])]


def deep_repair(library: Library, result: DeepResult, config: IngestConfig | None = None) -> list[str]:
    """Re-embed the files of ``result``: their recorded size and mtime are forgotten, so an ingest
    of them hashes their bytes and treats them as changed (a new row and vector for new content,
    an alias for bytes indexed elsewhere). Returns what was done, as doctor's actions."""
    paths = result.paths
    if not paths:
        return []
    config = config or IngestConfig(batch_size=16, workers=0)
    library.store.mark_unverified(paths)
    try:
        done = ingest_paths(library, paths, config)
    except EngineError as exc:
        return [f"could not re-embed {len(paths)} file(s) whose bytes changed behind an unchanged size and mtime: {exc}"]
    return [f"re-read {len(paths)} file(s) whose bytes changed behind an unchanged size and mtime: "
            f"{done.updated} updated ({done.embedded} re-embedded, the others matched bytes indexed elsewhere), "
            f"{len(done.failed)} failed"]
