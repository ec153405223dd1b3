"""``engine settings``: show a library's search settings, or change one (kept in its database)."""

from __future__ import annotations

from dataclasses import replace

import click

from engine.cli_context import Context, pass_ctx
from engine.cli_errors import _echo_json, handle_errors

# name on the command line -> (Expansion field, parser)
_SETTINGS = {"expand": ("n", int), "expand-alpha": ("alpha", float)}


@click.command()
@click.argument("name", required=False, type=click.Choice(sorted(_SETTINGS)))
@click.argument("value", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the settings as one JSON object.")
@pass_ctx
@handle_errors
def settings(obj: Context, name: str | None, value: str | None, as_json: bool) -> None:
    """Show the library's search settings, or set NAME to VALUE. expand: stored neighbours that
    expand each query (alpha-QE, then the shortlist re-ranked; 0 turns it off); expand-alpha: the
    power of their similarity that weighs them. `engine query --expand N` overrides it once."""
    from engine.errors import EngineError, IndexMissingError
    from engine.expansion import library_expansion, save_library_expansion

    library = obj.library()
    if not library.exists():
        raise IndexMissingError(f"no library in {library.paths.home} yet; run `engine ingest PATH` first")
    current = library_expansion(library)
    if name is not None:
        if value is None:
            raise click.UsageError(f"give a value for {name}")
        field, parse = _SETTINGS[name]
        try:
            parsed = parse(value)
        except ValueError:
            kind = "a whole number" if parse is int else "a number"
            raise EngineError(f"{name} takes {kind}, not {value!r}") from None
        current = replace(current, **{field: parsed})  # validated by Expansion
        save_library_expansion(library, current)
    facts = {"expand": current.n, "expand-alpha": current.alpha}
    if as_json:
        _echo_json(facts)
    else:
        for key, val in facts.items():
            click.echo(f"{key}: {val:g}")
