"""``engine demo``: the whole product on the shipped sample photos, offline."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.query import QueryResult, search_library
from ingest.pipeline import IngestConfig, IngestReport, ingest_paths

SAMPLE = Path(__file__).resolve().parent.parent / "engine" / "sample"


@dataclass(frozen=True)
class DemoResult:
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


def run_demo(library, *, k: int = 8, out_dir: str | None = None, progress=None) -> DemoResult:
    """Ingest ``engine/sample/library`` (10 Caltech-101 classes x 8 photos), query the held-out
    photos in ``engine/sample/query``, and draw the first query's hits as a contact sheet PNG."""
    from engine.plots import plot_contact_sheet

    report = ingest_paths(library, [SAMPLE / "library"], IngestConfig(workers=0), model="pretrained",
                          progress=progress)
    queries = sorted(str(p) for p in (SAMPLE / "query").glob("*.jpg"))
    results = search_library(library, queries, k)
    same = sum(_class_of(h.path) == _class_of(r.query) for r in results for h in r.hits)
    total = sum(len(r.hits) for r in results)
    out = Path(out_dir) if out_dir else library.paths.home
    out.mkdir(parents=True, exist_ok=True)
    first = results[0]
    sheet = plot_contact_sheet(first.query, [h.path for h in first.hits], [h.score for h in first.hits],
                               out / "demo-contact-sheet.png",
                               title=f"engine demo: top {k} for {Path(first.query).name}")
    return DemoResult(str(library.paths.home), library.store.count(), report, results, same, total, str(sheet))
