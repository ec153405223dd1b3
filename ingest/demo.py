"""``engine demo``: the whole product on the shipped sample photos, offline."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from engine.plots import plot_contact_sheet
from engine.query import QueryResult, search_library
from ingest.pipeline import IngestConfig, IngestReport, ingest_paths

if TYPE_CHECKING:
    from engine.library import Library
    from engine.progress import ProgressFn

SAMPLE = Path(__file__).resolve().parent.parent / "engine" / "sample"


@dataclass(frozen=True)
class DemoResult:
    """home: the library folder; indexed: images it holds; report: the sample's ingest; queries: the
    held-out photos' results; same_class of total_hits were of the query's class; sheet: the PNG."""

    home: str
    indexed: int
    report: IngestReport
    queries: list[QueryResult]
    same_class: int
    total_hits: int
    sheet: str


def _class_of(path: str) -> str:
    p = Path(path)
    return p.stem if p.parent.name == "query" else p.parent.name


def run_demo(library: Library, *, k: int = 8, out_dir: str | None = None,
             progress: ProgressFn | None = None) -> DemoResult:
    """Ingest ``engine/sample/library`` (10 Caltech-101 classes x 8 photos), query the held-out
    photos in ``engine/sample/query``, and draw the first query's hits as a contact sheet PNG."""
    report = ingest_paths(library, [SAMPLE / "library"], IngestConfig(workers=0), model="pretrained",
                          progress=progress)
    results = search_library(library, [SAMPLE / "query"], k)
    same = sum(_class_of(h.path) == _class_of(r.query) for r in results for h in r.hits)
    total = sum(len(r.hits) for r in results)
    out = Path(out_dir) if out_dir else library.paths.home
    out.mkdir(parents=True, exist_ok=True)
    first = results[0]
    sheet = plot_contact_sheet(first.query, [h.path for h in first.hits], [h.score for h in first.hits],
                               out / "demo-contact-sheet.png",
                               title=f"engine demo: top {k} for {Path(first.query).name}")
    return DemoResult(str(library.paths.home), library.store.count(), report, results, same, total, str(sheet))
