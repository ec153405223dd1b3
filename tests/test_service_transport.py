"""The CLI client's HTTP connection (engine.service.transport) against a scripted loopback server:
one send per request, answers by Content-Length or chunked, kept alive only when the server says
so, and every failure a TransportError (ServiceClient then reconnects once, then gives up)."""

from __future__ import annotations

import json
import socket
import threading

import pytest

from engine.service.address import ServiceAddress
from engine.service.client import NoService, ServiceClient
from engine.service.transport import Connection, TransportError


def _read_request(conn: socket.socket) -> bytes:
    """One request's bytes (head and Content-Length body), or b"" when the client closed."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return b""
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        body += conn.recv(65536)
    return data


class ScriptedServer:
    """Accepts connections on a free loopback port; ``answers`` is consumed one per request, each
    bytes to send back (None: close the connection without answering). Records every request and
    the number of connections accepted."""

    def __init__(self, answers: list[bytes | None]):
        self.answers = list(answers)
        self.requests: list[bytes] = []
        self.connections = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while self.answers:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                while self.answers:
                    request = _read_request(conn)
                    if not request:
                        break
                    self.requests.append(request)
                    answer = self.answers.pop(0)
                    if answer is None:
                        break
                    conn.sendall(answer)

    def close(self) -> None:
        self.sock.close()
        self.thread.join(5)


def _json_answer(body: dict, *extra: str) -> bytes:
    raw = json.dumps(body).encode()
    head = ["HTTP/1.1 200 OK", "Content-Type: application/json", f"Content-Length: {len(raw)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + raw


def test_requests_share_one_connection_and_send_head_and_body_together():
    server = ScriptedServer([_json_answer({"n": 1}), _json_answer({"n": 2})])
    conn = Connection("127.0.0.1", server.port)
    try:
        assert conn.request("POST", "/api/search?k=3", {"Content-Type": "application/x"}, b"payload", 5) == \
            (200, b'{"n": 1}')
        assert conn.request("GET", "/api/health", {}, None, 5) == (200, b'{"n": 2}')
    finally:
        conn.close()
        server.close()
    assert server.connections == 1
    first = server.requests[0]
    assert first.startswith(b"POST /api/search?k=3 HTTP/1.1\r\n") and first.endswith(b"\r\n\r\npayload")
    assert f"Host: 127.0.0.1:{server.port}".encode() in first and b"Content-Length: 7" in first


def test_chunked_answer_and_connection_close():
    chunked = (b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
               b"4\r\n{\"a\"\r\n3\r\n: 1\r\n1\r\n}\r\n0\r\n\r\n")
    server = ScriptedServer([chunked, _json_answer({"again": True})])
    conn = Connection("127.0.0.1", server.port)
    try:
        assert conn.request("GET", "/x", {}, None, 5) == (404, b'{"a": 1}')
        assert conn.request("GET", "/y", {}, None, 5) == (200, b'{"again": true}')  # on a new connection
    finally:
        conn.close()
        server.close()
    assert server.connections == 2


def test_failures_are_transport_errors():
    server = ScriptedServer([None, b"NOT HTTP AT ALL\r\n\r\n"])
    conn = Connection("127.0.0.1", server.port)
    try:
        with pytest.raises(TransportError, match="closed the connection"):
            conn.request("GET", "/", {}, None, 5)
        with pytest.raises(TransportError, match="not an HTTP answer"):
            conn.request("GET", "/", {}, None, 5)
    finally:
        conn.close()
        server.close()
    free = socket.create_server(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()  # nothing listens there now
    with pytest.raises(TransportError):
        Connection("127.0.0.1", port).request("GET", "/", {}, None, 5)


def _client(port: int) -> ServiceClient:
    return ServiceClient(ServiceAddress(host="127.0.0.1", port=port, pid=1, token_required=False, database="x",
                                        instance="i", max_upload_bytes=1 << 20), token="tok")


def test_service_client_reconnects_once_when_a_kept_connection_was_dropped():
    # The first connection answers once and is then dropped by the server (as uvicorn drops an
    # idle kept-alive connection); the client's next request reconnects and is answered.
    server = ScriptedServer([_json_answer({"n": 1}), None, _json_answer({"n": 2})])
    client = _client(server.port)
    try:
        assert client.request("GET", "/api/health") == (200, {"n": 1})
        assert client.request("GET", "/api/health") == (200, {"n": 2})
    finally:
        client.close()
        server.close()
    assert server.connections == 2
    assert all(b"Authorization: Bearer tok" in r for r in server.requests)


def test_service_client_gives_up_after_the_second_failure():
    server = ScriptedServer([None, None])
    client = _client(server.port)
    try:
        with pytest.raises(NoService):
            client.request("GET", "/api/health")
    finally:
        client.close()
        server.close()
