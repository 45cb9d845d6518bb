"""asyncio gRPC channels from this node to other nodes, for server-to-server hand-off.

A next node that announces relays is dialled through a loopback forwarder (``forwarder``: peer id and
relays in, ``127.0.0.1:PORT`` out; see ``homeswarm.routing.relay``); one channel per peer then. A next
node whose record carries a TLS certificate is dialled over TLS pinned to it (through a forwarder too: the
TLS bytes travel through the libp2p stream); one without, in plaintext.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import grpc

from homeswarm.protocol import node_pb2_grpc
from homeswarm.protocol.limits import GRPC_OPTIONS
from homeswarm.routing.tls import channel_credentials, channel_options, fingerprint


class PeerChannels:
    """asyncio gRPC channels to other nodes, for hand-off; one per address."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.forwarder: Callable[[str, Sequence[str]], Awaitable[str]] | None = None

    async def stub(self, address: str, peer_id: str = "", relays: Sequence[str] = (),
                   tls_cert: str = "") -> node_pb2_grpc.NodeStub:
        """A stub for the node at ``address``; over TLS pinned to ``tls_cert`` (its record's) when given."""
        key = f"{f'relayed:{peer_id}' if relays else address}|{fingerprint(tls_cert) if tls_cert else ''}"
        if key not in self._channels:
            if relays:
                if self.forwarder is None or not peer_id:
                    raise ValueError("a relayed next node needs its peer id and this node's DHT")
                address = await self.forwarder(peer_id, tuple(relays))
            if tls_cert:
                self._channels[key] = grpc.aio.secure_channel(address, channel_credentials(tls_cert),
                                                              options=channel_options(GRPC_OPTIONS))
            else:
                self._channels[key] = grpc.aio.insecure_channel(address, options=GRPC_OPTIONS)
        return node_pb2_grpc.NodeStub(self._channels[key])

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
