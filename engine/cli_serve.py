"""``engine serve``: the search service and its web page (FastAPI, imported when the command runs)."""

from __future__ import annotations

from typing import Any

import click

from engine.cli_context import Context, pass_ctx
from engine.cli_errors import handle_errors
from engine.cli_params import Number
from engine.errors import EngineError


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback lets other machines in (set --token then).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="0: any free port.")
@click.option("--token", envvar="ENGINE_TOKEN", default=None,
              help="Require `Authorization: Bearer TOKEN` on every API request (default: $ENGINE_TOKEN).")
@click.option("--max-upload-mb", default=20.0, show_default=True, type=Number(0, open_min=True),
              help="Largest image file accepted, in MiB (refused while it is read).")
@click.option("--workers", default=None, type=click.IntRange(1),
              help="Inference threads (default: one per core, at most 8).")
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
