"""The monitor with a fake DHT read and a fake prober, and the HTTP routes called as an ASGI app (no socket).

A failed refresh keeps the last good state; a history sample is written only from a fresh state;
bad requests get 4xx JSON errors.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode

import pytest
from prometheus_client.parser import text_string_to_metric_families

from homeswarm.dashboard.app import create_app
from homeswarm.dashboard.history import History
from homeswarm.dashboard.monitor import Monitor, SwarmUnreachable
from homeswarm.dashboard.probe import Prober
from homeswarm.dashboard.state import Probe
from homeswarm.routing.records import PeerId, ServerRecord, ServerState

pytestmark = pytest.mark.timeout(30)


class FakeClock:
    def __init__(self, now: float = 1_800_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeProber(Prober):
    def __init__(self) -> None:
        super().__init__()
        self.down: set[str] = set()

    async def probe_all(self, addresses: Mapping[PeerId, str],
                        certs: Mapping[PeerId, str] | None = None) -> dict[PeerId, Probe]:
        return {peer: Probe(reachable=False, error="refused") if peer in self.down
                else Probe(reachable=True, rtt_ms=1.0, version=f"v-{peer}") for peer in addresses}


def record(peer: str, start: int, end: int) -> ServerRecord:
    return ServerRecord(peer_id=PeerId(peer), address="127.0.0.1:1", model="m", start=start, end=end,
                        state=ServerState.ONLINE, protocol_version=1, dtype="float32", throughput=4.0,
                        cache_tokens_left=10)


class FakeSwarm:
    def __init__(self) -> None:
        self.records = [record("a", 0, 2), record("b", 2, 4)]
        self.failure: Exception | None = None

    def read(self) -> tuple[dict[str, int], dict[str, list[ServerRecord]], int]:
        if self.failure is not None:
            raise self.failure
        return {"m": 4}, {"m": list(self.records)}, 2


@pytest.fixture
def parts():
    clock, swarm, prober, history = FakeClock(), FakeSwarm(), FakeProber(), History(":memory:")
    monitor = Monitor(swarm.read, prober, history, refresh_interval=1.0, history_interval=60.0, clock=clock)
    yield clock, swarm, prober, monitor
    history.close()


async def test_refresh_builds_the_state_and_a_failure_keeps_the_last_good_one(parts):
    clock, swarm, prober, monitor = parts
    await monitor.refresh()
    assert monitor.status.ok and monitor.status.dht_peers == 2
    assert monitor.state.model("m").healthy and monitor.state.updated == clock.now
    good = monitor.state
    clock.now += 30
    swarm.failure = SwarmUnreachable("no DHT peer of the swarm answers")
    await monitor.refresh()
    assert monitor.state is good
    assert not monitor.status.ok and monitor.status.error == "no DHT peer of the swarm answers"
    assert monitor.status.last_attempt == clock.now
    swarm.failure = None
    await monitor.refresh()
    assert monitor.status.ok and monitor.state.updated == clock.now


async def test_an_unreachable_server_keeps_its_last_version_and_stops_counting(parts):
    clock, swarm, prober, monitor = parts
    await monitor.refresh()
    prober.down.add("b")
    await monitor.refresh()
    model = monitor.state.model("m")
    b = next(s for s in model.servers if s.peer_id == "b")
    assert not b.probe.reachable and b.probe.version == "v-b"
    assert model.coverage == (1, 1, 0, 0) and not model.healthy


async def test_history_samples_only_a_fresh_state(parts):
    clock, swarm, prober, monitor = parts
    await monitor.sample()  # no state yet
    assert not monitor.history.knows("m")
    await monitor.refresh()
    await monitor.sample()
    assert [s.online for s in monitor.history.query("m", 0)] == [2]
    swarm.failure = TimeoutError("reading server records took more than 10 s")
    clock.now += 5
    await monitor.refresh()
    await monitor.sample()  # the refresh failed: nothing written
    assert len(monitor.history.query("m", 0)) == 1


async def test_run_refreshes_in_the_background_until_cancelled(parts):
    clock, swarm, prober, monitor = parts
    monitor.refresh_interval = 0.01
    task = asyncio.create_task(monitor.run())
    await asyncio.wait_for(monitor.refreshed.wait(), 10)
    # the first history sample follows the first refresh, not a history interval (60 s here) later
    for _ in range(500):
        if monitor.history.knows("m"):
            break
        await asyncio.sleep(0.01)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert monitor.status.ok
    assert [s.online for s in monitor.history.query("m", 0)] == [2]


async def test_a_killed_node_is_unreachable_not_online(parts):
    """Its record still says online until it expires; the page, the state's status and the metrics do not."""
    clock, swarm, prober, monitor = parts
    app = create_app(monitor, clock=clock)
    prober.down.add("b")
    await monitor.refresh()
    state = json.loads((await call(app, "/api/v1/state"))[2])
    servers = {s["peer_id"]: s for s in state["models"][0]["servers"]}
    assert servers["b"]["state"] == "online" and servers["b"]["reachable"] is False  # as announced, as probed
    assert servers["b"]["status"] == "unreachable" and servers["a"]["status"] == "online"
    assert state["models"][0]["online_servers"] == 1
    families = {f.name: f for f in text_string_to_metric_families((await call(app, "/metrics"))[2].decode())}
    by_state = {s.labels["state"]: s.value for s in families["homeswarm_dashboard_servers"].samples}
    assert by_state["online"] == 1 and by_state["offline"] == 1
    page = (await call(app, "/"))[2].decode()
    assert '<td class="state-unreachable" title="announced online; its probe failed">unreachable</td>' in page
    assert "1 server online" in page


