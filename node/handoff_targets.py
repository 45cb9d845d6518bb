"""Which addresses a node may push a session's output to: nodes that serve the next block, per the DHT.

A client names the next hop of a hand-off (``Step.next``); taken on trust, that would let anyone use a
node to open connections to arbitrary addresses. So a target must be the address of a server record
announced for the block right after the session's span. Addresses seen in the records are remembered
for ``ttl`` seconds; an address not among them triggers a fresh read, at most one per block every
``min_refresh`` seconds. Records themselves are only as trustworthy as the DHT's validation makes them
(signed by their node's key); nothing stops a node from announcing someone else's address.
A relayed target is dialled through the relays its record names (``relays_of``), never through relays
a client names.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from homeswarm.routing.records import ServerRecord


class TargetsUnknown(Exception):
    """The DHT could not be read, so it is unknown whether an address is allowed."""


class HandoffTargets:
    def __init__(
        self,
        lookup: Callable[[int], list[ServerRecord]],
        *,
        ttl: float = 60.0,
        min_refresh: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        """``lookup(block)``: the server records of ``block`` (blocking; run on a worker thread)."""
        self.lookup = lookup
        self.ttl = ttl
        self.min_refresh = min_refresh
        self.clock = clock
        self._known: dict[int, tuple[float, frozenset[str]]] = {}  # block -> (read at, addresses)
        self._locks: dict[int, asyncio.Lock] = {}
        self._relays: dict[tuple[str, str], tuple[str, ...]] = {}  # (address, peer id) -> relays, from records
        self._certs: dict[tuple[str, str], str] = {}  # (address, peer id) -> TLS certificate, from records

    async def check(self, address: str, block: int) -> str | None:
        """Why ``address`` is not a node serving ``block`` (None if it is); TargetsUnknown if unsure."""
        read_at, addresses = self._known.get(block, (-float("inf"), frozenset()))
        if address in addresses and self.clock() - read_at < self.ttl:
            return None
        lock = self._locks.setdefault(block, asyncio.Lock())
        async with lock:
            read_at, addresses = self._known.get(block, (-float("inf"), frozenset()))
            if self.clock() - read_at >= self.min_refresh:
                started = self.clock()
                try:
                    records = await asyncio.to_thread(self.lookup, block)
                except Exception as e:  # noqa: BLE001 - a DHT that does not answer: unknown, not refused
                    raise TargetsUnknown(f"could not read the records of block {block}: {e}") from None
                addresses = frozenset(r.address for r in records if r.start <= block < r.end)
                self._relays.update({(r.address, r.peer_id): r.relays for r in records})
                self._certs.update({(r.address, r.peer_id): r.tls_cert for r in records})
                read_at = started
                self._known[block] = (read_at, addresses)
        if address in addresses:
            return None
        return f"hand-off target {address} is not a node serving block {block} in the swarm's records"

    def relays_of(self, address: str, peer_id: str) -> tuple[str, ...]:
        """The relays that the record of ``peer_id`` at ``address`` names (empty: dial it directly)."""
        return self._relays.get((address, peer_id), ())

    def tls_cert_of(self, address: str, peer_id: str) -> str:
        """The TLS certificate that the record of ``peer_id`` at ``address`` pins ("": plaintext, --insecure)."""
        return self._certs.get((address, peer_id), "")
