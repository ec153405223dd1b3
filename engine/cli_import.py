"""``engine import DIR``: precomputed embeddings (``engine-shards/1``) into the library. The
importer (numpy, pyarrow, the store) is imported when the command runs."""

from __future__ import annotations

import sys

import click

from engine.cli_context import Context, pass_ctx, waiting
from engine.cli_errors import _echo_json, _printable, handle_errors
from engine.console import Progress


@click.command("import")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--model", default=None,
              help="New library: the encoder the shards were embedded with (pretrained, the default, or a "
                   "checkpoint); its identity must be the manifest's. Existing library: refuse unless it is this one.")
@click.option("--batch-size", default=5000, show_default=True, type=click.IntRange(1),
              help="Rows per database transaction.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@pass_ctx
@handle_errors
def import_shards_command(obj: Context, folder: str, model: str | None, batch_size: int, as_json: bool) -> None:
    """Import precomputed embeddings from FOLDER (manifest.json + NAME.npy + NAME.parquet per
    shard, the engine-shards/1 format). Paths the library already holds are skipped, so rerunning
    is a no-op; a bad shard is refused whole and the others are imported."""
    from ingest.importer import ImportConfig, import_shards

    bar = Progress("import", unit="rows", enabled=not as_json, waiting="checking the shards' encoder...")
    try:
        report = import_shards(obj.library(), folder, ImportConfig(batch_size=batch_size), model=model,
                               progress=bar, on_wait=waiting)
    finally:
        bar.close()
    if as_json:
        _echo_json(report.to_dict())
    else:
        click.echo(f"added {report.added}, skipped {report.skipped} (already in the library), "
                   f"{report.imported} of {report.shards} shard(s) imported in {report.seconds:.1f} s"
                   + (f" ({report.rows_per_second:,.0f} rows/s)" if report.added else ""))
        for file, reason in report.failed:
            click.echo(_printable(f"  refused: {file}: {reason}"), err=True)
    if report.failed:
        sys.exit(1)
