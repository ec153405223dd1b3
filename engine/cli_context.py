"""What every ``engine`` command receives: the global options (``Context``) and the decorator that
passes them in. Kept apart from the group so that each command module can import it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from engine.library import Library


class Context:
    """The global options, shared by every command."""

    def __init__(self, home: str | None, device: str, database_url: str | None, read_only: bool = False) -> None:
        self.home = home
        self.device = device
        self.database_url = database_url
        self.read_only = read_only

    def library(self) -> Library:
        from engine.library import Library

        # without --read-only the library still opens read-only where its files cannot be written
        return Library(self.home, device=self.device, database_url=self.database_url,
                       read_only=True if self.read_only else None)


pass_ctx = click.make_pass_decorator(Context)


def waiting() -> None:
    """Say, on stderr, that another writer holds the library's lock."""
    click.echo("another process is writing to this library; waiting for it to finish...", err=True)
