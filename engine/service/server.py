"""Run the service: bind the socket, serve with uvicorn until SIGINT/SIGTERM, and keep the
``service.json`` record in the library home for exactly as long as the socket listens."""

from __future__ import annotations

import os
import signal
import socket
import threading
from typing import TYPE_CHECKING, Callable

from engine.errors import EngineError
from engine.service.address import ServiceAddress, database_fingerprint, remove_address, write_address
from engine.service.settings import ServiceConfig

if TYPE_CHECKING:
    from engine.library import Library


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one). Raises EngineError when the
    address cannot be used (taken, not this machine's, not resolvable)."""
    try:
        family, kind, proto, _, where = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                           flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise EngineError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(where)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise EngineError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def run_server(library: Library, config: ServiceConfig, *,
               on_ready: Callable[[ServiceAddress], None] | None = None) -> None:
    """Serve ``library`` until interrupted. ``on_ready(address)`` is called once the encoder and
    index are loaded and the socket accepts connections (the address record is written then).
    Raises EngineError when the socket cannot be bound or the library cannot be loaded."""
    import uvicorn

    from engine.service.app import create_app
    from engine.service.state import SearchState

    sock = bind_socket(config.host, config.port)
    port = sock.getsockname()[1]
    state = SearchState(library, config)
    try:
        state.open()  # load before serving: errors surface here as one-line messages, not in uvicorn's log
    except BaseException:
        sock.close()
        state.close()
        raise
    address = ServiceAddress(host=config.host, port=port, pid=os.getpid(), token_required=bool(config.token),
                             database=database_fingerprint(library.database_url), instance=state.instance,
                             max_upload_bytes=config.max_upload_bytes)
    home = library.paths.home

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started:
                write_address(home, address)
                if on_ready:
                    on_ready(address)

    app = create_app(library, config, state=state)
    # loop="auto" takes uvloop (a dependency where it installs): its C event loop saves about a
    # tenth of a millisecond of the event loop's time per search. No proxy headers: nothing here
    # reads the client's address, and none is trusted to rewrite it.
    server = Server(uvicorn.Config(app, log_level=os.environ.get("ENGINE_LOG", "warning").lower(),
                                   access_log=False, lifespan="on", timeout_graceful_shutdown=5,
                                   loop="auto", proxy_headers=False))
    # uvicorn shuts down gracefully on SIGINT/SIGTERM and then raises the signal again; both end up
    # here as KeyboardInterrupt, the normal way for a server to stop.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        remove_address(home, address.pid)
        sock.close()
        state.close()


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt
