"""Where a node serves, as the swarm changes: reading the swarm, claiming a span, rebalancing.

The decisions are the pure functions of :mod:`homeswarm.routing.block_chooser`; this module feeds them
DHT reads and says what to do. Three loops:

- :func:`settle_claim`, before loading: the node has announced "joining" on the span it chose; it
  reads the swarm again after a settle delay and gives way where a higher-ranked claim overlaps it
  (:func:`~homeswarm.routing.block_chooser.recheck_claim`), until two reads in a row show no
  collision. Nodes started in the same moment thus spread out instead of loading the same span.
- :func:`watch_claim`, for a while after the node went online: the same check, for a collision that
  the reads before loading missed (a record arriving late on a loaded machine); the lower-ranked node
  moves.
- :func:`rebalance`, while serving: every so often, whether moving would clearly lift the swarm's
  weakest blocks.

A single DHT read can miss a record (a DHT peer that holds it was slow to answer under load and is
skipped for a while), or return an older record of a node that has since announced a newer one.
:class:`Sightings` therefore merges the reads: per node, the record that expires last, kept until it
expires, just as the DHT keeps it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections.abc import Awaitable, Callable

from homeswarm.routing.block_chooser import plan_move, recheck_claim
from homeswarm.routing.dht import SwarmDHT, dht_time
from homeswarm.routing.records import PeerId, ServerRecord

logger = logging.getLogger("homeswarm.node")

JOIN_SETTLE = 1.0  # seconds for other nodes' claims to arrive before a choice is confirmed (jittered up to 1.5x)
CLEAN_READS = 2  # reads in a row without a collision that confirm a claim (one read may miss a record)
MAX_READS = 10  # reads before loading at most; a collision left then is caught by the watch after loading


class Sightings:
    """The records seen in recent DHT reads: per peer the one that expires last, until it expires.

    Times are DHT times (:func:`~homeswarm.routing.dht.dht_time`), passed in."""

    def __init__(self) -> None:
        self._seen: dict[PeerId, tuple[float, ServerRecord]] = {}

    def update(self, timed: list[tuple[float, ServerRecord]], now: float) -> list[ServerRecord]:
        for expiration, record in timed:
            held = self._seen.get(record.peer_id)
            if held is None or held[0] < expiration:
                self._seen[record.peer_id] = (expiration, record)
        self._seen = {peer: seen for peer, seen in self._seen.items() if seen[0] > now}
        return [record for _, record in self._seen.values()]


async def read_swarm(dht: SwarmDHT, model: str, total_blocks: int, sightings: Sightings) -> list[ServerRecord]:
    timed = await asyncio.to_thread(dht.get_servers_timed, model, 0, total_blocks)
    return sightings.update(timed, dht_time())


Read = Callable[[], Awaitable[list[ServerRecord]]]


async def settle_claim(read: Read, total_blocks: int, claim: ServerRecord,
                       announce: Callable[[ServerRecord], Awaitable[None]], rng: random.Random, *,
                       settle: float = JOIN_SETTLE) -> ServerRecord:
    """Re-read the swarm after each announcement of ``claim`` (a joining record) and give way to
    higher-ranked overlapping claims, until ``CLEAN_READS`` reads in a row show none (or ``MAX_READS``
    reads were made). Returns the claim to load. A failed read counts as neither clean nor colliding."""
    clean = 0
    for _ in range(MAX_READS):
        await asyncio.sleep(rng.uniform(settle, 1.5 * settle))
        try:
            records = await read()
        except Exception as e:  # the DHT may be briefly slow; the next read may work
            logger.warning("reading the swarm to confirm blocks %d:%d failed: %s", claim.start, claim.end, e)
            continue
        destination = recheck_claim(records, total_blocks, claim)
        if destination is None:
            clean += 1
            if clean >= CLEAN_READS:
                break
            continue
        clean = 0
        start, end = destination
        logger.info("another node claims blocks %d:%d too; taking %d:%d instead",
                    claim.start, claim.end, start, end)
        claim = dataclasses.replace(claim, start=start, end=end)
        await announce(claim)
    return claim


async def watch_claim(read: Read, total_blocks: int, mine: Callable[[], ServerRecord],
                      on_move: Callable[[tuple[int, int]], None], rng: random.Random, *,
                      duration: float, imbalance: float, settle: float = JOIN_SETTLE) -> None:
    """For ``duration`` s after going online, check every settle delay that no higher-ranked node
    claims this node's span where it should serve elsewhere; if one does, call ``on_move`` with the
    destination and stop."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + duration
    while loop.time() < deadline:
        await asyncio.sleep(rng.uniform(settle, 1.5 * settle))
        try:
            records = await read()
        except Exception as e:
            logger.warning("reading the swarm after joining failed: %s", e)
            continue
        claim = mine()
        destination = recheck_claim(records, total_blocks, claim, imbalance=imbalance)
        if destination is not None:
            logger.info("another node joined on blocks %d:%d at the same time and keeps them",
                        claim.start, claim.end)
            on_move(destination)
            return


async def rebalance(read: Read, total_blocks: int, me: PeerId, on_move: Callable[[tuple[int, int]], None], *,
                    interval: float, imbalance: float, settle: float, rng: random.Random) -> None:
    """Every ``interval`` s (jittered, so that nodes do not check in step), weigh a move; confirm it
    ``settle`` s later (a node that moved meanwhile announced "joining" where it went, a server that one
    read missed has announced again) and call ``on_move`` with the destination."""
    while True:
        await asyncio.sleep(interval * rng.uniform(0.5, 1.5))
        destination = None
        for confirm in (False, True):
            if confirm:
                await asyncio.sleep(rng.uniform(settle, 1.5 * settle))
            try:
                records = await read()
            except Exception as e:  # the DHT may be briefly unreachable; the next check will tell
                logger.warning("reading the swarm for rebalancing failed: %s", e)
                destination = None
                break
            destination = plan_move(records, total_blocks, me, imbalance=imbalance)
            if destination is None:
                break
        if destination is not None:
            on_move(destination)
            return
