"""The ``service.json`` record a running ``engine serve`` leaves in its library home, so that
``engine query`` and ``engine compare`` can find it. Written atomically once the socket listens,
removed on shutdown; a record left by a process that died is recognised by its pid and ignored.

It never holds the token, only whether one is required.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from engine.atomic import write_atomic

ADDRESS_FILE = "service.json"


def database_fingerprint(database_url: str | None) -> str:
    """A short hash naming the database a library uses (``""`` for the default file), so a client
    with another ``--database-url`` does not use a service over a different database. Hashed, so
    a password in the URL never reaches the file."""
    return hashlib.sha256((database_url or "").encode()).hexdigest()[:16]


def _url_host(host: str) -> str:
    """Where a client on this machine reaches a server bound to ``host``."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


@dataclass(frozen=True)
class ServiceAddress:
    """host/port: where the server listens; pid: its process; token_required: whether requests
    need ``Authorization: Bearer``; database: ``database_fingerprint`` of its database; instance:
    a random id that ``/api/health`` repeats, proving the answering server is this one;
    max_upload_bytes: its upload cap (a client sends nothing larger)."""

    host: str
    port: int
    pid: int
    token_required: bool
    database: str
    instance: str
    max_upload_bytes: int

    @property
    def url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.port}"


def address_path(home: str | os.PathLike) -> Path:
    return Path(home) / ADDRESS_FILE


def write_address(home: str | os.PathLike, address: ServiceAddress) -> Path:
    """Record ``address`` in ``home`` (atomically: a reader sees the old record or the new one)."""
    return write_atomic(address_path(home), json.dumps(asdict(address), indent=1))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # alive, owned by someone else
        return True
    return True


def read_address(home: str | os.PathLike) -> ServiceAddress | None:
    """The record in ``home``, or None when there is none, it is malformed, or its process is gone."""
    try:
        raw = json.loads(address_path(home).read_text())
        address = ServiceAddress(**raw)
    except (OSError, ValueError, TypeError):
        return None
    return address if _pid_alive(address.pid) else None


def remove_address(home: str | os.PathLike, pid: int) -> None:
    """Delete the record if it is still the one ``pid`` wrote (a newer server may have replaced it)."""
    path = address_path(home)
    try:
        if json.loads(path.read_text()).get("pid") != pid:
            return
    except (OSError, ValueError, AttributeError):
        return
    with contextlib.suppress(OSError):
        path.unlink()
