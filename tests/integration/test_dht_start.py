"""Starting a DHT peer is bounded: a DHT process that does not get ready in time is killed (with the
p2pd daemon it started) and the start retried, and the caller gets an error instead of a hang."""

from __future__ import annotations

import os
import time

import pytest

from homeswarm.routing import dht as dht_module
from homeswarm.routing.dht import DHTStartError, SwarmDHT


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.timeout(60)
def test_a_dht_that_is_not_ready_in_time_is_killed_and_retried(monkeypatch):
    started: list[int] = []
    kill = dht_module._kill_process_tree

    def recording_kill(pid):
        started.append(pid)
        started.extend(dht_module._children(pid))  # the p2pd daemon, if it got that far
        kill(pid)

    monkeypatch.setattr(dht_module, "_kill_process_tree", recording_kill)
    t0 = time.monotonic()
    with pytest.raises(DHTStartError, match="did not start within"):
        SwarmDHT.create(start_timeout=0.01, attempts=2)
    assert time.monotonic() - t0 < 30
    assert len([p for p in started if p != os.getpid()]) >= 2  # two attempts, each killed
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in started) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in started if _alive(p)]


@pytest.mark.timeout(60)
def test_a_dht_starts_within_the_timeout():
    dht = SwarmDHT.create(start_timeout=30)
    try:
        assert dht.visible_maddrs()
    finally:
        dht.shutdown()