# --- the routes, through the ASGI interface ------------------------------------------------------


async def call(app: Any, path: str, query: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One GET through the app's ASGI interface: (status, headers, body)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": urlencode(query or {}).encode(),
             "root_path": "", "headers": [(b"host", b"test")], "client": ("127.0.0.1", 1),
             "server": ("test", 80)}
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body


async def test_routes(parts):
    clock, swarm, prober, monitor = parts
    app = create_app(monitor, clock=clock)
    await monitor.refresh()
    await monitor.sample()

    status, headers, body = await call(app, "/api/v1/state")
    assert status == 200 and headers["content-type"] == "application/json"
    state = json.loads(body)
    assert state["models"][0]["name"] == "m" and state["models"][0]["coverage"] == [1, 1, 1, 1]

    status, _, body = await call(app, "/api/v1/history", {"model": "m", "since": "0"})
    assert status == 200 and [s["online_servers"] for s in json.loads(body)["samples"]] == [2]

    status, headers, body = await call(app, "/")
    assert status == 200 and headers["content-type"].startswith("text/html") and b"healthy" in body

    status, headers, body = await call(app, "/metrics")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert families["homeswarm_dashboard_blocks_covered"].samples[0].value == 4


@pytest.mark.parametrize(("query", "status"), [
    ({"model": "nobody", "since": "0"}, 404),
    ({"model": "m", "since": "yesterday"}, 400),
    ({"model": "m", "since": "nan"}, 400),
    ({"model": "m", "since": "-5"}, 400),
    ({"model": "m", "since": "inf"}, 400),
    ({"since": "0"}, 400),
])
async def test_bad_history_requests_get_json_errors(parts, query, status):
    clock, swarm, prober, monitor = parts
    await monitor.refresh()
    got, headers, body = await call(create_app(monitor, clock=clock), "/api/v1/history", query)
    assert got == status and headers["content-type"] == "application/json"
    error = json.loads(body)["error"]
    assert error["status"] == status and error["message"]


async def test_unknown_path_is_a_json_404(parts):
    clock, swarm, prober, monitor = parts
    status, _, body = await call(create_app(monitor, clock=clock), "/nowhere")
    assert status == 404 and json.loads(body)["error"]["status"] == 404
