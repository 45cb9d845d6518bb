"""A node's Prometheus metrics (``join-swarm --metrics-port``): sessions, steps, latency, batches, cache,
bytes, errors.

Each node has its own ``CollectorRegistry`` (never the process-wide default), so several nodes in one
process (tests) keep their series apart. One ``NodeMetrics`` lives as long as the process: its counters
carry on across serving periods (a node that moves to other blocks, or steps aside and comes back).
Counters and histograms are updated on the event loop and the compute thread (prometheus-client's
metrics are thread-safe); the gauges of open sessions and cache use are read from the current period's
objects at scrape time (``NodeMetrics.live``), so they can never drift from them; between periods they
read zero.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from homeswarm.node.config import ConfigError

# a step is well under a millisecond on a tiny span and seconds for a long prefill on a big one
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


@dataclass(frozen=True)
class CacheUse:
    """The KV cache budget at one moment, in bytes and in tokens of batch size 1."""

    budget_bytes: int
    used_bytes: int
    free_tokens: int
    sessions: int
    queued_steps: int


_IDLE = CacheUse(budget_bytes=0, used_bytes=0, free_tokens=0, sessions=0, queued_steps=0)


class _LiveGauges(Collector):
    """Gauges read from the node's live state when scraped."""

    def __init__(self, metrics: NodeMetrics):
        self._metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily]:
        read = self._metrics.live
        use = read() if read is not None else _IDLE
        yield GaugeMetricFamily("homeswarm_node_sessions", "inference sessions open now", value=use.sessions)
        yield GaugeMetricFamily("homeswarm_node_cache_budget_bytes", "KV cache budget", value=use.budget_bytes)
        yield GaugeMetricFamily("homeswarm_node_cache_used_bytes", "KV cache reserved by open sessions",
                                value=use.used_bytes)
        yield GaugeMetricFamily("homeswarm_node_cache_free_tokens", "free KV cache, in tokens of batch size 1",
                                value=use.free_tokens)
        yield GaugeMetricFamily("homeswarm_node_queued_steps", "steps waiting for the compute thread",
                                value=use.queued_steps)


class NodeMetrics:
    """The node's series. ``live``: how to read the serving period's cache use (None between periods)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.live: Callable[[], CacheUse] | None = None
        self.registry.register(_LiveGauges(self))
        self.sessions_opened = Counter("homeswarm_node_sessions_opened", "inference sessions opened",
                                       registry=self.registry)
        self.steps = Counter("homeswarm_node_steps", "session steps computed, by where the input came from",
                             ["source"], registry=self.registry)
        self.step_seconds = Histogram("homeswarm_node_step_seconds", "a session step from its input's arrival "
                                      "to its result (queueing, batching and compute)", buckets=STEP_BUCKETS,
                                      registry=self.registry)
        self.batch_size = Histogram("homeswarm_node_batch_size", "session steps per forward pass",
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.forward_seconds = Histogram("homeswarm_node_forward_seconds", "one forward pass over a batch of steps",
                                         buckets=STEP_BUCKETS, registry=self.registry)
        self.bytes_received = Counter("homeswarm_node_received_bytes", "request bytes received (steps, pushes, "
                                      "forwards)", registry=self.registry)
        self.bytes_sent = Counter("homeswarm_node_sent_bytes", "bytes sent (results, pushes, forwards)",
                                  registry=self.registry)
        self.errors = Counter("homeswarm_node_errors", "requests refused or failed, by kind (a gRPC status, "
                              "handoff, compute)", ["kind"], registry=self.registry)
        # the labels every node has, at zero from the start: a scrape shows the series before the first event
        for source in ("client", "peer"):
            self.steps.labels(source=source)
        for kind in ("invalid_argument", "resource_exhausted", "unavailable", "handoff", "compute"):
            self.errors.labels(kind=kind)

    def step(self, source: str, seconds: float) -> None:
        self.steps.labels(source=source).inc()
        self.step_seconds.observe(seconds)

    def batch(self, steps: int, seconds: float) -> None:
        """Called by the compute executor after each forward pass over ``steps`` session steps."""
        self.batch_size.observe(steps)
        self.forward_seconds.observe(seconds)

    def error(self, kind: str) -> None:
        self.errors.labels(kind=kind).inc()


@contextlib.contextmanager
def serve_metrics(metrics: NodeMetrics, host: str, port: int | None) -> Iterator[str | None]:
    """Serve ``metrics`` at http://HOST:PORT/metrics while inside (port None: not at all; 0: a free port).

    Yields the HOST:PORT it serves at (None when not serving); a port that cannot be had is a
    ``ConfigError``. The server runs on a thread of its own, so a scrape never waits on the event loop.
    """
    if port is None:
        yield None
        return
    try:
        server, _ = start_http_server(port, addr=host, registry=metrics.registry)
    except OSError as e:
        raise ConfigError(f"could not serve metrics on {host}:{port}: {e}") from None
    try:
        yield f"{host}:{server.server_port}"
    finally:
        server.shutdown()  # returns at its loop's next poll, 0.5 s at most
        server.server_close()
