"""Per-peer limits (pure, time passed in) and the hand-off target check (a fake DHT lookup)."""

from __future__ import annotations

import asyncio

import pytest

from homeswarm.node.handoff_targets import HandoffTargets, TargetsUnknown
from homeswarm.node.peer_limits import PeerLimits, peer_host
from homeswarm.routing.records import PeerId, ServerRecord, ServerState


@pytest.mark.parametrize(("peer", "host"), [
    ("ipv4:10.0.0.7:5123", "10.0.0.7"),
    ("ipv6:[::1]:40000", "[::1]"),
    ("unix:/tmp/sock", "unix:/tmp/sock"),
])
def test_peer_host_drops_the_port(peer, host):
    assert peer_host(peer) == host


def test_rate_limit_refills_over_time():
    limits = PeerLimits(max_sessions=0, rate=10, burst=5)
    assert all(limits.request("a", now=0.0) is None for _ in range(5))
    assert "too many requests from a" in limits.request("a", now=0.0)
    assert limits.request("b", now=0.0) is None  # another host has its own bucket
    assert limits.request("a", now=0.2) is None  # two tokens back
    assert PeerLimits(max_sessions=0, rate=0).request("a", now=0.0) is None  # 0: unlimited


def test_rate_limit_half_token_is_refused():
    limits = PeerLimits(max_sessions=0, rate=10, burst=1)
    assert limits.request("a", now=0.0) is None
    assert limits.request("a", now=0.05) is not None
    assert limits.request("a", now=0.11) is None


def test_sessions_per_host():
    limits = PeerLimits(max_sessions=2, rate=0)
    assert limits.open_session("a", 0.0) is None
    assert limits.open_session("a", 0.0) is None
    assert "already has 2 open sessions" in limits.open_session("a", 0.0)
    assert limits.open_session("b", 0.0) is None
    limits.close_session("a")
    assert limits.sessions_of("a") == 1
    assert limits.open_session("a", 0.0) is None
    limits.close_session("nobody")  # harmless


def test_host_table_is_bounded():
    limits = PeerLimits(max_sessions=1, rate=1, burst=1)
    limits.open_session("holder", 0.0)
    for i in range(10_000):
        limits.request(f"h{i}", now=float(i))
    assert len(limits._hosts) <= 4096
    assert limits.sessions_of("holder") == 1  # a host holding a session is never forgotten


def _record(address: str, start: int, end: int) -> ServerRecord:
    return ServerRecord(peer_id=PeerId(f"peer-{address}"), address=address, model="m", start=start, end=end,
                        state=ServerState.ONLINE, protocol_version=1, dtype="float32", throughput=1.0,
                        cache_tokens_left=100)


def test_handoff_targets_follow_the_records():
    now = [0.0]
    reads = []
    records = [_record("10.0.0.1:1000", 2, 4)]

    def lookup(block: int) -> list[ServerRecord]:
        reads.append(block)
        return list(records)

    targets = HandoffTargets(lookup, ttl=60, min_refresh=1, clock=lambda: now[0])

    async def run() -> None:
        assert await targets.check("10.0.0.1:1000", 2) is None
        assert await targets.check("10.0.0.1:1000", 2) is None  # remembered: no second read
        assert reads == [2]
        assert "10.0.0.9:80 is not a node serving block 2" in await targets.check("10.0.0.9:80", 2)
        assert reads == [2]  # a fresh read at most once a second per block
        records.append(_record("10.0.0.9:80", 0, 3))
        now[0] = 1.5
        assert await targets.check("10.0.0.9:80", 2) is None  # a node that joined since
        assert reads == [2, 2]

    asyncio.run(run())


def test_handoff_targets_unknown_when_the_dht_fails():
    def lookup(block: int) -> list[ServerRecord]:
        raise TimeoutError("no answer")

    with pytest.raises(TargetsUnknown, match="no answer"):
        asyncio.run(HandoffTargets(lookup).check("10.0.0.1:1000", 2))
