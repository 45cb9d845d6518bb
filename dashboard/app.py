"""The dashboard's HTTP routes (FastAPI): the page, the JSON API, the metrics.

Handlers read the monitor's current state and the history database; none waits on the DHT or on a
node. They are plain functions, so FastAPI runs them on its thread pool and a SQLite read never
blocks the event loop the monitor refreshes on. Every error is JSON: ``{"error": {"message", "status"}}``
with a 4xx status for a bad request.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from homeswarm.dashboard.history import DAY
from homeswarm.dashboard.metrics import make_registry
from homeswarm.dashboard.monitor import Monitor
from homeswarm.dashboard.page import render_page
from homeswarm.dashboard.state import state_json

_NO_STORE = {"Cache-Control": "no-store"}


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        self.status = status
        self.message = message


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "status": status}}, status_code=status, headers=_NO_STORE)


def parse_since(text: str | None, now: float) -> float:
    """The ``since`` query parameter: unix seconds, finite and not negative; a day ago when absent."""
    if text is None:
        return now - DAY
    try:
        since = float(text)
    except ValueError:
        raise BadRequest(400, f"since must be a unix time in seconds, got {text!r}") from None
    if not math.isfinite(since) or since < 0:
        raise BadRequest(400, f"since must be a finite unix time >= 0, got {text!r}")
    return since


def create_app(monitor: Monitor, *, clock: Callable[[], float] = time.time, lifespan: Any = None) -> FastAPI:
    app = FastAPI(title="homeswarm dashboard", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    registry = make_registry(lambda: (monitor.state, monitor.status), clock)

    @app.exception_handler(BadRequest)
    async def _bad_request(request: Request, exc: BadRequest) -> JSONResponse:
        return error_response(exc.status, exc.message)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, "; ".join(str(e.get("msg", e)) for e in exc.errors()) or "bad request")

    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        now = clock()
        state, status = monitor.state, monitor.status
        history = {m.name: monitor.history.query(m.name, now - 7 * DAY) for m in state.models}
        html = render_page(state, status, history, now, refresh_seconds=monitor.refresh_interval)
        return HTMLResponse(html, headers=_NO_STORE)

    @app.get("/api/v1/state")
    def api_state() -> JSONResponse:
        return JSONResponse(state_json(monitor.state, monitor.status, clock()), headers=_NO_STORE)

    @app.get("/api/v1/history")
    def api_history(model: str | None = None, since: str | None = None) -> JSONResponse:
        now = clock()
        if not model:
            raise BadRequest(400, "give the model: /api/v1/history?model=NAME&since=UNIX")
        start = parse_since(since, now)
        if monitor.state.model(model) is None and not monitor.history.knows(model):
            raise BadRequest(404, f"unknown model {model!r}: not in the swarm now nor in the history")
        samples = [{"time": s.time, "span_seconds": s.span, "servers": s.servers, "online_servers": s.online,
                    "covered_blocks": s.covered_blocks, "num_blocks": s.num_blocks, "healthy": s.healthy,
                    "weakest_throughput": s.weakest_throughput,
                    # a merged row (older than a day): the lowest and highest it stands for; null as taken
                    "online_servers_low": s.online_low, "online_servers_high": s.online_high,
                    "weakest_throughput_low": s.weakest_low, "weakest_throughput_high": s.weakest_high}
                   for s in monitor.history.query(model, start)]
        return JSONResponse({"model": model, "since": start, "until": now, "samples": samples}, headers=_NO_STORE)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST, headers=_NO_STORE)

    return app
