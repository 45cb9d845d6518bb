"""join-swarm's volunteer flags: memory, threads, throughput, --idle-only and rebalancing, and bad values."""

from __future__ import annotations

import pytest

from homeswarm.node.config import ConfigError, NodeConfig


def parse(*argv: str) -> NodeConfig:
    return NodeConfig.from_args(["m", "--new-swarm", *argv])


def test_defaults():
    c = parse()
    assert c.max_memory is None and c.cache_share == 0.25 and c.max_threads == 0 and c.throughput is None
    assert not c.idle_only and c.idle_users == () and c.rebalance_interval == 300.0


def test_flags():
    c = parse("--max-memory", "4GiB", "--max-threads", "2", "--throughput", "12.5", "--idle-only",
              "--idle-cpu-busy", "0.3", "--idle-users", "alice", "1000", "--busy-after", "1", "--idle-after", "2",
              "--idle-check-interval", "0.5", "--busy-grace", "3", "--idle-input-after", "0", "--serve-on-battery",
              "--rebalance-interval", "0", "--rebalance-imbalance", "0.1")
    assert (c.max_memory, c.max_threads, c.throughput, c.idle_only) == ("4GiB", 2, 12.5, True)
    assert c.idle_users == ("alice", "1000") and c.idle_cpu_busy == 0.3 and c.serve_on_battery
    assert (c.busy_after, c.idle_after, c.idle_check_interval, c.busy_grace) == (1.0, 2.0, 0.5, 3.0)
    assert c.rebalance_interval == 0.0 and c.rebalance_imbalance == 0.1
    hash(c)  # frozen, hashable: tuples, not lists


@pytest.mark.parametrize(("argv", "message"), [
    (["--max-memory", "lots"], "--max-memory"),
    (["--max-memory", "0"], "--max-memory"),
    (["--cache-share", "1"], "--cache-share"),
    (["--max-threads", "-1"], "--max-threads"),
    (["--throughput", "0"], "--throughput"),
    (["--throughput", "inf"], "--throughput"),
    (["--idle-cpu-busy", "0"], "--idle-cpu-busy"),
    (["--busy-after", "-1"], "--busy-after"),
    (["--idle-check-interval", "0"], "--idle-check-interval"),
    (["--rebalance-imbalance", "1"], "--rebalance-imbalance"),
    (["--rebalance-interval", "nan"], "--rebalance-interval"),
])  # fmt: skip
def test_bad_values(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse(*argv)
