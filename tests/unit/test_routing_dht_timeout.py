"""A DHT call whose process never answers ends in DHTTimeout with a clear message, not a hang."""

from __future__ import annotations

import time
from concurrent.futures import Future

import pytest

from homeswarm.routing.dht import DHTTimeout, SwarmDHT


class DeadDHT:
    """Stands in for a hivemind DHT whose process has exited: its futures never settle."""

    def __init__(self):
        self.futures: list[Future] = []

    def is_alive(self) -> bool:
        return False

    def run_coroutine(self, coro, return_future=False):
        self.futures.append(Future())
        return self.futures[-1]

    def get(self, key, latest=False, return_future=False):
        return self.run_coroutine(None)


@pytest.mark.parametrize("call", ["get_servers", "list_models"])
def test_a_dead_dht_process_times_out(call):
    dead = DeadDHT()
    dht = SwarmDHT(dead, call_timeout=0.2)  # type: ignore[arg-type]
    t0 = time.monotonic()
    with pytest.raises(DHTTimeout, match=r"took more than 0.2 s \(the DHT process has exited\)"):
        dht.get_servers("m", 0, 2) if call == "get_servers" else dht.list_models()
    assert time.monotonic() - t0 < 5  # the 0.2 s call timeout: 0.20 s measured with one core kept busy
    assert dead.futures[-1].cancelled()  # the abandoned call is cancelled, not left pending
