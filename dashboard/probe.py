"""Probing nodes: one ``Info`` call per node over asyncio gRPC, timed, bounded by a timeout.

Channels are kept per address between refreshes, so a probe's round trip is the call's, not a
connection set-up's (a new channel makes one untimed call first, as the client's ping does). Channels
of addresses no longer announced are closed. Whatever goes wrong with a node (refused, timed out,
an error status, a malformed address) becomes an unreachable ``Probe`` with the reason; it never
raises, and no probe waits longer than ``timeout`` per call. A node whose record pins a TLS certificate
is probed over TLS trusting that certificate alone (``homeswarm.routing.tls``); one without, in plaintext.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

import grpc

from homeswarm.dashboard.state import COUNTER_NAMES, Probe
from homeswarm.protocol import PROTOCOL_VERSION, node_pb2, node_pb2_grpc
from homeswarm.routing.records import PeerId
from homeswarm.routing.tls import channel_credentials, channel_options, explain, fingerprint


class Prober:
    def __init__(self, timeout: float = 3.0, concurrency: int = 32):
        self.timeout = timeout
        self._limit = asyncio.Semaphore(concurrency)  # a big swarm must not open hundreds of calls at once
        self._channels: dict[str, tuple[str, grpc.aio.Channel]] = {}  # address -> (pinned certificate, channel)
        self._warm: set[str] = set()  # addresses whose channel has carried a successful call

    async def probe(self, address: str, tls_cert: str = "") -> Probe:
        request = node_pb2.InfoRequest(protocol_version=PROTOCOL_VERSION)
        async with self._limit:
            try:
                stub = node_pb2_grpc.NodeStub(self._channel(address, tls_cert))
                if address not in self._warm:
                    await stub.Info(request, timeout=self.timeout)
                    self._warm.add(address)
                t0 = time.perf_counter()
                info = await stub.Info(request, timeout=self.timeout)
                rtt = time.perf_counter() - t0
            except grpc.aio.AioRpcError as e:
                self._warm.discard(address)
                pinned = fingerprint(tls_cert) if tls_cert else ""
                return Probe(reachable=False, error=f"{e.code().name}: {explain(e.details(), pinned)}")
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

    async def probe_all(self, addresses: Mapping[PeerId, str],
                        certs: Mapping[PeerId, str] | None = None) -> dict[PeerId, Probe]:
        """Probe every peer at once (over TLS pinned to ``certs[peer]`` where given); close the channels of
        addresses that are not among them."""
        certs = certs or {}
        for address in set(self._channels) - set(addresses.values()):
            self._warm.discard(address)
            await self._channels.pop(address)[1].close()
        peers = list(addresses)
        probes = await asyncio.gather(*(self.probe(addresses[p], certs.get(p, "")) for p in peers))
        return dict(zip(peers, probes, strict=True))

    def _channel(self, address: str, tls_cert: str) -> grpc.aio.Channel:
        """The channel to ``address``; a new one when the pinned certificate changed (a restarted node)."""
        held = self._channels.get(address)
        if held is None or held[0] != tls_cert:
            if held is not None:
                self._warm.discard(address)
                asyncio.get_running_loop().create_task(held[1].close())
            if tls_cert:
                channel = grpc.aio.secure_channel(address, channel_credentials(tls_cert), options=channel_options())
            else:
                channel = grpc.aio.insecure_channel(address)
            self._channels[address] = (tls_cert, channel)
        return self._channels[address][1]

    async def close(self) -> None:
        for _, channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        self._warm.clear()
