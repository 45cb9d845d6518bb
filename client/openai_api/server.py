"""Running the API under uvicorn: bind, announce readiness, stop cleanly.

The socket is bound before uvicorn starts, so a bad host or a taken port fails at once with a clear
message and ``--port 0`` gets a free port that the ready file can name. The ready file is written once
uvicorn accepts connections. On SIGTERM or SIGINT the server stops accepting, every generation is
cancelled (streams end with an error event, sessions close on the nodes) and ``serve`` returns.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import uvicorn

from homeswarm.client.openai_api.engine import SwarmEngine
from homeswarm.client.openai_api.schemas import APIError
from homeswarm.protocol.ready_file import write_ready_file

GRACEFUL_SHUTDOWN_S = 5.0  # how long a stopping server waits for open responses before cutting them


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one); OSError when it cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family)


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, on_started: Callable[[], None], on_stopping: Callable[[], None]):
        super().__init__(config)
        self._on_started = on_started
        self._on_stopping = on_stopping

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self._on_started()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._on_stopping()  # end the streams now rather than wait GRACEFUL_SHUTDOWN_S for them
        await super().shutdown(sockets)


def serve(app: Any, engine: SwarmEngine, sock: socket.socket, *, ready_file: str | os.PathLike[str] | None,
          ready_info: dict[str, Any], verbose: bool = False) -> None:
    """Serve ``app`` on ``sock`` until SIGTERM/SIGINT; then cancel what runs and return."""
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    info = {**ready_info, "address": f"{shown}:{port}", "url": f"http://{shown}:{port}/v1"}

    def started() -> None:
        if ready_file:
            write_ready_file(ready_file, info)

    def stopping() -> None:
        engine.cancel_all(APIError(503, "the server is shutting down", type="server_error"))

    config = uvicorn.Config(app, lifespan="off", log_level="info" if verbose else "warning",
                            access_log=verbose, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    server = _Server(config, started, stopping)
    server.run(sockets=[sock])
