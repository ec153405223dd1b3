"""One ``engine query`` in a fresh process, timed by phase:

    python -m bench.cold_query HOME IMAGE [--k 10] [--device cpu]

prints one JSON object of seconds per phase. The query is the real one: ``Library`` and
``search_library``, called as the ``engine query`` command calls them. Phases are measured by
wrapping the engine's own functions for the length of that one call (``PhaseClock``), never by
redoing their work, so what is timed is what runs; time the probes do not cover is ``other_s``,
which grows if the query path changes under them.

``bench.query.bench_cold_query`` starts this module in a child process and adds the
interpreter's start-up, which only the parent can see.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import os
import sys
import time
from collections import defaultdict
from typing import Any, Callable, Iterator, Sequence

# What ``engine query`` imports before it looks at a query: the CLI module, the engine modules it
# opens the library and searches with, and the libraries they pull in. Imported first so that their
# cost is one phase of its own. What the query imports only when it needs it (torch with
# engine.embedding for a query file that is not indexed, timm with engine.encoder when the model is
# built) is timed within the phase that imports it; ``LAZY`` says which of those were imported.
IMPORTS = ("engine.cli", "engine.library", "engine.query", "engine.filters", "engine.views", "engine.index",
           "db.store", "numpy", "faiss", "sqlalchemy", "PIL.Image")
LAZY = ("torch", "timm", "torchvision", "torch._dynamo", "engine.embedding", "engine.encoder", "engine.scripted")

# (phase, module, class or None for a module function, attribute): the engine's own functions whose
# time is each phase. A property is timed through its getter.
PROBES = (
    ("open_s", "engine.library", "Library", "store"),  # the database opens on first access
    ("index_load_s", "engine.library", "Library", "open_index"),
    ("model_load_s", "engine.library", "Library", "encoder"),
    # query_encoder: the TorchScript copy read, checked and loaded (or written when stale); the
    # eager encoder it falls back to is model_load_s
    ("script_load_s", "engine.library", "Library", "query_encoder"),
    ("embed_s", "engine.query", None, "embed_queries"),  # decode + preprocess + forward
    ("search_s", "engine.index", "VectorIndex", "search"),
    ("metadata_s", "db.store", "MetadataStore", "get_images"),
)


class PhaseClock:
    """Exclusive wall time per phase of wrapped functions: time spent in a wrapped function called
    from another wrapped one counts for the inner phase only, so the phases add up."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._inner: list[float] = []  # per active wrapped call: time spent in wrapped calls below it

    def wrap(self, phase: str, fn: Callable) -> Callable:
        """``fn`` with its exclusive time added to ``phase`` on every call."""
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            self._inner.append(0.0)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - t0
                self.seconds[phase] += elapsed - self._inner.pop()
                if self._inner:
                    self._inner[-1] += elapsed

        return timed

    @contextlib.contextmanager
    def installed(self, probes: Sequence[tuple[str, str, str | None, str]] = PROBES) -> Iterator["PhaseClock"]:
        """Replace each probed function by its timed wrapper for the block, then put it back."""
        undo: list[tuple[Any, str, Any]] = []
        try:
            for phase, module_name, class_name, attr in probes:
                owner = importlib.import_module(module_name)
                if class_name is not None:
                    owner = getattr(owner, class_name)
                original = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
                if isinstance(original, property):
                    timed = property(self.wrap(phase, original.fget), original.fset, original.fdel, original.__doc__)
                else:
                    timed = self.wrap(phase, original)
                setattr(owner, attr, timed)
                undo.append((owner, attr, original))
            yield self
        finally:
            for owner, attr, original in reversed(undo):
                setattr(owner, attr, original)


def measure_cold_query(home: str | os.PathLike, image: str | os.PathLike, *, k: int = 10,
                       device: str = "cpu") -> dict[str, Any]:
    """Import what ``engine query`` needs, then answer one query of ``image`` against the library
    in ``home`` through ``search_library``, timed by phase (seconds): ``import_s``, then the
    ``PROBES`` phases, ``other_s`` (the rest of ``search_library``), ``query_s`` (all of it),
    ``in_process_s`` (imports + query), ``hits`` and ``imported`` (which of ``LAZY`` the query
    imported). Cold only in a fresh process. Raises
    BenchError when the query reports an error or finds nothing."""
    t0 = time.perf_counter()
    for name in IMPORTS:
        importlib.import_module(name)
    import_s = time.perf_counter() - t0
    from bench.errors import BenchError
    from engine.library import Library
    from engine.query import search_library

    clock = PhaseClock()
    with clock.installed():
        t1 = time.perf_counter()
        library = Library(home, device=device)
        try:
            results = search_library(library, [os.fspath(image)], k)
        finally:
            library.close()
        query_s = time.perf_counter() - t1
    errors = [r.error for r in results if r.error]
    if errors or not results or not results[0].hits:
        raise BenchError(f"the cold query of {image} failed: {errors[0] if errors else 'no hits'}")
    phases = {phase: clock.seconds.get(phase, 0.0) for phase, *_ in PROBES}
    return {"import_s": import_s, **phases, "other_s": max(0.0, query_s - sum(phases.values())),
            "query_s": query_s, "in_process_s": time.perf_counter() - t0, "hits": len(results[0].hits),
            "imported": [name for name in LAZY if name in sys.modules]}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the child process: one JSON line on stdout, or one error line on stderr
    and exit status 1."""
    parser = argparse.ArgumentParser(prog="python -m bench.cold_query", description=__doc__.splitlines()[0])
    parser.add_argument("home")
    parser.add_argument("image")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    from engine.errors import EngineError

    try:
        split = measure_cold_query(args.home, args.image, k=args.k, device=args.device)
    except EngineError as exc:
        print(f"cold query: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(split))
    return 0


if __name__ == "__main__":
    sys.exit(main())
