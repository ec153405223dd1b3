"""Parameter types of the ``engine`` command line: counts, distance thresholds and worker counts,
checked while the command line is parsed so that a mistake is a one-line usage error.

Torch-free and light: imported when ``engine`` starts.
"""

from __future__ import annotations

import math
import re
from typing import Any

import click


# The capture dates that query filters take (EXIF times are local, without a zone).
DATE = click.DateTime(["%Y-%m-%d", "%Y-%m-%d %H:%M", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S"])


class Count(click.ParamType):
    """A whole number >= ``minimum`` written as digits: ``1e11``, ``2.5``, ``0`` and ``-3`` are
    refused with the reason."""

    name = "integer"

    def __init__(self, minimum: int = 1) -> None:
        self.minimum = minimum

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        else:
            text = str(value).strip()
            if not re.fullmatch(r"[+-]?\d+", text):
                self.fail(f"{value!r} is not a whole number", param, ctx)
            number = int(text)
        if number < self.minimum:
            self.fail(f"{number} is less than {self.minimum}", param, ctx)
        return number


class Number(click.ParamType):
    """A finite number (``nan`` and ``inf`` are refused, unlike click.FloatRange) within
    [minimum, maximum]; ``open_min``/``open_max`` exclude the bound itself."""

    name = "number"

    def __init__(self, minimum: float | None = None, maximum: float | None = None, *, open_min: bool = False,
                 open_max: bool = False) -> None:
        self.minimum, self.maximum, self.open_min, self.open_max = minimum, maximum, open_min, open_max

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        low, high = self.minimum, self.maximum
        if low is not None and (number <= low if self.open_min else number < low):
            self.fail(f"{number:g} is not {'above' if self.open_min else 'at least'} {low:g}", param, ctx)
        if high is not None and (number >= high if self.open_max else number > high):
            self.fail(f"{number:g} is not {'below' if self.open_max else 'at most'} {high:g}", param, ctx)
        return number


class Threshold(click.ParamType):
    """An L2 distance: a finite number >= 0 (``nan``, ``inf`` and negative numbers are refused), or
    the word ``model`` (the encoder's calibrated threshold) when ``allow_model``."""

    name = "distance"

    def __init__(self, allow_model: bool = False) -> None:
        self.allow_model = allow_model

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float | str:
        if self.allow_model and value == "model":
            return "model"
        from engine.errors import EngineError
        from engine.query import check_threshold

        try:
            return check_threshold(value)
        except EngineError as exc:
            self.fail(str(exc), param, ctx)


def cap_workers_option(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    """Option callback for ``--workers``: cap at what the machine holds, saying so on stderr."""
    if value is None or value == 0:
        return value
    from engine.resources import cap_workers

    workers, reason = cap_workers(value)
    if reason:
        click.echo(f"note: {reason}", err=True)
    return workers


def parse_ks(text: str) -> tuple[int, ...]:
    """``engine eval --k``: comma-separated cut-offs, e.g. ``1,5,10`` -> (1, 5, 10)."""
    try:
        ks = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise click.BadParameter("use comma-separated integers, e.g. 1,5,10") from None
    if not ks or min(ks) < 1:
        raise click.BadParameter("K values must be positive")
    return ks
