"""Probing nodes: one ``Info`` call per node over asyncio gRPC, timed, bounded by a timeout.

Channels are kept per address between refreshes, so a probe's round trip is the call's, not a
connection set-up's (a new channel makes one untimed call first, as the client's ping does). Channels
of addresses no longer announced are closed. Whatever goes wrong with a node (refused, timed out,
an error status, a malformed address) becomes an unreachable ``Probe`` with the reason; it never
raises, and no probe waits longer than ``timeout`` per call.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

import grpc

from homeswarm.dashboard.state import COUNTER_NAMES, Probe
from homeswarm.protocol import PROTOCOL_VERSION, node_pb2, node_pb2_grpc
from homeswarm.routing.records import PeerId


class Prober:
    def __init__(self, timeout: float = 3.0, concurrency: int = 32):
        self.timeout = timeout
        self._limit = asyncio.Semaphore(concurrency)  # a big swarm must not open hundreds of calls at once
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._warm: set[str] = set()  # addresses whose channel has carried a successful call

    async def probe(self, address: str) -> Probe:
        request = node_pb2.InfoRequest(protocol_version=PROTOCOL_VERSION)
        async with self._limit:
            try:
                stub = node_pb2_grpc.NodeStub(self._channel(address))
                if address not in self._warm:
                    await stub.Info(request, timeout=self.timeout)
                    self._warm.add(address)
                t0 = time.perf_counter()
                info = await stub.Info(request, timeout=self.timeout)
                rtt = time.perf_counter() - t0
            except grpc.aio.AioRpcError as e:
                self._warm.discard(address)
                return Probe(reachable=False, error=f"{e.code().name}: {e.details()}")
            except (ValueError, RuntimeError) as e:  # e.g. an address gRPC cannot parse
                return Probe(reachable=False, error=str(e))
        return Probe(
            reachable=True,
            rtt_ms=rtt * 1000,
            version=info.software_version,
            active_sessions=info.active_sessions,
            uptime_seconds=info.uptime_seconds or None,  # 0: a node older than the field
            counters={name: getattr(info, name) for name in COUNTER_NAMES},
        )

    async def probe_all(self, addresses: Mapping[PeerId, str]) -> dict[PeerId, Probe]:
        """Probe every peer at once; close the channels of addresses that are not among them."""
        for address in set(self._channels) - set(addresses.values()):
            self._warm.discard(address)
            await self._channels.pop(address).close()
        peers = list(addresses)
        probes = await asyncio.gather(*(self.probe(addresses[p]) for p in peers))
        return dict(zip(peers, probes, strict=True))

    def _channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = grpc.aio.insecure_channel(address)
        return self._channels[address]

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        self._warm.clear()
