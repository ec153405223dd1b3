"""``engine demo``: the whole product on the shipped sample photos, offline."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from engine.query import QueryResult, search_library
from engine.views import write_query_sheet
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
    photos in ``engine/sample/query``, and draw each query with its hits on a contact sheet PNG."""
    report = ingest_paths(library, [SAMPLE / "library"], IngestConfig(workers=0), model="pretrained",
                          progress=progress)
    results = search_library(library, [SAMPLE / "query"], k)
    same = sum(_class_of(h.path) == _class_of(r.query) for r in results for h in r.hits)
    total = sum(len(r.hits) for r in results)
    out = Path(out_dir) if out_dir else library.paths.home
    out.mkdir(parents=True, exist_ok=True)
    sheet = write_query_sheet(results, out / "demo-contact-sheet.png")[0]  # every held-out photo, a row each
    return DemoResult(str(library.paths.home), library.store.count(), report, results, same, total, str(sheet))
