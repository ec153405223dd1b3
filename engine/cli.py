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
from typing import Any, Callable

import click

from engine.errors import EngineError


def _printable(text: str) -> str:
    """File names that are not valid UTF-8 arrive as surrogate escapes; show them escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, default=str))


def handle_errors(func: Callable) -> Callable:
    """Turn the project's exceptions (and anything unexpected) into one-line messages."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
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
    def __init__(self, home: str | None, device: str, database_url: str | None):
        self.home = home
        self.device = device
        self.database_url = database_url

    def library(self):
        from engine.library import Library

        return Library(self.home, device=self.device, database_url=self.database_url)


pass_ctx = click.make_pass_decorator(Context)


class _Progress:
    """A tqdm bar on stderr fed with (done, total) callbacks; silent when stderr is not a terminal
    unless forced."""

    def __init__(self, desc: str, enabled: bool = True):
        self.desc, self.enabled, self.bar = desc, enabled, None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.desc, unit="img", file=sys.stderr, dynamic_ncols=True,
                            disable=None if not os.environ.get("ENGINE_PROGRESS") else False)
            self.bar.update(done)
            return
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
@click.option("--database-url", envvar="ENGINE_DATABASE_URL", default=None,
              help="Any SQLAlchemy URL for the metadata (default: SQLite in the library folder).")
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
def ingest(obj: Context, paths, model, batch_size, workers, exclude, prune, as_json) -> None:
    """Index every image under PATHS (files or folders). Rerunning only indexes what changed."""
    from ingest.pipeline import IngestConfig, ingest_paths

    config = IngestConfig(batch_size=batch_size, workers=workers, exclude=tuple(exclude), prune=prune)
    bar = _Progress("ingest", enabled=not as_json or bool(os.environ.get("ENGINE_PROGRESS")))
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


def _format_hit(hit) -> str:
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
@pass_ctx
@handle_errors
def query(obj: Context, images, k, threshold, model, as_json) -> None:
    """Find the K most similar indexed images to each IMAGE (files or folders)."""
    from engine.files import find_images
    from engine.preprocess import image_suffixes
    from engine.query import search_library

    library = obj.library()
    if not library.exists():
        raise EngineError(f"no index in {library.paths.home} yet; run `engine ingest PATH` first")
    if model is not None:
        library.check_model(model)
    if threshold == "model":
        from engine.encoder import DEFAULT_THRESHOLD

        calibrated = library.encoder().threshold
        threshold = DEFAULT_THRESHOLD if calibrated is None else calibrated
    elif threshold is not None:
        try:
            threshold = float(threshold)
        except ValueError:
            raise click.BadParameter(f"{threshold!r} is not a number", param_hint="--threshold") from None
    found = find_images(images, image_suffixes())
    if found.missing and not found.files:
        raise EngineError(_printable(f"{found.missing[0][0]}: {found.missing[0][1]}"))
    results = search_library(library, found.files, k, threshold=threshold)
    failed = 0
    for path, reason in found.missing:
        failed += 1
        if as_json:
            _echo_json({"query": path, "hits": [], "error": reason})
        else:
            click.echo(_printable(f"error: {path}: {reason}"), err=True)
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
    if failed and failed == len(results) + len(found.missing):
        sys.exit(1)


@main.command()
@click.argument("a", type=click.Path())
@click.argument("b", type=click.Path())
@click.option("--model", default=None, help="pretrained or a checkpoint (default: the library's encoder, else pretrained).")
@click.option("--threshold", type=float, default=None, help="L2 distance at or below which the pair is similar.")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
@handle_errors
def compare(obj: Context, a, b, model, threshold, as_json) -> None:
    """Say whether images A and B are similar, by the calibrated distance threshold."""
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
def info(obj: Context, as_json) -> None:
    """Counts, model, dimensions, index type, paths and sizes of the library."""
    from engine.status import describe_library

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
def reindex(obj: Context, model, index_type, batch_size, workers, as_json) -> None:
    """Rebuild the index from stored embeddings, or re-embed the library with another encoder."""
    from ingest.pipeline import IngestConfig, reindex_library

    bar = _Progress("reindex", enabled=model is not None and not as_json)
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
def remove(obj: Context, paths) -> None:
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
def demo(obj: Context, k, out_dir) -> None:
    """Ingest the shipped sample photos, query one that was held out, print the hits and write a
    contact sheet PNG. Works offline."""
    from ingest.demo import run_demo

    bar = _Progress("demo ingest")
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
def doctor(obj: Context, repair, as_json) -> None:
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
    from ingest.bench import BenchConfig, format_bench, run_bench

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
def eval_(obj: Context, dataset, models, protocol, ks, max_per_class, n_pairs, threshold, batch_size, workers, seed,
          out_dir, as_json) -> None:
    """Retrieval and verification metrics of one or more models on DATASET: a folder-per-class tree
    or a pair CSV (img_a,img_b,label)."""
    from engine.encoder import resolve_device
    from engine.evaluate import EvalConfig, evaluate_models, format_table

    config = EvalConfig(protocol=protocol, ks=_parse_ks(ks), batch_size=batch_size, workers=workers,
                        max_per_class=max_per_class, n_pairs=n_pairs, seed=seed, threshold=threshold,
                        device=str(resolve_device(obj.device)))
    bar = _Counter("embed", enabled=not as_json)
    try:
        reports = evaluate_models(dataset, list(models), config, out_dir, progress=bar)
    finally:
        bar.close()
    if as_json:
        for report in reports:
            _echo_json(dict(report.metrics, model=report.model, dataset=report.dataset, protocol=report.protocol,
                            images=report.images, classes=report.classes, per_class=report.per_class,
                            failures=len(report.failures), files=report.files))
        return
    click.echo(format_table(reports))
    worst = reports[0].per_class[:5]
    if worst:
        click.echo("worst classes (" + reports[0].name + "): " +
                   ", ".join(f"{row.get('class', row.get('label'))} {row.get('map@r') or 0:.3f}" for row in worst))
    if out_dir:
        click.echo(f"report: {os.path.join(out_dir, 'report.md')}")


class _Counter:
    """A tqdm bar fed with increments."""

    def __init__(self, desc: str, enabled: bool = True):
        self.desc, self.enabled, self.bar = desc, enabled, None

    def __call__(self, n: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(desc=self.desc, unit="img", file=sys.stderr, dynamic_ncols=True, disable=None)
        self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@main.command()
@click.argument("data", type=click.Path(exists=True))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Run folder to write.")
@click.option("--preset", type=click.Choice(["cpu-quick", "gpu"]), default=None,
              help="cpu-quick: useful in <= 20 min on 2 CPU cores; gpu: the defaults.")
@click.option("--loss", type=click.Choice(["contrastive", "triplet", "multi-similarity"]), default=None)
@click.option("--miner", type=click.Choice(["all", "batch-hard", "semi-hard"]), default=None)
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
def train(obj: Context, data, out_dir, as_json, resume, **options) -> None:
    """Fine-tune a Siamese encoder on DATA: a folder-per-class tree or a pair CSV (img_a,img_b,label).
    Writes checkpoint.pt (with the calibrated threshold), metrics.jsonl and plots to --out."""
    import dataclasses

    from train.loop import TqdmProgress, TrainConfig
    from train.loop import train as run_training

    given = {k: v for k, v in options.items() if v is not None}
    config = dataclasses.replace(TrainConfig(), device=obj.device, **given)
    result = run_training(data, out_dir, config, progress=None if as_json else TqdmProgress(file=sys.stderr),
                          resume=resume)
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
