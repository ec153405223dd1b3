"""Crash-test hooks: named points where a crash matters, which the environment can turn into a
``kill -9`` of this process. Inert unless ENGINE_FAULT or ENGINE_FAULT_DELAY is set.

ENGINE_FAULT=NAME:N kills this process with SIGKILL (exactly as ``kill -9``) the Nth time NAME is
reached (N defaults to 1); ENGINE_FAULT_DELAY=SECONDS sleeps at every ``batch-committed`` (to widen
the window in which another process can watch an ingest). The points are ``batch-embedded``,
``commit`` (inside the database commit), ``batch-committed``, ``index-state-written`` (an index
save has recorded the new file in ``index.json``, which has not yet replaced the old one) and
``index-replaced`` (the new index file in place); in
``engine reindex``, ``reindex-staged`` (a batch of new vectors committed beside the live ones),
``reindex-before-switch``, ``reindex-switched`` (database switched, encoder file not yet renamed),
``reindex-encoder-moved`` (renamed, index not yet rebuilt), ``reindex-index-built`` and
``reindex-index-saved`` (a new index type saved, not yet recorded as the library's type).
"""

from __future__ import annotations

import os
import signal
import time

FAULT_ENV = "ENGINE_FAULT"
DELAY_ENV = "ENGINE_FAULT_DELAY"

_hits: dict[str, int] = {}


def _target() -> tuple[str, int] | None:
    """(point name, which visit is fatal) from ENGINE_FAULT, or None when unset."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    name, _, nth = spec.partition(":")
    return name, int(nth or 1)


def fault_armed(name: str) -> bool:
    """True when ENGINE_FAULT names this point (so a caller can install a hook it would not
    otherwise pay for, such as a listener on every database commit)."""
    target = _target()
    return target is not None and target[0] == name


def fault_point(name: str) -> None:
    """Mark the point ``name``: kills the process on its Nth visit when ENGINE_FAULT=NAME:N asks,
    sleeps when ENGINE_FAULT_DELAY is set and ``name`` is ``batch-committed``; otherwise nothing."""
    delay = os.environ.get(DELAY_ENV)
    if delay and name == "batch-committed":
        time.sleep(float(delay))
    target = _target()
    if target is None or target[0] != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= target[1]:
        os.kill(os.getpid(), signal.SIGKILL)
