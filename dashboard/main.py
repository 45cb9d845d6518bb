"""`homeswarm dashboard` (``python -m homeswarm.dashboard``): the one place that builds and runs the dashboard.

``main()`` alone parses arguments, sets up logging and runs the server. Order of start-up: config,
history database, listening socket (a bad path or a taken port fails at once, exit 2), the DHT peer
(client mode, before any gRPC thread exists so it forks cleanly; exit 1 when the swarm cannot be
joined), then uvicorn, whose lifespan runs the monitor. The ready file is written once uvicorn accepts
connections. On SIGTERM/SIGINT uvicorn stops, the monitor is cancelled, the DHT peer and the database
are closed, and the process exits 0. The heavy imports wait until the input is known to be good.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import sys
from collections.abc import Sequence
from typing import NoReturn

from homeswarm.dashboard.config import ConfigError, DashboardConfig
from homeswarm.dashboard.history import History

PROG = "homeswarm dashboard"
EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


def _fail(message: str, code: int) -> NoReturn:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> None:
    try:
        config = DashboardConfig.from_args(argv)
    except ConfigError as e:
        _fail(str(e), EXIT_BAD_INPUT)
    logging.basicConfig(level=os.environ.get("HOMESWARM_LOG_LEVEL", "INFO" if config.verbose else "WARNING").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("hivemind").setLevel(logging.ERROR)
    try:
        history = History(config.db_path)
    except (sqlite3.Error, OSError) as e:
        _fail(f"could not open the history database {str(config.db_path)!r}: {e}", EXIT_BAD_INPUT)
    # only now the heavy imports (hivemind, torch, grpc, FastAPI): bad input is answered at once
    from homeswarm.dashboard.server import bind, serve
    from homeswarm.routing.dht import SwarmDHT

    try:
        try:
            sock = bind(config.host, config.port)
        except OSError as e:
            _fail(f"could not listen on {config.host}:{config.port}: {e}", EXIT_BAD_INPUT)
        try:
            try:
                dht = SwarmDHT.create(config.initial_peers, host=config.host, port=config.dht_port, client_mode=True)
            except Exception as e:  # hivemind raises several types for unreachable or malformed peers
                _fail(f"could not join the swarm through --initial-peers: {e}", EXIT_FAILED)
            dht.call_timeout = config.dht_timeout
            try:
                serve(config, history, dht, sock)
            finally:
                dht.shutdown()
        finally:
            sock.close()
    finally:
        history.close()
    sys.exit(0)


if __name__ == "__main__":
    main()
