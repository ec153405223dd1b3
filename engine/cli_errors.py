"""How the ``engine`` command line reports: terminal-safe text, strict JSON lines, and every
exception turned into a one-line message with a non-zero exit (``handle_errors``); a closed
stdout pipe ends a command quietly. Standard library, click and engine.output only, so
``engine --help`` stays instant.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import stat
import sys
from typing import Any, Callable

import click

from engine.errors import EngineError
from engine.output import printable, to_json_bytes


def _printable(text: object) -> str:
    """Text output: one terminal-safe line (engine.output.printable: controls, escape sequences
    and undecodable bytes shown as visible escapes)."""
    return printable(text)


def _echo_json(obj: Any) -> None:
    """One JSON record on one line of stdout, strict UTF-8 whatever the locale (engine.output)."""
    click.echo(to_json_bytes(obj))


def _output_closed() -> None:
    """The reader of stdout went away (``engine info | head``): stop quietly, as Unix tools do,
    with SIGPIPE's exit status, and keep Python from complaining when it flushes stdout at exit."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    sys.exit(141)


def _stdout_is_pipe() -> bool:
    try:
        mode = os.fstat(sys.stdout.fileno()).st_mode
    except (OSError, ValueError, AttributeError):
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def _environment_message(exc: BaseException) -> str | None:
    """A one-line message for failures that come from the machine or the setup, not from a bug:
    a file system error (disk full, read-only, permission), a database that cannot be reached or
    written, memory running out. None for anything else."""
    if isinstance(exc, OSError):
        where = f": {os.fsdecode(exc.filename)}" if exc.filename else ""
        text = f"{exc.strerror or exc}{where}"
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            text += "; free some space and run the command again (everything committed so far is kept)"
        return text
    if isinstance(exc, MemoryError):
        return f"out of memory{': ' + str(exc) if str(exc) else ''}"
    store = sys.modules.get("db.store")
    if store is not None and isinstance(exc, getattr(store, "StoreError", ())):
        return str(exc)
    sa_exc = sys.modules.get("sqlalchemy.exc")
    if sa_exc is not None and isinstance(exc, sa_exc.SQLAlchemyError):
        orig = getattr(exc, "orig", None)
        return f"database error: {orig if orig is not None else exc}"
    return None


def handle_errors(func: Callable) -> Callable:
    """Turn the project's exceptions (and anything unexpected) into one-line messages on stderr
    and a non-zero exit; a closed stdout pipe ends the command quietly."""

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
        except BrokenPipeError:
            if _stdout_is_pipe():
                _output_closed()
            raise click.ClickException("broken pipe") from None
        except Exception as exc:
            if os.environ.get("ENGINE_DEBUG"):
                raise
            known = _environment_message(exc)
            if known is not None:
                raise click.ClickException(_printable(known)) from None
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise click.ClickException(_printable(f"internal error: {type(exc).__name__}: {first} "
                                                  "(ENGINE_DEBUG=1 shows the traceback)")) from None

    return wrapper


class _PrintableFormatter(logging.Formatter):
    """Formats as ``inner`` does, then makes the record one terminal-safe line."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        return _printable(self.inner.format(record))
