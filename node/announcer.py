"""Keeps this node's record alive on the DHT: announces, refreshes well before expiry, goes offline.

The record is rebuilt at each refresh (free cache changes as sessions come and go). DHT calls block,
so they run on a small thread pool of their own, never on the compute thread or the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from homeswarm.routing.dht import SwarmDHT, dht_time
from homeswarm.routing.records import ServerRecord, ServerState

logger = logging.getLogger(__name__)


class Announcer:
    def __init__(
        self,
        dht: SwarmDHT,
        make_record: Callable[[ServerState], ServerRecord],
        total_blocks: int,
        ttl: float,
    ):
        self.dht = dht
        self.make_record = make_record
        self.total_blocks = total_blocks
        self.ttl = ttl
        self.state = ServerState.JOINING
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="announce")
        self._wake = asyncio.Event()

    async def announce(self, state: ServerState | None = None) -> None:
        if state is not None:
            self.state = state
        record = self.make_record(self.state)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(
            self._pool, self.dht.announce, record, self.total_blocks, dht_time() + self.ttl
        )

    def poke(self) -> None:
        """Refresh soon (e.g. the free cache changed a lot)."""
        self._wake.set()

    async def run(self) -> None:
        """Refresh every third of the TTL until cancelled."""
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.ttl / 3)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.announce()
            except Exception as e:  # a failed refresh must not kill the node; the next one may work
                logger.warning("announcing to the DHT failed: %s", e)

    def close(self) -> None:
        self._pool.shutdown(wait=False)
