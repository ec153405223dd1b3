"""The written side of ``engine eval``: the plain-text table, and the report folder (figures,
metrics.json, report.md) of one or more evaluated models."""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:
    from engine.evaluate import EvalConfig, EvalReport, _Figures

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# formatting


_ORDER = ("map@r", "map", "r_precision", "oneshot_accuracy", "roc_auc", "eer", "accuracy", "precision",
          "recall", "f1", "threshold", "best_threshold", "best_accuracy", "eer_threshold", "queries", "pairs",
          "positives", "dropped_pairs")


def _metric_keys(reports: Sequence[EvalReport]) -> list[str]:
    present: dict[str, None] = {}
    for report in reports:
        present.update(dict.fromkeys(report.metrics))

    def rank(key: str) -> tuple:
        match = re.fullmatch(r"(recall|precision)@(\d+)", key)
        if match:
            return (0, match.group(1) != "recall", int(match.group(2)))
        return (1, _ORDER.index(key) if key in _ORDER else len(_ORDER), key)

    return sorted(present, key=rank)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def _table_rows(reports: Sequence[EvalReport]) -> tuple[list[str], list[list[str]]]:
    header = ["metric"] + _unique_names(reports)
    rows = [["images"] + [str(r.images) for r in reports],
            ["unreadable"] + [str(len(r.failures)) for r in reports]]
    for key in _metric_keys(reports):
        rows.append([key] + [_cell(r.metrics.get(key)) for r in reports])
    rows.append(["seconds"] + [f"{r.seconds:.1f}" for r in reports])
    return header, rows


