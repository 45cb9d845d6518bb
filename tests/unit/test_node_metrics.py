"""A node's Prometheus metrics: --metrics-port, and the series NodeMetrics exposes (parsed back)."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from homeswarm.node.config import ConfigError, NodeConfig
from homeswarm.node.metrics import CacheUse, NodeMetrics


def parse(metrics: NodeMetrics) -> dict[str, dict[tuple, float]]:
    """name -> {sorted labels: value}, from the text exposition as a scraper reads it."""
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_metrics_port_flag():
    assert NodeConfig.from_args(["m", "--new-swarm"]).metrics_port is None
    assert NodeConfig.from_args(["m", "--new-swarm", "--metrics-port", "0"]).metrics_port == 0
    assert NodeConfig.from_args(["m", "--new-swarm", "--metrics-port", "9100"]).metrics_port == 9100
    with pytest.raises(ConfigError, match="--metrics-port"):
        NodeConfig.from_args(["m", "--new-swarm", "--metrics-port", "70000"])


def test_series_before_and_after_events():
    metrics = NodeMetrics()
    assert parse(metrics)["homeswarm_node_cache_budget_bytes"][()] == 0  # no serving period yet
    use = CacheUse(budget_bytes=1000, used_bytes=250, free_tokens=75, sessions=1, queued_steps=0)
    metrics.live = lambda: use
    before = parse(metrics)
    assert before["homeswarm_node_steps_total"] == {(("source", "client"),): 0, (("source", "peer"),): 0}
    assert before["homeswarm_node_errors_total"][(("kind", "invalid_argument"),)] == 0
    assert before["homeswarm_node_sessions"][()] == 1
    assert before["homeswarm_node_cache_used_bytes"][()] == 250
    assert before["homeswarm_node_cache_free_tokens"][()] == 75

    metrics.sessions_opened.inc()
    metrics.step("client", 0.002)
    metrics.step("peer", 0.2)
    metrics.batch(3, 0.004)
    metrics.bytes_received.inc(100)
    metrics.bytes_sent.inc(40)
    metrics.error("resource_exhausted")
    metrics.error("handoff")
    after = parse(metrics)
    assert after["homeswarm_node_sessions_opened_total"][()] == 1
    assert after["homeswarm_node_steps_total"][(("source", "client"),)] == 1
    assert after["homeswarm_node_step_seconds_count"][()] == 2
    assert after["homeswarm_node_step_seconds_bucket"][(("le", "0.0025"),)] == 1
    assert after["homeswarm_node_batch_size_sum"][()] == 3
    assert after["homeswarm_node_forward_seconds_count"][()] == 1
    assert after["homeswarm_node_received_bytes_total"][()] == 100
    assert after["homeswarm_node_sent_bytes_total"][()] == 40
    assert after["homeswarm_node_errors_total"][(("kind", "resource_exhausted"),)] == 1
    assert after["homeswarm_node_errors_total"][(("kind", "handoff"),)] == 1


def test_each_node_has_its_own_registry():
    a, b = NodeMetrics(), NodeMetrics()
    a.step("client", 0.1)
    assert parse(b)["homeswarm_node_steps_total"][(("source", "client"),)] == 0
