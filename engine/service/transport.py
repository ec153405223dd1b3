"""One kept-alive HTTP/1.1 connection from the CLI's client to ``engine serve``: each request is
written with one send and its answer parsed by httptools (the C parser uvicorn itself uses, a
dependency of the service already).

Why not http.client: it parses every answer's headers through the ``email`` package, which cost
0.13 ms of the client's CPU per search with hot caches and about 0.5 ms when a search alternates
with other work (most of the client's share of the service's overhead); and it writes a request's
head and body with two sends, so the server wakes twice for one request.
"""

from __future__ import annotations

import socket
from typing import Mapping

# Bodies up to this size go out in the same buffer as the head (one copy, one send); larger ones
# follow the head in a second send rather than being copied.
JOIN_BODY_BYTES = 256 * 1024
RECV_BYTES = 64 * 1024


class TransportError(Exception):
    """The connection failed, closed before the answer was complete, or the answer was not HTTP."""


class _Answer:
    """httptools callbacks: the status and body of one answer, whether the connection stays open
    after it (asked while the headers are current: the parser forgets once the message ends) and
    whether it is complete."""

    def __init__(self) -> None:
        import httptools

        self.parser = httptools.HttpResponseParser(self)
        self.body: list[bytes] = []
        self.status = 0
        self.keep_alive = False
        self.complete = False

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, data: bytes) -> None:
        self.body.append(data)

    def on_message_complete(self) -> None:
        self.complete = True


class Connection:
    """Requests to ``host``:``port`` over one TCP connection, opened on first use and again after
    the server closed it (the caller retries). Not thread-safe: one per thread."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.host_header = (f"[{host}]" if ":" in host else host) + f":{port}"
        self._sock: socket.socket | None = None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def request(self, method: str, target: str, headers: Mapping[str, str], body: bytes | None,
                timeout: float) -> tuple[int, bytes]:
        """(status, body) of one request; ``target`` is the path with its query string. Raises
        TransportError (the connection is then closed) for any failure on the way."""
        try:
            if self._sock is None:
                self._sock = socket.create_connection((self.host, self.port), timeout=timeout)
                self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock.settimeout(timeout)
            self._send(method, target, headers, body or b"")
            return self._receive()
        except (OSError, TransportError) as exc:
            self.close()
            raise TransportError(str(exc) or type(exc).__name__) from None

    def _send(self, method: str, target: str, headers: Mapping[str, str], body: bytes) -> None:
        assert self._sock is not None
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self.host_header}", f"Content-Length: {len(body)}",
                 *(f"{name}: {value}" for name, value in headers.items())]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if len(body) <= JOIN_BODY_BYTES:
            self._sock.sendall(head + body)
        else:
            self._sock.sendall(head)
            self._sock.sendall(body)

    def _receive(self) -> tuple[int, bytes]:
        import httptools

        assert self._sock is not None
        answer = _Answer()
        try:
            while not answer.complete:
                chunk = self._sock.recv(RECV_BYTES)
                if not chunk:
                    raise TransportError("the service closed the connection before answering")
                answer.parser.feed_data(chunk)
        except httptools.HttpParserError as exc:
            raise TransportError(f"not an HTTP answer: {exc}") from None
        if not answer.keep_alive:
            self.close()
        return answer.status, b"".join(answer.body)
