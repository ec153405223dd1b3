"""Configuration of one ``engine serve`` process."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

DEFAULT_MAX_UPLOAD_MB = 20
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")


def is_loopback(host: str) -> bool:
    """True for a host name or address that only this machine can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def default_workers(cores: int | None = None) -> int:
    """Inference threads for ``cores`` CPU cores: one per core, at most 8. Each gets ``cores //
    workers`` torch threads, so together they never ask for more threads than cores.

    Single-threaded workers rather than one wide one: concurrent requests then run side by side,
    and no OpenMP team spins at a barrier waiting for a thread the OS has given to another process
    (measured on 2 busy cores: 2 torch threads 650-735 ms per query, 1 thread 62-70 ms)."""
    cores = cores or os.cpu_count() or 1
    return max(1, min(8, cores))


@dataclass(frozen=True)
class ServiceConfig:
    """host/port: where to listen (port 0: any free port). token: when set, every API request
    must carry ``Authorization: Bearer TOKEN``. max_upload_bytes: the largest image file accepted
    (bytes, counted while the body is read). workers: inference threads (None: ``default_workers``).
    poll_s: seconds between checks of the library's generation (an ingest elsewhere is picked up
    within this). allowed_hosts: Host headers accepted (None: the loopback names when bound to
    loopback, which stops DNS-rebinding pages from reaching the API; any when bound elsewhere)."""

    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_MB * 1024 * 1024
    workers: int | None = None
    poll_s: float = 1.0
    allowed_hosts: tuple[str, ...] | None = None

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)

    def hosts(self) -> tuple[str, ...]:
        """The Host header values to accept (``("*",)`` for any)."""
        if self.allowed_hosts is not None:
            return self.allowed_hosts
        return LOOPBACK_NAMES if self.loopback else ("*",)

    def inference_workers(self) -> int:
        return self.workers or default_workers()

    def torch_threads(self) -> int:
        """Intra-op threads per inference worker: the cores shared out among the workers."""
        return max(1, (os.cpu_count() or 1) // self.inference_workers())
