"""Text and picture views of results for the command line: query hits, near-duplicate groups,
indexed folders. Lines come back as strings (made terminal-safe with engine.output); the caller
prints them. Contact sheets are drawn with engine.plots (matplotlib is imported only then).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from engine.output import printable

if TYPE_CHECKING:
    from engine.duplicates import DuplicateReport
    from engine.query import Hit, QueryResult

_QUERY_COLOUR = "#1f77b4"
_SHEET_HITS = 11  # hits drawn per query: a query and 11 hits make two lines of six


def hit_line(hit: Hit) -> str:
    """One hit as ``engine query`` prints it: rank, score, distance, path, facts, verdict."""
    rec = hit.record
    facts = [f"{rec.width}x{rec.height}" if rec.width else "", rec.format or ""]
    if rec.taken_at:
        facts.append(rec.taken_at.strftime("%Y-%m-%d %H:%M"))
    if rec.camera:
        facts.append(rec.camera)
    verdict = "" if hit.similar is None else ("  similar" if hit.similar else "  different")
    return printable(f"{hit.rank:4d}  {hit.score:.4f}  {hit.distance:.4f}  {hit.path}  "
                     f"({' '.join(f for f in facts if f)}){verdict}")


def result_lines(result: QueryResult) -> list[str]:
    """A query's text block: the query, a header, a line per hit and one per byte-identical copy
    of a hit (``= path``, under it)."""
    lines = [printable(f"query: {result.query}"), "rank  score   distance  path"]
    for hit in result.hits:
        lines.append(hit_line(hit))
        lines.extend(printable(f"                        = {alias}") for alias in hit.aliases)
    if not result.hits:
        lines.append("  (no hit passes the filters)")
    return lines


def path_line(path: str, terminal: bool) -> bytes:
    """A path for ``--paths``: its exact bytes when the output goes to a program (a pipe, a file),
    the terminal-safe text when it goes to a terminal."""
    return (printable(path).encode("utf-8") if terminal else os.fsencode(path)) + b"\n"


def write_query_sheet(results: Sequence[QueryResult], path: str | os.PathLike) -> list[Path]:
    """Every answered query of a batch as a block: the query (blue frame), then its hits with
    rank and distance. Returns the PNG pages written (``engine.plots.plot_tile_rows``)."""
    from engine.plots import plot_tile_rows

    blocks = []
    for result in results:
        if result.error:
            continue
        tiles = [(result.query, "query", _QUERY_COLOUR)]
        tiles += [(h.path, f"#{h.rank}  d={h.distance:.3f}", None) for h in result.hits[:_SHEET_HITS]]
        blocks.append(tiles)
    if not blocks:
        return []
    return plot_tile_rows(blocks, path, per_row=6, title="engine query: each query, then its nearest images "
                                                         "(d: L2 distance)")


def duplicate_lines(report: DuplicateReport) -> list[str]:
    """``engine duplicates`` as text: a block per group, then a summary line."""
    lines = []
    for n, group in enumerate(report.groups, start=1):
        lines.append(f"group {n}: {len(group.members)} files")
        for m in group.members:
            note = f"identical to {m.identical_to}" if m.identical_to is not None else f"{m.nearest:.4f}"
            lines.append(printable(f"  {m.path}  ({note})"))
    lines.append(f"{len(report.groups)} group(s), {report.files_in_groups} files, among {report.photos} indexed "
                 f"images at distance <= {report.threshold:g} ({report.seconds:.1f} s)")
    return lines


def write_duplicate_sheet(report: DuplicateReport, path: str | os.PathLike, *, per_group: int = 16) -> list[Path]:
    """Each group as a row of thumbnails (at most ``per_group`` files each), captioned with the
    distance to the closest other member. Returns the PNG pages written."""
    from engine.plots import plot_tile_rows

    blocks = []
    for n, group in enumerate(report.groups, start=1):
        blocks.append([(m.path, f"g{n}  " + ("identical" if m.identical_to else f"d={m.nearest:.3f}"), None)
                       for m in group.members[:per_group]])
    if not blocks:
        return []
    return plot_tile_rows(blocks, path, per_row=8, title=f"engine duplicates: {len(blocks)} group(s) at distance "
                                                         f"<= {report.threshold:g}")


def folder_lines(folders: Sequence[tuple[str, int]], limit: int = 30) -> list[str]:
    """Indexed folders with their file counts, the fullest first (at most ``limit`` lines)."""
    ordered = sorted(folders, key=lambda f: (-f[1], f[0]))
    lines = [printable(f"  {count:8,d}  {folder}") for folder, count in ordered[:limit]]
    if len(ordered) > limit:
        lines.append(f"  ... and {len(ordered) - limit} more folders (`engine info --json` lists them all)")
    return lines


def sheet_note(pages: Sequence[Path]) -> str | None:
    """The one line that says where a contact sheet went (None when nothing was drawn)."""
    if not pages:
        return None
    more = f" (+{len(pages) - 1} more page(s): {pages[1].name} ... {pages[-1].name})" if len(pages) > 1 else ""
    return printable(f"contact sheet: {pages[0]}{more}")
