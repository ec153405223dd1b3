"""The ``engine`` command line: parse, call one library function, format.

Heavy modules are imported inside the commands so that ``engine --help`` is instant. Every
EngineError becomes a one-line message and exit code 1; no traceback reaches the user (set
ENGINE_DEBUG=1 to see one).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING, Any

import click

from engine.cli_context import Context, pass_ctx, waiting as _waiting
from engine.cli_params import DATE, Count, Number, Threshold, cap_workers_option, parse_ks as _parse_ks
from engine.cli_options import DATABASE_HELP, DEVICE_HELP, HOME_HELP, EngineGroup
from engine.cli_errors import _echo_json, _printable, _PrintableFormatter, handle_errors
from engine.console import Progress as _ProgressBar
from engine.output import to_json_bytes

if TYPE_CHECKING:
    from engine.query import QueryResult

@click.group(cls=EngineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--home", envvar="ENGINE_HOME", type=click.Path(file_okay=False), help=HOME_HELP)
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
              help=DEVICE_HELP)
@click.option("--database-url", default=None, help=DATABASE_HELP)  # $ENGINE_DATABASE_URL: read by Library
@click.option("--read-only", is_flag=True, help="Search the library without writing anything to it (also the "
              "default where its folder is not writable, or $ENGINE_READ_ONLY is set); commands that change it refuse.")
@click.version_option(package_name="engine")
@click.pass_context
def main(ctx: click.Context, home: str | None, device: str, database_url: str | None, read_only: bool) -> None:
    """Image retrieval with a Siamese encoder: ingest photos, query by image, compare pairs,
    train, evaluate and benchmark."""
    before = list(logging.getLogger().handlers)
    logging.basicConfig(level=os.environ.get("ENGINE_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:  # log lines quote file names too: keep them one safe line
        if handler not in before:
            handler.setFormatter(_PrintableFormatter(handler.formatter))
    # `~` that no shell expanded ($ENGINE_HOME='~/lib', --home '~/lib') means the home folder, as everywhere.
    ctx.obj = Context(os.path.expanduser(home) if home else None, device, database_url, read_only)


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--model", default=None, help="pretrained (or pretrained-lite1, pretrained-lite2, pretrained-gem) or a "
              "checkpoint; chosen when the library is new.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option("--workers", default=None, type=click.IntRange(0), callback=cap_workers_option,
              help="Decode processes (default: cores/4, at least 1; at most what cores and memory hold).")
@click.option("--exclude", multiple=True, help="Glob of names or paths to skip (repeatable).")
@click.option("--prune", is_flag=True,
              help="Forget indexed files under PATHS that are gone from disk (never under a path that could not "
                   "be walked, holds no image, or whose indexed files are all missing: an unmounted drive).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@click.option("--ray", "use_ray", is_flag=True,
              help="Decode and embed on Ray Data actors (the [ray] extra): a local cluster of this machine's cores, "
                   "or the cluster at --ray-address.")
@click.option("--ray-address", default=None, help="With --ray: a running Ray cluster (needs --shards).")
@click.option("--shards", "shards_dir", default=None, type=click.Path(file_okay=False),
              help="With --ray: where the actors write embedding shards (kept; default: inside the library home, "
                   "deleted after the commit).")
@pass_ctx
@handle_errors
def ingest(obj: Context, paths: tuple[str, ...], model: str | None, batch_size: int, workers: int | None,
           exclude: tuple[str, ...], prune: bool, as_json: bool, use_ray: bool, ray_address: str | None,
           shards_dir: str | None) -> None:
    """Index every image under PATHS (files or folders). Rerunning only indexes what changed."""
    from ingest.pipeline import IngestConfig, ingest_paths

    if (ray_address or shards_dir) and not use_ray:
        raise click.UsageError("--ray-address and --shards go with --ray")
    config = IngestConfig(batch_size=batch_size, workers=workers, exclude=tuple(exclude), prune=prune)
    bar = _ProgressBar("ingest", enabled=not as_json, waiting="loading the encoder...")
    summary: dict[str, Any] | None = None
    try:
        if use_ray:  # Ray is imported inside, when there is something to embed
            from ingest.distributed import RayConfig, ingest_with_ray

            distributed = ingest_with_ray(obj.library(), paths, config, RayConfig(ray_address, shards_dir), model=model,
                                          progress=bar, on_wait=_waiting)
            report, summary = distributed.ingest, distributed.to_dict()
        else:
            report = ingest_paths(obj.library(), paths, config, model=model, progress=bar, on_wait=_waiting)
    finally:
        bar.close()
    if as_json:
        _echo_json(summary or report.to_dict())
    else:
        click.echo(f"added {report.added}, moved {report.moved}, unchanged {report.unchanged}, updated {report.updated}, "
                   f"duplicates {report.duplicates}, failed {len(report.failed)}, removed {report.removed} "
                   f"in {report.seconds:.1f} s " + (f"({report.images_per_second:.1f} images/s embedded)"
                                                    if report.embedded else "(nothing new to embed)"))
        if summary and summary["ray"]["actors"]:
            ray = summary["ray"]
            click.echo(f"  ray: {ray['actors']} actors, {ray['partitions']} partitions; start {ray['start']:.1f} s, "
                       f"decode + embed {ray['cluster']:.1f} s (first result after {ray['first_result']:.1f} s)",
                       err=True)
        for path, reason in report.failed[:20]:
            click.echo(_printable(f"  failed: {path}: {reason}"), err=True)
        if len(report.failed) > 20:
            click.echo(_printable(f"  ... {len(report.failed) - 20} more in {report.report_path}"), err=True)
        for where, reason, kept in report.prune_kept:
            click.echo(_printable(f"  not pruned under {where}: {reason}; kept {kept} indexed path(s) "
                                  "(`engine remove PATH` forgets them if they are really gone)"), err=True)
    touched = report.added + report.unchanged + report.updated + report.duplicates + report.moved + report.removed
    if report.failed and touched == 0 or report.unwalked or report.prune_kept:
        sys.exit(1)


def _note_k_capped(k: int, results: list[QueryResult]) -> None:
    """Say on stderr when -k, given explicitly, asked for more neighbours than the library holds
    (the results then hold every indexed image)."""
    ctx = click.get_current_context()
    if ctx.get_parameter_source("k") != click.core.ParameterSource.COMMANDLINE:
        return
    answered = [len(r.hits) for r in results if not r.error]
    if answered and max(answered) < k:
        click.echo(f"note: -k {k} is more than the library holds; capped at {max(answered)}", err=True)


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("-k", "k", default=10, show_default=True, type=Count(),
              help="Neighbours per query (at most the number of indexed images).")
@click.option("--threshold", type=Threshold(), default=None, help="Only hits at L2 distance <= D (a number).")
@click.option("--label", is_flag=True, help="Mark each hit similar/different by the encoder's calibrated threshold.")
@click.option("--exclude-self", is_flag=True, help="Leave out each query's own file (and its byte-identical copies).")
@click.option("--taken-after", type=DATE, metavar="DATE", help="Only photos captured at or after DATE (EXIF).")
@click.option("--taken-before", type=DATE, metavar="DATE", help="Only photos captured before DATE (EXIF).")
@click.option("--camera", help="Only photos whose camera make or model contains TEXT (any case).")
@click.option("--under", multiple=True, type=click.Path(file_okay=False), help="Only photos in FOLDER (repeatable).")
@click.option("--paths", "paths_only", is_flag=True, help="Print only the hits' paths, one per line (for xargs).")
@click.option("--sheet", type=click.Path(dir_okay=False), help="Also draw every query and its hits into this PNG.")
@click.option("--model", default=None, help="Refuse unless the library was built with this model.")
@click.option("--expand", default=None, type=click.IntRange(0), metavar="N",
              help="Expand each query with its N nearest indexed images and re-rank the best hits (0: off; default: "
                   "the library's setting, see `engine settings`). Searches in this process.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--no-server", is_flag=True, help="Search in this process even when `engine serve` runs for this library.")
@pass_ctx
@handle_errors
def query(obj: Context, images: tuple[str, ...], k: int, threshold: float | None, label: bool, exclude_self: bool,
          taken_after: Any, taken_before: Any, camera: str | None, under: tuple[str, ...], paths_only: bool,
          sheet: str | None, model: str | None, expand: int | None, as_json: bool, no_server: bool) -> None:
    """Find the K most similar indexed images to each IMAGE (files, or folders walked as ingest
    walks them). Filters keep the K best that pass. A running `engine serve` for this library
    answers when there is one."""
    from engine.filters import HitFilter
    from engine.query import search_library
    from engine.views import path_line, result_lines, sheet_note, write_query_sheet

    hit_filter = HitFilter(threshold, taken_after, taken_before, camera, under)
    results = None
    if not no_server and model is None and expand is None:
        from engine.service.client import search_via_service

        results = search_via_service(obj.home, obj.database_url, images, k, threshold="model" if label else None,
                                     hit_filter=hit_filter, exclude_self=exclude_self)
    if results is None:
        library = obj.library()
        label_at = None
        if library.exists():  # an empty home is search_library's error to report
            if model is not None:
                library.check_model(model)
            label_at = library.query_encoder().decision_threshold if label else None
        bar = _ProgressBar("query", enabled=not as_json)
        try:
            results = search_library(library, images, k, threshold=label_at, hit_filter=hit_filter,
                                     exclude_self=exclude_self, progress=bar, expand=expand)
        finally:
            bar.close()
    _note_k_capped(k, results)
    terminal = sys.stdout.isatty()
    for result in results:
        if as_json:
            _echo_json(result.to_dict())
        elif result.error:
            click.echo(_printable(f"error: {result.query}: {result.error}"), err=True)
        elif paths_only:
            click.echo(b"".join(path_line(h.path, terminal) for h in result.hits), nl=False)
        else:
            click.echo("\n".join(result_lines(result)))
    note = sheet_note(write_query_sheet(results, sheet)) if sheet else None
    if note:
        click.echo(note, err=True)
    if results and all(r.error for r in results):
        sys.exit(1)


@main.command()
@click.argument("a", type=click.Path())
@click.argument("b", type=click.Path())
@click.option("--model", default=None, help="pretrained or a checkpoint (default: the library's encoder, else pretrained).")
@click.option("--threshold", type=Threshold(), default=None, help="L2 distance at or below which the pair is similar.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--no-server", is_flag=True, help="Compare in this process even when `engine serve` runs for this library.")
@pass_ctx
@handle_errors
def compare(obj: Context, a: str, b: str, model: str | None, threshold: float | None, as_json: bool,
            no_server: bool) -> None:
    """Say whether images A and B are similar, by the calibrated distance threshold. A running
    `engine serve` for this library answers when there is one (and no --model is given)."""
    result = None
    if not no_server and model is None:
        from engine.service.client import compare_via_service

        result = compare_via_service(obj.home, obj.database_url, a, b, threshold=threshold)
    if result is None:
        from engine.query import compare_images

        library = obj.library()
        if model is None and library.exists():
            encoder = library.query_encoder(2)  # its TorchScript copy when it has one (no timm import)
        else:
            from engine.encoder import load_encoder, resolve_device

            encoder = load_encoder(model or "pretrained", resolve_device(obj.device))
        result = compare_images(encoder, a, b, threshold=threshold)
    if as_json:
        _echo_json(result.to_dict())
    else:
        verdict = "similar" if result.similar else "different"
        click.echo(f"{verdict}  (distance {result.distance:.4f}, threshold {result.threshold:.4f})")


@main.command()
@click.option("--threshold", type=Threshold(), default=None,
              help="L2 distance at or below which two photos count as the same shot (default 0.525: calibrated for "
                   "the pretrained encoder on altered copies; see the README).")
@click.option("--sheet", type=click.Path(dir_okay=False), help="Also draw each group as a row of thumbnails into this PNG.")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
@handle_errors
def duplicates(obj: Context, threshold: float | None, sheet: str | None, as_json: bool) -> None:
    """Group the library's near-identical photos (re-saved, resized, cropped a little, burst shots)
    from its stored vectors, byte-identical copies included. Nothing is decoded."""
    from engine.duplicates import DuplicateConfig, find_duplicates
    from engine.views import duplicate_lines, sheet_note, write_duplicate_sheet

    bar = _ProgressBar("duplicates", unit="vectors", enabled=not as_json, waiting="opening the index...")
    try:
        config = DuplicateConfig() if threshold is None else DuplicateConfig(threshold=threshold)
        report = find_duplicates(obj.library(), config, progress=bar)
    finally:
        bar.close()
    if as_json:
        for group in report.groups:
            _echo_json(dict(group.to_dict(), threshold=report.threshold))
    else:
        click.echo("\n".join(duplicate_lines(report)))
    note = sheet_note(write_duplicate_sheet(report, sheet)) if sheet else None
    if note:
        click.echo(note, err=True)


@main.command()
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
@handle_errors
def info(obj: Context, as_json: bool) -> None:
    """Counts, model, dimensions, index type, paths and sizes of the library."""
    from engine.info import describe_library

    facts = describe_library(obj.library())
    if as_json:
        _echo_json(facts)
        return
    from engine.views import folder_lines

    for key, value in facts.items():
        if key == "folders":
            click.echo(f"folders: {len(value)} (indexed files per folder)")
            for line in folder_lines([(f["folder"], f["files"]) for f in value]):
                click.echo(line)
        elif isinstance(value, dict):
            click.echo(f"{key}:")
            for k2, v2 in value.items():
                click.echo(_printable(f"  {k2}: {v2}"))
        else:
            click.echo(_printable(f"{key}: {value}"))


@main.command()
@click.option("--model", default=None,
              help="Re-embed every image with this encoder (pretrained or a checkpoint), then switch the library to "
                   "it. The library answers as before until every row has a new vector; a stopped run resumes.")
@click.option("--index-type", default=None,
              help="auto (the engine chooses by size, dimension and memory budget, and moves up as the library grows), "
                   "or a FAISS factory string: Flat, HNSW32, IVF1024,Flat, IVF1024,PQ32 ... (built, trained on the "
                   "stored vectors and tuned before it replaces the current one).")
@click.option("--memory-budget", default=None, callback=lambda ctx, param, value: _byte_size(param, value),
              help="Memory the index may use, e.g. 4G or 512M (default: a quarter of this machine's RAM).")
@click.option("--recall", default=None, type=Number(0, 1, open_min=True),
              help="Recall@10 the index is tuned to, against exact search (default 0.95).")
@click.option("--allow-missing", is_flag=True,
              help="With --model: switch even when some indexed files cannot be read, forgetting those rows.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option("--workers", default=None, type=click.IntRange(0), callback=cap_workers_option)
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
@handle_errors
def reindex(obj: Context, model: str | None, index_type: str | None, memory_budget: int | None, recall: float | None,
            allow_missing: bool, batch_size: int, workers: int | None, as_json: bool) -> None:
    """Rebuild the index from stored embeddings, or re-embed the library with another encoder."""
    from ingest.pipeline import IngestConfig
    from ingest.reindex import reindex_library

    bar = _ProgressBar("reindex", enabled=not as_json, waiting="loading the encoder..." if model else
                       "rebuilding the index from the stored vectors...")
    try:
        report = reindex_library(obj.library(), model=model, factory=index_type, allow_missing=allow_missing,
                                 config=IngestConfig(batch_size=batch_size, workers=workers), progress=bar,
                                 on_wait=_waiting, memory_budget=memory_budget, recall=recall)
    finally:
        bar.close()
    if as_json:
        _echo_json(report.to_dict())
        return
    if model is not None:
        resumed = f" ({report.resumed} more staged by an earlier run)" if report.resumed else ""
        done = (f"switched the library to {report.model['spec']}" if report.switched
                else f"the library already uses {report.model['spec']}")
        click.echo(_printable(f"re-embedded {report.reembedded} image(s){resumed}; {done}"))
    if report.dropped:
        click.echo(_printable(f"forgot {report.dropped} row(s) whose files could not be read (listed in "
                              f"{report.report_path})"))
    for note in report.notes:
        click.echo(_printable(f"note: {note}"))
    click.echo(f"index {report.index}: {report.vectors} vectors in {report.seconds:.1f} s")
    search = report.search or {}
    if search.get("recall") is not None and search.get("queries"):
        click.echo(f"tuned: {search['params'] or 'default search'}, re-ranking {search['rerank'] or 'none'}; "
                   f"recall@{search['k']} {search['recall']:.3f} (target {search['target']:.2f})")


def _byte_size(param: click.Parameter, value: str | None) -> int | None:
    """A --memory-budget value (4G, 512M, bytes) as bytes."""
    from engine.index_policy import parse_bytes

    if value is None:
        return None
    try:
        return parse_bytes(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param=param) from None


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@pass_ctx
@handle_errors
def remove(obj: Context, paths: tuple[str, ...]) -> None:
    """Forget PATHS (files, or every indexed file under folders); they never come back from a query."""
    from ingest.pipeline import remove_paths

    n = remove_paths(obj.library(), paths, on_wait=_waiting)
    click.echo(f"removed {n} path(s)")


@main.command()
@click.option("-k", "k", default=8, show_default=True, type=Count())
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Where to write the contact sheet (default: the library folder).")
@pass_ctx
@handle_errors
def demo(obj: Context, k: int, out_dir: str | None) -> None:
    """Ingest the shipped sample photos, query one that was held out, print the hits and write a
    contact sheet PNG. Works offline."""
    from engine.views import hit_line
    from ingest.demo import run_demo

    bar = _ProgressBar("demo ingest", waiting="loading the encoder and indexing the sample photos...")
    try:
        result = run_demo(obj.library(), k=k, out_dir=out_dir, progress=bar)
    finally:
        bar.close()
    click.echo(_printable(f"indexed {result.indexed} sample photos ({result.report.added} new) into {result.home}"))
    for res in result.queries:
        click.echo(_printable(f"query: {res.query}"))
        click.echo("rank  score   distance  path")
        for hit in res.hits:
            click.echo(hit_line(hit))
    click.echo(f"same-class hits in the top {k}: {result.same_class}/{result.total_hits}")
    click.echo(_printable(f"contact sheet: {result.sheet}"))
    click.echo(_printable(f"the library stays in {result.home}; search it with: engine --home {result.home} "
                          "query PHOTO"))


@main.command()
@click.option("--repair", is_flag=True, help="Fix what can be fixed, saying what was done.")
@click.option("--deep", is_flag=True,
              help="Also read and hash every indexed file, to find content changed behind an unchanged size and "
                   "mtime (reads every byte; with --repair, re-embeds those files).")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
@handle_errors
def doctor(obj: Context, repair: bool, deep: bool, as_json: bool) -> None:
    """Check database against index against disk; with --repair, fix what can be fixed."""
    from ingest.doctor import check_library

    report = check_library(obj.library(), repair=repair, on_wait=_waiting, deep=deep)
    if as_json:
        _echo_json(report.to_dict())
    else:
        for line in report.lines():
            click.echo(_printable(line))
    if not report.ok:
        sys.exit(1)


@main.command()
@click.option("--n", "n_vectors", default=100_000, show_default=True, type=click.IntRange(1000),
              help="Synthetic vectors for the index benchmarks.")
@click.option("--data", default=None, type=click.Path(exists=True, file_okay=False),
              help="A photo folder for the ingest benchmark (default: the shipped sample).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--out", "out_path", default=None, type=click.Path(dir_okay=False), help="Also write the JSON here.")
@click.option("--quick", is_flag=True, help="Fewer repetitions: a smoke run in well under a minute.")
@pass_ctx
@handle_errors
def bench(obj: Context, n_vectors, data, as_json, out_path, quick) -> None:
    """Speed benchmarks: ingest vs bare model, decode with/without draft, query latency, index
    types (build time, recall@10, queries/s, bytes/vector), metadata insert rate."""
    from bench.report import format_bench
    from bench.suite import BenchConfig, run_bench

    results = run_bench(BenchConfig(n_vectors=n_vectors, data=data, quick=quick, device=obj.device))
    if out_path:
        with open(out_path, "wb") as fh:
            fh.write(to_json_bytes(results, indent=2))
    if as_json:
        _echo_json(results)
    else:
        click.echo(format_bench(results))


@main.command("eval")
@click.argument("dataset", required=False, type=click.Path(exists=True))
@click.option("--library", "of_library", is_flag=True,
              help="Evaluate the current library instead: its stored vectors (nothing decoded), labelled by the "
                   "indexed files' folder names.")
@click.option("--model", "models", multiple=True,
              help="pretrained (the default), pretrained-lite1, pretrained-lite2, pretrained-gem or a checkpoint; "
                   "repeat to compare models side by side.")
@click.option("--protocol", default="loo", show_default=True, type=click.Choice(["loo", "split", "oneshot"]),
              help="loo: every image queries all others; split: per-class query/gallery split; "
                   "oneshot: one gallery image per class (N-way one-shot).")
@click.option("--k", "ks", default="1,5,10", show_default=True, help="Comma-separated K for Recall@K / precision@K.")
@click.option("--max-per-class", default=None, type=click.IntRange(1), help="Cap images per class (seeded).")
@click.option("--pairs", "n_pairs", default=5000, show_default=True, type=click.IntRange(2),
              help="Balanced pairs sampled for verification figures.")
@click.option("--threshold", default=None, type=Threshold(), help="Distance threshold for verification (default: the model's).")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option("--workers", default=None, type=click.IntRange(0), callback=cap_workers_option)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--expand", default=0, show_default=True, type=click.IntRange(0), metavar="N",
              help="Rank as `engine query --expand N` does: each query expanded with its N nearest gallery images, "
                   "its best hits re-ranked (retrieval figures; 0: the encoder alone).")
@click.option("--expand-alpha", default=3.0, show_default=True, type=Number(0),
              help="With --expand: the power of each neighbour's similarity that weighs it.")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Write plots, metrics.json and report.md here.")
@click.option("--json", "as_json", is_flag=True, help="Every figure as JSON, one object per model.")
@pass_ctx
@handle_errors
def eval_(obj: Context, dataset: str | None, of_library: bool, models: tuple[str, ...], protocol: str, ks: str,
          max_per_class: int | None, n_pairs: int, threshold: float | None, batch_size: int, workers: int | None,
          seed: int, expand: int, expand_alpha: float, out_dir: str | None, as_json: bool) -> None:
    """Retrieval and verification metrics of one or more models on DATASET (a folder-per-class tree
    or a pair CSV img_a,img_b,label), or of the library itself with --library."""
    from engine.evaluate import EvalConfig, evaluate_models, format_table

    if of_library == (dataset is not None):
        raise click.UsageError("give a DATASET or --library (not both)")
    if of_library and models:
        raise click.UsageError("--library measures the library's own encoder; leave out --model")
    config = EvalConfig(protocol=protocol, ks=_parse_ks(ks), batch_size=batch_size, workers=workers,
                        max_per_class=max_per_class, n_pairs=n_pairs, seed=seed, threshold=threshold,
                        device=obj.device, expand=expand, expand_alpha=expand_alpha)
    bar = _ProgressBar("eval", unit="vectors" if of_library else "img", enabled=not as_json,
                       waiting="loading the encoder...")
    try:
        if of_library:
            from engine.library_eval import evaluate_library

            reports = [evaluate_library(obj.library(), config, out_dir, progress=bar)]
        else:
            reports = evaluate_models(dataset, list(models or ("pretrained",)), config, out_dir, progress=bar)
    finally:
        bar.close()
    if as_json:
        for report in reports:  # the same objects metrics.json lists under "reports"
            _echo_json(report.to_dict())
        return
    for line in format_table(reports).splitlines():  # class and model names come from the user's files
        click.echo(_printable(line))
    worst = reports[0].per_class[:5]
    if worst:
        click.echo(_printable("worst classes (" + reports[0].name + "): " +
                   ", ".join(f"{row.get('class', row.get('label'))} {row.get('map@r') or 0:.3f}" for row in worst)))
    if out_dir:
        click.echo(_printable(f"report: {os.path.join(out_dir, 'report.md')}"))


# Commands kept in their own modules (each imports only click at start-up): registered here so
# that `engine --help` lists them with the rest.
from engine.cli_serve import serve  # noqa: E402
from engine.cli_settings import settings  # noqa: E402
from engine.cli_train import train  # noqa: E402
from engine.cli_import import import_shards_command  # noqa: E402

main.add_command(train)
main.add_command(serve)
main.add_command(settings)
main.add_command(import_shards_command)
