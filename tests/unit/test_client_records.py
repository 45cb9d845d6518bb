"""RouteManager.records: stale records are re-read in the background and used meanwhile; very stale
ones, or an explicit refresh, wait for a fresh read. A fake DHT and clock, no sockets."""

from __future__ import annotations

from homeswarm.client.config import ClientConfig
from homeswarm.client.route import RouteManager


class FakeLookup:
    def __init__(self, records, fail: bool = False):
        self.records, self.finished, self.fail = records, False, fail

    def done(self) -> bool:
        return self.finished

    def result(self):
        assert self.finished, "result() of a background lookup must not block the caller"
        if self.fail:
            raise TimeoutError("the DHT did not answer")
        return self.records


class FakeDHT:
    def __init__(self):
        self.version = 0
        self.blocking_reads = 0
        self.lookups: list[FakeLookup] = []

    def get_servers(self, model, start, end):
        self.blocking_reads += 1
        return [f"v{self.version}"]

    def lookup_servers(self, model, start, end):
        self.lookups.append(FakeLookup([f"v{self.version}"]))
        return self.lookups[-1]


def make(now):
    dht = FakeDHT()
    routes = RouteManager(dht, pool=None, model="m", num_blocks=4,  # type: ignore[arg-type]
                          config=ClientConfig(records_max_age=5, records_max_stale=60), clock=lambda: now[0])
    return dht, routes


def test_first_read_waits_then_fresh_records_are_reused():
    now = [100.0]
    dht, routes = make(now)
    assert routes.records() == ["v0"] and dht.blocking_reads == 1
    now[0] += 4
    dht.version = 1
    assert routes.records() == ["v0"] and dht.blocking_reads == 1 and not dht.lookups


def test_stale_records_are_used_while_a_background_read_runs():
    now = [100.0]
    dht, routes = make(now)
    routes.records()
    dht.version = 1
    now[0] += 10  # stale: a background lookup starts, the held records answer now
    assert routes.records() == ["v0"] and len(dht.lookups) == 1 and dht.blocking_reads == 1
    now[0] += 1
    assert routes.records() == ["v0"] and len(dht.lookups) == 1  # still in flight: no second lookup
    dht.lookups[0].finished = True
    assert routes.records() == ["v1"]  # picked up when done
    now[0] += 3  # 4 s after the lookup started: fresh, nothing new starts
    assert routes.records() == ["v1"] and len(dht.lookups) == 1 and dht.blocking_reads == 1


def test_very_stale_records_or_refresh_wait_for_a_fresh_read():
    now = [100.0]
    dht, routes = make(now)
    routes.records()
    dht.version = 1
    now[0] += 61
    assert routes.records() == ["v1"] and dht.blocking_reads == 2
    now[0] += 10
    routes.records()  # starts a background lookup
    dht.version = 2
    assert routes.records(refresh=True) == ["v2"] and dht.blocking_reads == 3


def test_a_failed_background_read_keeps_the_records_and_is_retried():
    now = [100.0]
    dht, routes = make(now)
    routes.records()
    now[0] += 10
    routes.records()
    dht.lookups[0].finished, dht.lookups[0].fail = True, True
    assert routes.records() == ["v0"]  # kept; a new lookup started
    assert len(dht.lookups) == 2
