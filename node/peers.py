"""asyncio gRPC channels from this node to other nodes, for server-to-server hand-off."""

from __future__ import annotations

import grpc

from homeswarm.protocol import node_pb2_grpc
from homeswarm.protocol.limits import GRPC_OPTIONS


class PeerChannels:
    """asyncio gRPC channels to other nodes, for hand-off; one per address."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}

    def stub(self, address: str) -> node_pb2_grpc.NodeStub:
        if address not in self._channels:
            self._channels[address] = grpc.aio.insecure_channel(address, options=GRPC_OPTIONS)
        return node_pb2_grpc.NodeStub(self._channels[address])

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
