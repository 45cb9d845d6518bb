"""Sightings: what a node counts as announced, from DHT reads that may miss a server now and then."""

from __future__ import annotations

from homeswarm.node.volunteer import Sightings
from homeswarm.routing.records import PeerId, ServerRecord, ServerState


def rec(peer: str, start: int, state: ServerState = ServerState.ONLINE) -> ServerRecord:
    return ServerRecord(peer_id=PeerId(peer), address="h:1", model="m", start=start, end=start + 4, state=state,
                        protocol_version=1, dtype="float32", throughput=10.0, cache_tokens_left=0)


def test_a_server_one_read_missed_still_counts_until_its_record_would_expire():
    sightings = Sightings(ttl=30.0)
    assert {r.peer_id for r in sightings.update([rec("a", 0), rec("b", 4)], now=0.0)} == {"a", "b"}
    assert {r.peer_id for r in sightings.update([rec("a", 0)], now=10.0)} == {"a", "b"}  # b missed once
    assert {r.peer_id for r in sightings.update([rec("a", 0)], now=31.0)} == {"a"}  # b gone for good


def test_the_latest_record_of_a_peer_wins():
    sightings = Sightings(ttl=30.0)
    sightings.update([rec("a", 0)], now=0.0)
    records = sightings.update([rec("a", 8, ServerState.OFFLINE)], now=5.0)
    assert [(r.start, r.state) for r in records] == [(8, ServerState.OFFLINE)]