def format_table(reports: Sequence[EvalReport]) -> str:
    """One plain-text table, a row per metric and a column per model, under a line naming the data."""
    if not reports:
        return "no results"
    first = reports[0]
    if first.kind == "pairs":
        intro = f"{first.dataset}: pair list, {first.metrics.get('pairs', 0)} pairs"
    else:
        intro = f"{first.dataset}: {first.images} images, {first.classes} classes, protocol {first.protocol}"
    header, rows = _table_rows(reports)
    widths = [max(len(row[c]) for row in [header] + rows) for c in range(len(header))]
    lines = [intro, "  ".join(h.ljust(w) if c == 0 else h.rjust(w) for c, (h, w) in enumerate(zip(header, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(v.ljust(w) if c == 0 else v.rjust(w) for c, (v, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if c == 0 else "---:" for c in range(len(header))) + "|"]
    out += ["| " + " | ".join(v.replace("|", "\\|") for v in row) + " |" for row in rows]
    return out


def _unique_names(reports: Sequence[EvalReport]) -> list[str]:
    names, seen = [], {}
    for report in reports:
        name = report.name
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return names


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(name).stem if name != "pretrained" else name).strip("-") or "model"


# --------------------------------------------------------------------------------------------------
# outputs


def write_outputs(results: list[tuple[EvalReport, _Figures]], config: EvalConfig, out_dir: Path) -> list[EvalReport]:
    """Write the figures, metrics.json and report.md of evaluated models into ``out_dir`` (see
    ``engine.evaluate.evaluate_models``); returns the reports with their ``files`` filled in."""
    from engine import plots

    out_dir.mkdir(parents=True, exist_ok=True)
    reports = [r for r, _ in results]
    names = _unique_names(reports)
    several = len(results) > 1
    suffixes, used = [], set()
    for name in names:
        slug = _slug(name)
        while slug in used:
            slug += "_"
        used.add(slug)
        suffixes.append(f"_{slug}" if several else "")

    shared = {
        "roc": plots.plot_roc({n: f.roc for n, (_, f) in zip(names, results)}, out_dir / "roc.png"),
        "pr_curve": plots.plot_pr_curve({n: f.pr for n, (_, f) in zip(names, results)}, out_dir / "pr_curve.png"),
    }
    final = []
    for name, suffix, (report, fig) in zip(names, suffixes, results):
        files = dict(shared)
        files["distances"] = plots.plot_distances(
            fig.pos, fig.neg, fig.threshold, out_dir / f"distances{suffix}.png",
            title=f"Pair distances, {name} (similar vs dissimilar)")
        if fig.examples is not None and fig.examples[0]:
            query_paths, hit_paths, correct, scores = fig.examples
            files["retrieval_examples"] = plots.plot_retrieval_examples(
                query_paths, hit_paths, correct, out_dir / f"retrieval_examples{suffix}.png", scores,
                title=f"Retrieval examples, {name} (score: cosine similarity; red: wrong class)")
        if fig.embeddings is not None:
            files["embedding_2d"] = plots.plot_embedding_2d(
                fig.embeddings, fig.labels, fig.class_names, out_dir / f"embedding_2d{suffix}.png", seed=config.seed,
                title=f"Embeddings of {name}, 2-D PCA ({report.images} images, {report.classes} classes)")
        if fig.pairs is not None and fig.pairs[0]:
            pairs, distances, labels = fig.pairs
            files["pairs"] = plots.plot_pairs(pairs, distances, labels, fig.threshold, out_dir / f"pairs{suffix}.png",
                                              title=f"Pairs, {name}, threshold {fig.threshold:.3f} (wrong verdicts first)")
        final.append(replace(report, files={k: str(v) for k, v in files.items()}))

    metrics_path = out_dir / "metrics.json"
    report_path = out_dir / "report.md"
    final = [replace(r, files={**r.files, "metrics": str(metrics_path), "report": str(report_path)}) for r in final]
    payload = {"generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "config": asdict(config), "reports": [r.to_dict() for r in final]}
    metrics_path.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n", encoding="utf-8")
    report_path.write_text(_markdown_report(final, names, config, out_dir), encoding="utf-8")
    log.info("wrote %s and %s", metrics_path, report_path)
    return final


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


_DEFINITIONS = """\
- **recall@K**: share of queries with at least one image of their class among the K nearest.
- **precision@K**: mean share of the K nearest that are of the query's class (always divided by K).
- **map@r**: MAP@R (Musgrave et al., *A Metric Learning Reality Check*): with R the number of other
  images of the query's class, the mean over the top R of precision@i at the right hits, divided by R.
- **map**: mean average precision over the whole ranking (scikit-learn style, tied scores grouped).
- **r_precision**: share of the top R that are of the query's class.
- **roc_auc / eer**: pair verification with "similar iff L2 distance <= threshold": the chance a similar
  pair is closer than a dissimilar one, and the error rate where false accepts equal false rejects.
- **accuracy, precision, recall, f1**: verification at `threshold` (the model's own unless given);
  **best_threshold** is the one that maximises accuracy on these pairs (`best_accuracy`).
- Queries whose class has no other image are left out of the retrieval figures.
"""


def _markdown_report(reports: list[EvalReport], names: list[str], config: EvalConfig, out_dir: Path) -> str:
    first = reports[0]
    lines = [f"# Evaluation of {', '.join(names)} on {Path(first.dataset).name}", ""]
    lines.append(f"- dataset: `{first.dataset}`")
    if first.kind == "pairs":
        lines.append(f"- kind: pair list, {first.metrics.get('pairs', 0)} pairs scored "
                     f"({first.metrics.get('dropped_pairs', 0)} dropped over unreadable images)")
    else:
        protocol = {"loo": "leave-one-out (every image queries all others)",
                    "split": f"per-class split, {config.query_fraction:.0%} queries, the rest the gallery",
                    "oneshot": "one-shot (one gallery image per class, the rest query it)"}[first.protocol]
        cap = f", at most {config.max_per_class} per class" if config.max_per_class else ""
        lines.append(f"- images: {first.images} in {first.classes} classes{cap} (seed {config.seed})")
        lines.append(f"- protocol: {protocol}")
        lines.append(f"- verification: {first.metrics.get('pairs', 0)} random pairs, half similar")
    lines.append(f"- generated: {datetime.now(timezone.utc).isoformat(timespec='seconds')}; "
                 "all figures in [metrics.json](metrics.json)")
    lines += ["", "## Summary", ""]
    header, rows = _table_rows(reports)
    lines += _markdown_table(header, rows)

    lines += ["", "## Figures", ""]

    def link(key: str, caption: str) -> None:
        seen = []
        for name, report in zip(names, reports):
            target = report.files.get(key)
            if target and target not in seen:
                seen.append(target)
                rel = Path(target).relative_to(out_dir).as_posix()
                label = caption if len(reports) == 1 or key in ("roc", "pr_curve") else f"{caption}: {name}"
                lines.extend([f"### {label}", "", f"[![{label}]({rel})]({rel})", ""])

    link("roc", "ROC of pair verification")
    link("pr_curve", "Precision-recall of pair verification")
    link("distances", "Distances of similar and dissimilar pairs")
    link("retrieval_examples", "Retrieval examples")
    link("embedding_2d", "Embeddings in 2-D")
    link("pairs", "Pairs and verdicts")

    for name, report in zip(names, reports):
        if report.per_class:
            title = "Per class, worst first" + (f": {name}" if len(reports) > 1 else "")
            lines += [f"## {title}", ""]
            rows = [[row["class"], str(row["images"]), str(row["queries"]), _cell(row["recall@1"]),
                     _cell(row["map@r"]), row.get("confused_with") or "-"] for row in report.per_class]
            lines += _markdown_table(["class", "images", "queries", "recall@1", "map@r", "most confused with"], rows)
            lines.append("")
    for name, report in zip(names, reports):
        if report.failures:
            lines += [f"## Unreadable files ({len(report.failures)})" + (f": {name}" if len(reports) > 1 else ""), ""]
            lines += [f"- `{p}`: {reason}" for p, reason in report.failures[:50]]
            if len(report.failures) > 50:
                lines.append(f"- ... and {len(report.failures) - 50} more (see metrics.json)")
            lines.append("")
    lines += ["## Definitions", "", _DEFINITIONS]
    return "\n".join(lines)
