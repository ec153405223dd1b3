"""``engine ingest ROOT --prune``: forget indexed files under ROOT that are gone from disk, and
never anything that merely could not be seen.

Nothing is forgotten under a root that could not be walked (missing, a broken link, unreadable)
or that holds no image file at all, nor under a subfolder that could not be listed, nor in a
folder where every indexed file is missing at once (``ingest.presence.
split_missing``, the rule ``engine doctor --repair`` applies too: an unmounted drive, or a renamed
mount point, looks exactly like that). A file counts as gone only when the system says it does not
exist. Each refusal is reported with the number of indexed paths it kept.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Sequence

from ingest.presence import GONE, UNMOUNTED, probe, split_missing

if TYPE_CHECKING:
    from engine.files import Discovery
    from engine.index import VectorIndex
    from engine.library import Library
    from ingest.pipeline import IngestReport


def under(path: str, roots: Sequence[str]) -> bool:
    """True when ``path`` is one of ``roots`` (absolute) or inside one of them."""
    return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def unwalked_roots(roots: Sequence[str], found: Discovery) -> dict[str, str]:
    """root -> why it could not be walked at all, for the roots (absolute) that could not be."""
    failed = dict(found.missing)
    return {root: failed[root] for root in roots if root in failed}


def prune_roots(library: Library, roots: Sequence[str], found: Discovery, report: IngestReport) -> list[int]:
    """Forget the indexed paths under ``roots`` (absolute) that are gone, within the rules above;
    counts them in ``report.removed`` and each refusal in ``report.prune_kept`` as (folder, reason,
    indexed paths kept). Returns the ids whose vectors must leave the index."""
    store = library.store
    present = set(found.files)
    unwalked = unwalked_roots(roots, found)
    unlisted = [path for path, _ in found.missing if path not in unwalked]  # subfolders that could not be listed
    forget: dict[str, None] = {}
    for root in dict.fromkeys(roots):
        indexed = store.paths_under([root])
        if not indexed:
            continue
        if root in unwalked:
            report.prune_kept.append((root, f"could not be walked ({unwalked[root]})", len(indexed)))
            continue
        if not any(under(p, [root]) for p in present):
            report.prune_kept.append((root, "holds no image file (an unmounted drive or an emptied folder?)",
                                      len(indexed)))
            continue
        hidden = [p for p in indexed if under(p, unlisted)]
        for folder in unlisted:
            kept = sum(under(p, [folder]) for p in hidden)
            if kept and under(folder, [root]):
                report.prune_kept.append((folder, "could not be listed", kept))
        missing = [p for p in indexed if p not in present and not under(p, unlisted) and probe(p)[0] == GONE]
        gone, kept = split_missing(missing, indexed)
        report.prune_kept += [(folder, UNMOUNTED, n) for folder, n in kept.items()]
        forget.update(dict.fromkeys(gone))
    if not forget:
        return []
    report.removed += len(forget)
    return store.remove_paths(list(forget))
