"""The ``engine`` command line: parse, call one library function, format.

Heavy modules are imported inside the commands so that ``engine --help`` is instant. Every
EngineError becomes a one-line message and exit code 1; no traceback reaches the user (set
ENGINE_DEBUG=1 to see one).
"""

from __future__ import annotations

import functools
import json
import os
import sys
from typing import TYPE_CHECKING, Any, Callable

import click

from engine.errors import EngineError
# Torch-free: the train command's choices and its option check come from here at import time.
from train.config import FIELDS as TRAIN_FIELDS
from train.config import LOSSES, MINERS, PRESET_NAMES

if TYPE_CHECKING:
    from engine.library import Library
    from engine.query import Hit
    from train.config import TrainConfig


def _printable(text: str) -> str:
    """File names that are not valid UTF-8 arrive as surrogate escapes; show them escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, default=str))


def handle_errors(func: Callable) -> Callable:
    """Turn the project's exceptions (and anything unexpected) into one-line messages."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except EngineError as exc:
            raise click.ClickException(_printable(str(exc))) from None
        except KeyboardInterrupt:
            click.echo("interrupted: everything committed so far is kept; run the command again to resume", err=True)
            sys.exit(130)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:
            if os.environ.get("ENGINE_DEBUG"):
                raise
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise click.ClickException(_printable(f"internal error: {type(exc).__name__}: {first} "
                                                  "(ENGINE_DEBUG=1 shows the traceback)")) from None

    return wrapper


class Context:
    """The global options, shared by every command."""

    def __init__(self, home: str | None, device: str, database_url: str | None) -> None:
        self.home = home
        self.device = device
        self.database_url = database_url

    def library(self) -> Library:
        from engine.library import Library

        return Library(self.home, device=self.device, database_url=self.database_url)


pass_ctx = click.make_pass_decorator(Context)


class _ProgressBar:
    """The one progress adapter: a tqdm bar on stderr fed with engine.progress.ProgressFn calls
    (done, total). Silent when stderr is not a terminal, unless ENGINE_PROGRESS forces it; a
    ``done`` that goes back down starts the bar again (a new phase)."""

    def __init__(self, desc: str, enabled: bool = True) -> None:
        self.desc, self.enabled = desc, enabled
        self.bar: Any = None

    def __call__(self, done: int, total: int | None) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.desc, unit="img", file=sys.stderr, dynamic_ncols=True,
                            disable=None if not os.environ.get("ENGINE_PROGRESS") else False)
        if done < self.bar.n:
            self.bar.reset(total=total)
        elif total != self.bar.total:
            self.bar.total = total
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _waiting() -> None:
    click.echo("another process is writing to this library; waiting for it to finish...", err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--home", envvar="ENGINE_HOME", type=click.Path(file_okay=False),
              help="Library folder (database, index, encoder). Default: $ENGINE_HOME or ~/.local/share/engine.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
              help="Where the encoder runs; auto picks CUDA when present.")
@click.option("--database-url", default=None,  # $ENGINE_DATABASE_URL is read by Library, not here
              help="Any SQLAlchemy URL for the metadata. Default: $ENGINE_DATABASE_URL, else SQLite in the library folder.")
