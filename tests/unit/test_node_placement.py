"""Placement of a node: what it counts as announced (Sightings), and the claim handshake of nodes that
start in the same moment, on a simulated DHT whose announcements arrive late and whose reads miss
records (no sockets; asyncio with short delays)."""

from __future__ import annotations

import asyncio
import dataclasses
import random

import pytest

from homeswarm.node.placement import CLEAN_READS, Sightings, settle_claim, watch_claim
from homeswarm.routing.block_chooser import choose_blocks
from homeswarm.routing.records import PeerId, ServerRecord, ServerState


def rec(peer: str, start: int, state: ServerState = ServerState.ONLINE, n: int = 4) -> ServerRecord:
    return ServerRecord(peer_id=PeerId(peer), address="h:1", model="m", start=start, end=start + n, state=state,
                        protocol_version=1, dtype="float32", throughput=10.0, cache_tokens_left=0)


# --- Sightings -----------------------------------------------------------------------------------


def test_a_server_one_read_missed_still_counts_until_its_record_expires():
    sightings = Sightings()
    assert {r.peer_id for r in sightings.update([(30.0, rec("a", 0)), (30.0, rec("b", 4))], now=0.0)} == {"a", "b"}
    assert {r.peer_id for r in sightings.update([(40.0, rec("a", 0))], now=10.0)} == {"a", "b"}  # b missed once
    assert {r.peer_id for r in sightings.update([(60.0, rec("a", 0))], now=31.0)} == {"a"}  # b gone for good


def test_the_record_that_expires_last_wins_whatever_order_the_reads_bring():
    sightings = Sightings()
    sightings.update([(35.0, rec("a", 8, ServerState.OFFLINE))], now=5.0)
    # a later read that missed the newer record and found the older one under other blocks
    records = sightings.update([(30.0, rec("a", 0, ServerState.JOINING))], now=6.0)
    assert [(r.start, r.state) for r in records] == [(8, ServerState.OFFLINE)]
    records = sightings.update([(40.0, rec("a", 4, ServerState.JOINING))], now=7.0)
    assert [(r.start, r.state) for r in records] == [(4, ServerState.JOINING)]


# --- nodes claiming spans at the same moment -----------------------------------------------------


class LaggyDHT:
    """Announcements become visible after a random delay; each read misses each record with some
    probability and may return a node's older record instead. Records never expire here."""

    def __init__(self, rng: random.Random, *, lag: float, miss: float):
        self.rng, self.lag, self.miss = rng, lag, miss
        self.stored: dict[PeerId, list[tuple[float, float, ServerRecord]]] = {}  # visible from, version, record
        self.version = 0.0

    def store(self, record: ServerRecord) -> None:
        self.version += 1
        visible = asyncio.get_running_loop().time() + self.rng.uniform(0, self.lag)
        self.stored.setdefault(record.peer_id, []).append((visible, self.version, record))

    def read(self) -> list[tuple[float, ServerRecord]]:
        now = asyncio.get_running_loop().time()
        found = []
        for versions in self.stored.values():
            seen = [(version, r) for visible, version, r in versions if visible <= now and self.rng.random() > self.miss]
            if seen:
                found.append(max(seen, key=lambda item: item[0]))  # the "expiration": later versions expire later
        return found


async def join(dht: LaggyDHT, peer: str, rng: random.Random, *, settle: float, watch: float) -> tuple[int, int]:
    """One node's join: read, choose, claim, settle the claim, then "load" and watch it a while."""
    sightings = Sightings()

    async def read() -> list[ServerRecord]:
        return sightings.update(dht.read(), now=0.0)

    async def announce(claim: ServerRecord) -> None:
        dht.store(claim)

    await asyncio.sleep(rng.uniform(0, settle))
    start, end = choose_blocks([r for r in await read() if r.peer_id != peer], 12, 4)
    claim = rec(peer, start, ServerState.JOINING)
    await announce(claim)
    claim = await settle_claim(read, 12, claim, announce, rng, settle=settle)
    online = dataclasses.replace(claim, state=ServerState.ONLINE)
    dht.store(online)
    moved: list[tuple[int, int]] = []
    await watch_claim(read, 12, lambda: online, moved.append, rng, duration=watch, imbalance=0.2, settle=settle)
    if moved:  # the move: a new claim where it was sent, settled again
        claim = await settle_claim(read, 12, rec(peer, moved[0][0], ServerState.JOINING), announce, rng,
                                   settle=settle)
        dht.store(dataclasses.replace(claim, state=ServerState.ONLINE))
    return claim.start, claim.end


@pytest.mark.parametrize("seed", range(12))
def test_three_nodes_claiming_at_once_spread_despite_late_and_missed_records(seed):
    rng = random.Random(seed)
    dht = LaggyDHT(rng, lag=0.03, miss=0.3)  # announcements arrive up to 1.5 settle delays late

    async def main() -> list[tuple[int, int]]:
        peers = [f"p{rng.randrange(10**6):06d}" for _ in range(3)]
        return await asyncio.wait_for(asyncio.gather(*(join(dht, p, random.Random(rng.random()), settle=0.02,
                                                             watch=0.2) for p in peers)), 10)

    assert sorted(asyncio.run(main())) == [(0, 4), (4, 8), (8, 12)]


def test_a_claim_is_confirmed_by_clean_reads_in_a_row():
    reads = 0

    async def read() -> list[ServerRecord]:
        nonlocal reads
        reads += 1
        return [rec("a", 0, ServerState.JOINING)] if reads == 2 else []  # the second read sees "a" on 0..3

    announced: list[ServerRecord] = []

    async def announce(claim: ServerRecord) -> None:
        announced.append(claim)

    claim = asyncio.run(settle_claim(read, 12, rec("b", 0, ServerState.JOINING), announce, random.Random(0),
                                     settle=0.001))
    assert (claim.start, claim.end) == (4, 8) and [(c.start, c.end) for c in announced] == [(4, 8)]
    assert reads == 2 + CLEAN_READS
