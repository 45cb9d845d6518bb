"""The dashboard's Prometheus metrics: the swarm as last seen, per model, read at scrape time.

A collector over the monitor's current state (never counters kept beside it), so a model or server
that leaves the swarm leaves the metrics too. Its own registry: nothing process-wide.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from homeswarm.dashboard.state import UNREACHABLE, RefreshStatus, ServerView, SwarmState
from homeswarm.routing.records import ServerState


class SwarmCollector(Collector):
    def __init__(self, read: Callable[[], tuple[SwarmState, RefreshStatus]], clock: Callable[[], float]):
        self._read = read
        self._clock = clock

    def collect(self) -> Iterator[GaugeMetricFamily]:
        state, status = self._read()
        servers = GaugeMetricFamily("homeswarm_dashboard_servers", "servers announced, by model and state; an "
                                    "online server that does not answer its probe counts as offline",
                                    labels=["model", "state"])
        reachable = GaugeMetricFamily("homeswarm_dashboard_servers_reachable", "servers that answered their probe",
                                      labels=["model"])
        blocks = GaugeMetricFamily("homeswarm_dashboard_blocks", "blocks of the model", labels=["model"])
        covered = GaugeMetricFamily("homeswarm_dashboard_blocks_covered",
                                    "blocks with at least one online, answering server", labels=["model"])
        weakest = GaugeMetricFamily("homeswarm_dashboard_weakest_block_throughput",
                                    "steps per second through the model's weakest block", labels=["model"])
        healthy = GaugeMetricFamily("homeswarm_dashboard_model_healthy", "1 when every block has a server",
                                    labels=["model"])
        for model in state.models:
            for server_state in ServerState:
                n = sum(1 for s in model.servers if _metric_state(s) is server_state)
                servers.add_metric([model.name, server_state.value], n)
            reachable.add_metric([model.name], sum(1 for s in model.servers if s.probe.reachable))
            blocks.add_metric([model.name], model.num_blocks)
            covered.add_metric([model.name], model.covered_blocks)
            weakest.add_metric([model.name], model.weakest_throughput)
            healthy.add_metric([model.name], 1 if model.healthy else 0)
        yield from (servers, reachable, blocks, covered, weakest, healthy)
        yield GaugeMetricFamily("homeswarm_dashboard_models", "models announced", value=len(state.models))
        age = self._clock() - state.updated if state.updated else float("nan")
        yield GaugeMetricFamily("homeswarm_dashboard_state_age_seconds", "age of the last good state of the swarm",
                                value=age)
        yield GaugeMetricFamily("homeswarm_dashboard_dht_ok", "1 when the last refresh read the swarm",
                                value=1 if status.ok else 0)
        yield GaugeMetricFamily("homeswarm_dashboard_dht_peers", "DHT peers the dashboard reaches",
                                value=status.dht_peers)


def _metric_state(server: ServerView) -> ServerState:
    """The state a server is counted under: offline when its online record no longer answers, so that the
    online count is what clients can use (the page shows it as unreachable)."""
    return ServerState.OFFLINE if server.status == UNREACHABLE else server.state


def make_registry(read: Callable[[], tuple[SwarmState, RefreshStatus]], clock: Callable[[], float]) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(SwarmCollector(read, clock))
    return registry
