"""Running the dashboard: the listening socket, the monitor under uvicorn's lifespan, the ready file.

The socket is bound before anything slow starts, so a taken port fails at once and ``--port 0`` gets a
free port that the ready file can name; the ready file is written once uvicorn accepts connections.
The monitor runs as a task of uvicorn's event loop for as long as the server does.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import uvicorn

from homeswarm.dashboard.app import create_app
from homeswarm.dashboard.config import DashboardConfig
from homeswarm.dashboard.history import History
from homeswarm.dashboard.monitor import Monitor, read_swarm
from homeswarm.dashboard.probe import Prober
from homeswarm.protocol.ready_file import write_ready_file
from homeswarm.routing.dht import SwarmDHT

GRACEFUL_SHUTDOWN_S = 3.0  # open requests get this long once the server stops


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one); OSError when it cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family)


class _Server(uvicorn.Server):
    """uvicorn, calling back once it accepts connections."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[], None]):
        super().__init__(config)
        self._on_started = on_started

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self._on_started()


def _lifespan(monitor: Monitor) -> Callable[[Any], Any]:
    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        task = asyncio.create_task(monitor.run())
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await monitor.prober.close()

    return lifespan


def serve(config: DashboardConfig, history: History, dht: SwarmDHT, sock: socket.socket) -> None:
    """Serve on ``sock`` until SIGTERM/SIGINT."""
    monitor = Monitor(partial(read_swarm, dht), Prober(timeout=config.probe_timeout), history,
                      refresh_interval=config.refresh_interval, history_interval=config.history_interval)
    app = create_app(monitor, lifespan=_lifespan(monitor))
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host

    def started() -> None:
        print(f"dashboard at http://{shown}:{port}/", file=sys.stderr, flush=True)
        if config.ready_file:
            write_ready_file(config.ready_file, {"address": f"{shown}:{port}", "url": f"http://{shown}:{port}/"})

    server_config = uvicorn.Config(app, lifespan="on", log_level="info" if config.verbose else "warning",
                                   access_log=config.verbose, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    # uvicorn restores these handlers after it stops and re-raises the signal it caught: with the default
    # handlers that would kill the process before the DHT peer and the database are closed
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    _Server(server_config, started).run(sockets=[sock])
