"""The benchmarks' own error: a measurement that did not do what it was meant to measure."""

from __future__ import annotations

from engine.errors import EngineError


class BenchError(EngineError):
    """A benchmark's own check failed (a query found nothing, a child process died, a count is off)."""
