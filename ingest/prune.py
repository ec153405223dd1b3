"""``engine ingest ROOT --prune``: forget indexed files under ROOT that are gone from disk, and
never anything that merely could not be seen.

Nothing is forgotten under a root that could not be walked (missing, a broken link, unreadable)
or that holds no image file at all, nor under a subfolder that could not be listed, nor in a
folder where every indexed file is missing at once (``ingest.presence.
split_missing``, the rule ``engine doctor --repair`` applies too: an unmounted drive, or a renamed
mount point, looks exactly like that). A file counts as gone only when the system says it does not
exist. Each refusal is reported with the number of indexed paths it kept.

The indexed paths under a root are streamed from the database in slices and counted there, never
loaded whole: pruning a folder of a million photos holds only the ones found missing.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Sequence

from ingest.presence import GONE, UNMOUNTED, IndexedCounts, probe, split_missing

if TYPE_CHECKING:
    from engine.files import Discovery
    from engine.library import Library
    from ingest.pipeline import IngestReport


def under(path: str, roots: Sequence[str]) -> bool:
    """True when ``path`` is one of ``roots`` (absolute) or inside one of them."""
    return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def unwalked_roots(roots: Sequence[str], found: Discovery) -> dict[str, str]:
    """root -> why it could not be walked at all, for the roots (absolute) that could not be."""
    failed = dict(found.missing)
    return {root: failed[root] for root in roots if root in failed}


def prune_roots(library: Library, roots: Sequence[str], found: Discovery, report: IngestReport, *,
                chunk: int = 1000) -> list[int]:
    """Forget the indexed paths under ``roots`` (absolute) that are gone, within the rules above;
    counts them in ``report.removed`` and each refusal in ``report.prune_kept`` as (folder, reason,
    indexed paths kept). Indexed paths are read ``chunk`` at a time. Returns the ids whose vectors
    must leave the index."""
    store = library.store
    present = set(found.files)
    unwalked = unwalked_roots(roots, found)
    unlisted = [path for path, _ in found.missing if path not in unwalked]  # subfolders that could not be listed
    forget: dict[str, None] = {}
    for root in dict.fromkeys(roots):
        total = store.count_under(root, itself=True)
        if not total:
            continue
        if root in unwalked:
            report.prune_kept.append((root, f"could not be walked ({unwalked[root]})", total))
            continue
        if not any(under(p, [root]) for p in present):
            report.prune_kept.append((root, "holds no image file (an unmounted drive or an emptied folder?)", total))
            continue
        hidden = dict.fromkeys(unlisted, 0)  # indexed paths kept under each folder that could not be listed
        missing: list[str] = []
        for files in store.iter_files_under(root, chunk):
            for known in files:
                path = known.path
                if path in present:
                    continue
                inside = [folder for folder in unlisted if under(path, [folder])]
                for folder in inside:
                    hidden[folder] += 1
                if not inside and probe(path)[0] == GONE:
                    missing.append(path)
        report.prune_kept += [(folder, "could not be listed", n) for folder, n in hidden.items()
                              if n and under(folder, [root])]
        gone, kept = split_missing(missing, IndexedCounts(total, store.count_under))
        report.prune_kept += [(folder, UNMOUNTED, n) for folder, n in kept.items()]
        forget.update(dict.fromkeys(gone))
    if not forget:
        return []
    report.removed += len(forget)
    return store.remove_paths(list(forget))
