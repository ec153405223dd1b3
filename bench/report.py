"""The results of ``run_bench`` (or of single sections named the same way) as readable text."""

from __future__ import annotations

from typing import Any, Sequence


def text_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """Lines of a plain-text table, indented two spaces: the first column left-aligned, the others
    right-aligned, a dashed rule under the headers."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return ["  " + line for line in lines]


def _machine(m: dict[str, Any]) -> list[str]:
    return [f"machine: {m.get('cpu')}, {m.get('usable_cores')} cores, {m.get('ram_gb')} GB RAM, "
            f"GPU: {m.get('gpu') or 'none'}",
            f"         torch {m.get('torch')} ({m.get('torch_threads')} threads), faiss {m.get('faiss')}, "
            f"timm {m.get('timm')}, python {m.get('python')}; load average {m.get('loadavg')} -> "
            f"{m.get('loadavg_end')}"]


def _ingest(s: dict[str, Any]) -> list[str]:
    lines = ["", f"ingest: {s['files']} files, {s['backbone']} {s['input_size'][-1]} px, batch {s['batch_size']}, "
                 f"{s['workers']} decode workers, {s['torch_threads']} torch threads, {s['device']}"]
    lines += text_table(["", "images/s", "CPU ms/image"],
                        [["bare model (pre-decoded)", s["model_images_per_s"], s["model_cpu_ms_per_image"]],
                         ["ingest_paths", s["ingest_images_per_s"], s["ingest_cpu_ms_per_image"]],
                         ["ratio", s["ratio"], s["cpu_ratio"]]])
    lines.append(f"  (new-library model setup {s['model_setup_s']} s, not in the ratio; "
                 f"{s['embedded']} embedded, {s['failed']} failed)")
    mc = s.get("model_configs")
    if mc:
        lines.append(f"  bare model configurations, batch {mc['batch_size']}, random input "
                     f"(max |diff| from embed in brackets):")
        lines += text_table(["configuration", "images/s"],
                            [[f"{name} [{mc['max_abs_diff'][name]:.1g}]", v] for name, v in mc["images_per_s"].items()])
    return lines


def _decode(s: dict[str, Any]) -> list[str]:
    lines = ["", f"decode + preprocess: {s['image']} ({s['megapixels']} MP, {s['file_bytes'] // 1024} KiB), "
                 f"{s.get('torch_threads')} torch thread(s) as in a decode worker"]
    return lines + text_table(["", "best ms", "median ms", "decoded size"],
                              [["with draft", s["with_draft_ms"], s["with_draft_median_ms"],
                                "x".join(map(str, s["decoded_size_draft"]))],
                               ["without draft", s["without_draft_ms"], s["without_draft_median_ms"],
                                "x".join(map(str, s["decoded_size_full"]))],
                               ["speedup", f"{s['speedup']}x", f"{s['speedup_median']}x", ""]])


def _query(s: dict[str, Any], meta: Any) -> list[str]:
    lines = ["", "query, warm, in process (synthetic unit vectors, Flat index):"]
    lines += text_table(["vectors", "dim", "search p50 ms", "p99 ms", "batch q/s", "build s"],
                        [[f"{r['n']:,}", r["dim"], r["search"]["p50_ms"], r["search"]["p99_ms"],
                          r["batch_queries_per_s"], r["build_s"]] for r in s["search"]])
    e = s["embed"]
    lines.append(f"  embed one query image (decode + preprocess + forward): p50 {e['p50_ms']} ms, p99 {e['p99_ms']} ms")
    if isinstance(meta, dict) and "fetch" in meta:
        lines.append(f"  metadata fetch of {meta['fetch']['k']} records: p50 {meta['fetch']['p50_ms']} ms, "
                     f"p99 {meta['fetch']['p99_ms']} ms")
        for r in s["search"]:
            total = e["p50_ms"] + r["search"]["p50_ms"] + meta["fetch"]["p50_ms"]
            lines.append(f"  total at {r['n']:,} vectors (sum of p50s): {total:.1f} ms")
    lib = s.get("library")
    if lib:
        kind = f" ({lib['index_type']} index)" if lib.get("index_type") else ""
        lines.append(f"  search_library on a real {lib['vectors']}-image library{kind}: p50 {lib['p50_ms']} ms, "
                     f"p99 {lib['p99_ms']} ms")
    c = s.get("cold")
    if c:
        lines.append("  cold `engine query` (fresh process, warm file cache; search_library timed by phase), seconds:")
        lines += text_table(["interpreter", "import", "db open", "index load", "model load", "embed", "search",
                             "metadata", "other", "total"],
                            [[c["interpreter_start_s"], c["import_s"], c["open_s"], c["index_load_s"],
                              c["model_load_s"], c["embed_s"], c["search_s"], c["metadata_s"], c["other_s"],
                              c["wall_s"]]])
        if "cli_wall_s" in c:
            lines.append(f"  the real `engine query --json` took {c['cli_wall_s']} s wall")
    return lines


def _metadata(s: dict[str, Any]) -> list[str]:
    return ["", f"metadata (SQLite): insert_rows of {s['rows']:,} rows: {s['bulk_rows_per_s']:,} rows/s; "
                f"write_batch of {s['batch_size']} rows + vectors: {s['batch_ms']} ms "
                f"({s['batch_rows_per_s']:,} rows/s)"]


def _index(s: dict[str, Any]) -> list[str]:
    def kind(r: dict[str, Any]) -> str:
        # polysemous training is a training option FAISS does not store, so it cannot be read back
        no_polysemous = "PQ" in r["index_type"] and "np" in r["factory_used"]
        return r["index_type"] + ("np" if no_polysemous else "")

    lines = ["", f"index types: {s['n']:,} {s['data']}, dim {s['dim']}, {s['queries']} queries, "
                 "engine default search parameters unless stated; types as read back from the saved index"]
    k = s["k"]
    return lines + text_table(["index type", "search", "build s", f"recall@{k}", "queries/s", "1-query p50 ms",
                               "bytes/vector"],
                              [[kind(r), r.get("params", "default"), r["build_s"], r[f"recall@{k}"],
                                r["queries_per_s"], r["single_p50_ms"], r["bytes_per_vector"]] for r in s["rows"]])


def format_bench(results: dict[str, Any]) -> str:
    """A readable report of ``run_bench`` results: one block per section present, tables where
    apt; a failed section is one ``NAME: FAILED: ...`` line."""
    lines = _machine(results.get("machine", {}))
    sections = (("ingest", _ingest), ("decode", _decode), ("query", lambda s: _query(s, results.get("metadata"))),
                ("metadata", _metadata), ("index", _index))
    for name, render in sections:
        section = results.get(name)
        if section is None:
            continue
        if isinstance(section, dict) and "error" in section:
            lines.append(f"{name}: FAILED: {section['error']}")
            continue
        lines += render(section)
    if "seconds" in results:
        lines += ["", f"total {results['seconds']} s"]
    return "\n".join(lines)