@click.version_option(package_name="engine")
@click.pass_context
def main(ctx: click.Context, home: str | None, device: str, database_url: str | None) -> None:
    """Image retrieval with a Siamese encoder: ingest photos, query by image, compare pairs,
    train, evaluate and benchmark."""
    import logging

    logging.basicConfig(level=os.environ.get("ENGINE_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    ctx.obj = Context(home, device, database_url)


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--model", default=None, help="pretrained or a checkpoint; chosen when the library is new.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option("--workers", default=None, type=click.IntRange(0), help="Decode processes (default: cores/4, at least 1).")
@click.option("--exclude", multiple=True, help="Glob of names or paths to skip (repeatable).")
@click.option("--prune", is_flag=True, help="Forget indexed files under PATHS that are gone from disk.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@pass_ctx
@handle_errors
def ingest(obj: Context, paths: tuple[str, ...], model: str | None, batch_size: int, workers: int | None,
           exclude: tuple[str, ...], prune: bool, as_json: bool) -> None:
    """Index every image under PATHS (files or folders). Rerunning only indexes what changed."""
    from ingest.pipeline import IngestConfig, ingest_paths

    config = IngestConfig(batch_size=batch_size, workers=workers, exclude=tuple(exclude), prune=prune)
    bar = _ProgressBar("ingest", enabled=not as_json or bool(os.environ.get("ENGINE_PROGRESS")))
    try:
        report = ingest_paths(obj.library(), paths, config, model=model, progress=bar, on_wait=_waiting)
    finally:
        bar.close()
    if as_json:
        _echo_json(report.to_dict())
    else:
        click.echo(f"added {report.added}, unchanged {report.unchanged}, updated {report.updated}, "
                   f"duplicates {report.duplicates}, failed {len(report.failed)}, removed {report.removed} "
                   f"in {report.seconds:.1f} s ({report.images_per_second:.1f} images/s embedded)")
        for path, reason in report.failed[:20]:
            click.echo(_printable(f"  failed: {path}: {reason}"), err=True)
        if len(report.failed) > 20:
            click.echo(f"  ... {len(report.failed) - 20} more in {report.report_path}", err=True)
    touched = report.added + report.unchanged + report.updated + report.duplicates + report.removed
    if report.failed and touched == 0:
        sys.exit(1)


def _format_hit(hit: Hit) -> str:
    rec = hit.record
    facts = [f"{rec.width}x{rec.height}" if rec.width else "", rec.format or ""]
    if rec.taken_at:
        facts.append(rec.taken_at.strftime("%Y-%m-%d %H:%M"))
    if rec.camera:
        facts.append(rec.camera)
    verdict = "" if hit.similar is None else ("  similar" if hit.similar else "  different")
    return _printable(f"{hit.rank:4d}  {hit.score:.4f}  {hit.distance:.4f}  {hit.path}  ({' '.join(f for f in facts if f)})"
                      f"{verdict}")


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("-k", "k", default=10, show_default=True, type=click.IntRange(1), help="Neighbours per query.")
@click.option("--threshold", is_flag=False, flag_value="model", default=None,
              help="Mark hits within this L2 distance as similar; alone, the encoder's calibrated threshold.")
@click.option("--model", default=None, help="Refuse unless the library was built with this model.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per query, one per line.")
@click.option("--no-server", is_flag=True, help="Search in this process even when `engine serve` runs for this library.")
@pass_ctx
@handle_errors
def query(obj: Context, images: tuple[str, ...], k: int, threshold: str | float | None, model: str | None,
          as_json: bool, no_server: bool) -> None:
    """Find the K most similar indexed images to each IMAGE (files, or folders walked as ingest
    walks them). A running `engine serve` for this library answers when there is one."""
    from engine.query import search_library

    if threshold not in (None, "model"):
        try:
            threshold = float(threshold)
        except ValueError:
            raise click.BadParameter(f"{threshold!r} is not a number", param_hint="--threshold") from None
    results = None
    if not no_server and model is None:
        from engine.service.client import search_via_service

        results = search_via_service(obj.home, obj.database_url, images, k, threshold=threshold)
    if results is None:
        library = obj.library()
        if library.exists():  # an empty home is search_library's error to report
            if model is not None:
                library.check_model(model)
            if threshold == "model":
                threshold = library.encoder().decision_threshold
        results = search_library(library, images, k, threshold=threshold)
    failed = 0
    for result in results:
        if result.error:
            failed += 1
        if as_json:
            _echo_json(result.to_dict())
            continue
        if result.error:
            click.echo(_printable(f"error: {result.query}: {result.error}"), err=True)
            continue
        click.echo(_printable(f"query: {result.query}"))
        click.echo("rank  score   distance  path")
        for hit in result.hits:
            click.echo(_format_hit(hit))
    if failed and failed == len(results):
        sys.exit(1)


@main.command()
@click.argument("a", type=click.Path())
@click.argument("b", type=click.Path())
@click.option("--model", default=None, help="pretrained or a checkpoint (default: the library's encoder, else pretrained).")
@click.option("--threshold", type=float, default=None, help="L2 distance at or below which the pair is similar.")
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
        from engine.encoder import load_encoder, resolve_device
        from engine.query import compare_images

        library = obj.library()
        if model is None and library.exists():
            encoder = library.encoder()
        else:
            encoder = load_encoder(model or "pretrained", resolve_device(obj.device))
        result = compare_images(encoder, a, b, threshold=threshold)
    if as_json:
        _echo_json(result.to_dict())
    else:
        verdict = "similar" if result.similar else "different"
        click.echo(f"{verdict}  (distance {result.distance:.4f}, threshold {result.threshold:.4f})")


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
    for key, value in facts.items():
        if isinstance(value, dict):
            click.echo(f"{key}:")
            for k2, v2 in value.items():
                click.echo(_printable(f"  {k2}: {v2}"))
        else:
            click.echo(_printable(f"{key}: {value}"))


@main.command()
@click.option("--model", default=None, help="Re-embed every image with this encoder (pretrained or a checkpoint).")
@click.option("--index-type", default=None,
              help="FAISS factory string after IDMap2: Flat, HNSW32, IVF1024,Flat, IVF1024,PQ32 ...")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option("--workers", default=None, type=click.IntRange(0))
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
@handle_errors
def reindex(obj: Context, model: str | None, index_type: str | None, batch_size: int, workers: int | None,
            as_json: bool) -> None:
    """Rebuild the index from stored embeddings, or re-embed the library with another encoder."""
    from ingest.pipeline import IngestConfig, reindex_library

    bar = _ProgressBar("reindex", enabled=model is not None and not as_json)
    try:
        summary = reindex_library(obj.library(), model=model, factory=index_type,
                                  config=IngestConfig(batch_size=batch_size, workers=workers), progress=bar,
                                  on_wait=_waiting)
    finally:
        bar.close()
    if as_json:
        _echo_json(summary)
    else:
        click.echo(f"index {summary['index']}: {summary['vectors']} vectors; re-embedded {summary['reembedded']}, "
                   f"failed {summary['failed']} in {summary['seconds']:.1f} s")


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
@click.option("-k", "k", default=8, show_default=True, type=click.IntRange(1))
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Where to write the contact sheet (default: the library folder).")
@pass_ctx
@handle_errors
def demo(obj: Context, k: int, out_dir: str | None) -> None:
    """Ingest the shipped sample photos, query one that was held out, print the hits and write a
    contact sheet PNG. Works offline."""
    from ingest.demo import run_demo

    bar = _ProgressBar("demo ingest")
    try:
        result = run_demo(obj.library(), k=k, out_dir=out_dir, progress=bar)
    finally:
        bar.close()
    click.echo(f"indexed {result.indexed} sample photos ({result.report.added} new) into {result.home}")
    for res in result.queries:
        click.echo(_printable(f"query: {res.query}"))
        click.echo("rank  score   distance  path")
        for hit in res.hits:
            click.echo(_format_hit(hit))
    click.echo(f"same-class hits in the top {k}: {result.same_class}/{result.total_hits}")
    click.echo(f"contact sheet: {result.sheet}")


@main.command()
@click.option("--repair", is_flag=True, help="Fix what can be fixed, saying what was done.")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
@handle_errors
def doctor(obj: Context, repair: bool, as_json: bool) -> None:
    """Check database against index against disk; with --repair, fix what can be fixed."""
    from ingest.doctor import check_library

    report = check_library(obj.library(), repair=repair, on_wait=_waiting)
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
        with open(out_path, "w") as fh:
            json.dump(results, fh, indent=2, default=str)
    if as_json:
        _echo_json(results)
    else:
        click.echo(format_bench(results))


def _parse_ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise click.BadParameter("use comma-separated integers, e.g. 1,5,10") from None
    if not ks or min(ks) < 1:
        raise click.BadParameter("K values must be positive")
    return ks


@main.command("eval")
@click.argument("dataset", type=click.Path(exists=True))
@click.option("--model", "models", multiple=True, default=("pretrained",), show_default=True,
              help="pretrained or a checkpoint; repeat to compare models side by side.")
@click.option("--protocol", default="loo", show_default=True, type=click.Choice(["loo", "split", "oneshot"]),
              help="loo: every image queries all others; split: per-class query/gallery split; "
                   "oneshot: one gallery image per class (N-way one-shot).")
@click.option("--k", "ks", default="1,5,10", show_default=True, help="Comma-separated K for Recall@K / precision@K.")
@click.option("--max-per-class", default=None, type=click.IntRange(1), help="Cap images per class (seeded).")
@click.option("--pairs", "n_pairs", default=5000, show_default=True, type=click.IntRange(2),
              help="Balanced pairs sampled for verification figures.")
@click.option("--threshold", default=None, type=float, help="Distance threshold for verification (default: the model's).")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option("--workers", default=None, type=click.IntRange(0))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Write plots, metrics.json and report.md here.")
@click.option("--json", "as_json", is_flag=True, help="Every figure as JSON, one object per model.")
@pass_ctx
@handle_errors
def eval_(obj: Context, dataset: str, models: tuple[str, ...], protocol: str, ks: str, max_per_class: int | None,
          n_pairs: int, threshold: float | None, batch_size: int, workers: int | None, seed: int, out_dir: str | None,
          as_json: bool) -> None:
    """Retrieval and verification metrics of one or more models on DATASET: a folder-per-class tree
    or a pair CSV (img_a,img_b,label)."""
    from engine.encoder import resolve_device
    from engine.evaluate import EvalConfig, evaluate_models, format_table

    config = EvalConfig(protocol=protocol, ks=_parse_ks(ks), batch_size=batch_size, workers=workers,
                        max_per_class=max_per_class, n_pairs=n_pairs, seed=seed, threshold=threshold,
                        device=str(resolve_device(obj.device)))
    bar = _ProgressBar("embed", enabled=not as_json)
    try:
        reports = evaluate_models(dataset, list(models), config, out_dir, progress=bar)
    finally:
        bar.close()
    if as_json:
        for report in reports:  # the same objects metrics.json lists under "reports"
            _echo_json(report.to_dict())
        return
    click.echo(format_table(reports))
    worst = reports[0].per_class[:5]
    if worst:
        click.echo("worst classes (" + reports[0].name + "): " +
                   ", ".join(f"{row.get('class', row.get('label'))} {row.get('map@r') or 0:.3f}" for row in worst))
    if out_dir:
        click.echo(f"report: {os.path.join(out_dir, 'report.md')}")


# Parameters of ``engine train`` that are its own; every other one names a TrainConfig field.
_TRAIN_OWN = frozenset({"data", "out_dir", "as_json", "resume"})


def _train_config_options(command: click.Command) -> click.Command:
    """Check, when the command is defined, that each of its options other than ``_TRAIN_OWN`` is a
    TrainConfig field: a renamed field then fails on import (and in every test), never in a user's run."""
    unknown = sorted(p.name or "" for p in command.params if p.name not in _TRAIN_OWN and p.name not in TRAIN_FIELDS)
    if unknown:
        raise TypeError(f"engine train options without a TrainConfig field: {', '.join(unknown)}")
    return command


def _train_config(device: str, options: dict[str, Any]) -> TrainConfig:
    """The TrainConfig of ``engine train``'s options: the ones given (not None), and the global --device."""
    from train.config import TrainConfig

    return TrainConfig(device=device, **{k: v for k, v in options.items() if v is not None})


@_train_config_options
@main.command()
@click.argument("data", type=click.Path(exists=True))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Run folder to write.")
@click.option("--preset", type=click.Choice(PRESET_NAMES), default=None,
              help="cpu-quick: useful in <= 20 min on 2 CPU cores; gpu: the defaults.")
@click.option("--loss", type=click.Choice(LOSSES), default=None)
@click.option("--miner", type=click.Choice(MINERS), default=None)
@click.option("--margin", type=float, default=None, help="Loss margin on the L2 distance.")
@click.option("--epochs", type=click.IntRange(0), default=None)
@click.option("--batch-size", type=click.IntRange(2), default=None)
@click.option("--classes-per-batch", type=click.IntRange(2), default=None, help="P of a P x K batch.")
@click.option("--images-per-class", type=click.IntRange(2), default=None, help="K of a P x K batch.")
@click.option("--lr", type=float, default=None, help="Head learning rate (Adam).")
@click.option("--backbone-lr", type=float, default=None, help="Backbone learning rate (default lr/10).")
@click.option("--weight-decay", type=float, default=None)
@click.option("--warmup-epochs", type=float, default=None)
@click.option("--dim", type=click.IntRange(2), default=None, help="Projection head size (default: backbone width).")
@click.option("--backbone", default=None, help="Any timm model name (default tf_efficientnet_lite0).")
@click.option("--pretrained/--no-pretrained", default=None, help="Start from ImageNet weights (default) or random.")
@click.option("--weights", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Start from this checkpoint or weights file.")
@click.option("--image-size", type=click.IntRange(16), default=None)
@click.option("--freeze-epochs", type=click.IntRange(0), default=None, help="Keep the backbone frozen this long.")
@click.option("--train-stages", type=click.IntRange(0), default=None, help="Train only the last N backbone stages.")
@click.option("--val-classes", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Share of classes held out for validation (split by class, seeded).")
@click.option("--val", default=None, type=click.Path(exists=True), help="A separate validation folder or pair CSV.")
@click.option("--val-group-sep", default=None,
              help="Hold out class groups: classes whose names share the part before SEP (e.g. '__' for alphabets).")
@click.option("--max-per-class", type=click.IntRange(2), default=None)
@click.option("--workers", type=click.IntRange(0), default=None)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last epoch.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_ctx
@handle_errors
def train(obj: Context, data: str, out_dir: str, as_json: bool, resume: bool, **options: Any) -> None:
    """Fine-tune a Siamese encoder on DATA: a folder-per-class tree or a pair CSV (img_a,img_b,label).
    Writes checkpoint.pt (with the calibrated threshold), metrics.jsonl and plots to --out."""
    from train.loop import train as run_training
    from train.progress import TrainProgress

    config = _train_config(obj.device, options)
    view = None if as_json else TrainProgress(file=sys.stderr, resume=resume)
    result = run_training(data, out_dir, config, progress=view, resume=resume,
                          on_epoch=view.epoch_end if view is not None else None)
    if as_json:
        _echo_json(result.to_dict())
        return
    best = result.best_metrics
    figures = ", ".join(f"{k} {best[k]:.4f}" for k in ("recall@1", "recall@5", "map@r", "roc_auc", "pair_accuracy")
                        if isinstance(best.get(k), (int, float)))
    click.echo(f"best epoch {result.best_epoch} ({result.select_metric}): {figures}")
    if result.threshold is not None:
        click.echo(f"calibrated threshold (L2 distance): {result.threshold:.4f}")
    click.echo(f"checkpoint: {result.checkpoint}")
    click.echo(f"run folder: {result.out_dir} ({result.wall_s:.0f} s)")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback lets other machines in (set --token then).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="0: any free port.")
@click.option("--token", envvar="ENGINE_TOKEN", default=None,
              help="Require `Authorization: Bearer TOKEN` on every API request (default: $ENGINE_TOKEN).")
@click.option("--max-upload-mb", default=20.0, show_default=True, type=click.FloatRange(0, min_open=True),
              help="Largest image file accepted, in MiB (refused while it is read).")
@click.option("--workers", default=None, type=click.IntRange(1),
              help="Inference threads (default: one per four cores, at most 4).")
@pass_ctx
@handle_errors
def serve(obj: Context, host: str, port: int, token: str | None, max_upload_mb: float, workers: int | None) -> None:
    """Serve the library: a web page for searching it by photo and a JSON API (docs at /docs).
    `engine query` and `engine compare` use it while it runs. Ctrl+C stops it."""
    try:
        from engine.service.server import run_server
        from engine.service.settings import ServiceConfig
    except ImportError as exc:
        raise EngineError(f"engine serve needs {exc.name}: pip install fastapi uvicorn python-multipart") from None

    config = ServiceConfig(host=host, port=port, token=token or None,
                           max_upload_bytes=int(max_upload_mb * 1024 * 1024), workers=workers)
    if not config.loopback and not config.token:
        click.echo(f"warning: listening on {host} without --token: anyone who can reach this machine can search "
                   "the library and see its file names", err=True)

    def ready(address: Any) -> None:
        click.echo(f"serving {address.url}/ (API docs at {address.url}/docs); Ctrl+C stops", err=True)

    run_server(obj.library(), config, on_ready=ready)
