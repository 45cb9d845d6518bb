"""Per-hop wire compression: fixed by the config, or chosen from the hop's measured round trip."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from homeswarm.client.config import ClientConfig
from homeswarm.client.session import InferenceSession
from homeswarm.protocol import node_pb2
from homeswarm.routing.planner import Hop
from homeswarm.routing.records import PeerId, ServerRecord, ServerState


def hop(peer: str) -> Hop:
    record = ServerRecord(peer_id=PeerId(peer), address="127.0.0.1:1000", model="m", start=0, end=2,
                          state=ServerState.ONLINE, protocol_version=1, dtype="float32", throughput=10.0,
                          cache_tokens_left=100)
    return Hop(record, 0, 2)


def choose(config: ClientConfig, rtts: dict[str, float], peer: str) -> int:
    fake = SimpleNamespace(config=config, routes=SimpleNamespace(rtts=rtts))
    return InferenceSession._compression_for(fake, hop(peer))  # type: ignore[arg-type]


@pytest.mark.parametrize(("name", "expected"), [("none", node_pb2.NONE), ("float16", node_pb2.FLOAT16),
                                                 ("bfloat16", node_pb2.BFLOAT16), ("int8", node_pb2.INT8_BLOCKWISE)])
def test_fixed_compression_ignores_rtt(name, expected):
    assert choose(ClientConfig(compression=name), {"a": 0.5}, "a") == expected


def test_auto_is_lossless_on_fast_links_and_float16_on_slow_or_unknown_ones():
    config = ClientConfig(compression="auto", auto_compression_rtt=0.005)
    rtts = {"fast": 0.0004, "slow": 0.040, "edge": 0.005}
    assert choose(config, rtts, "fast") == node_pb2.NONE
    assert choose(config, rtts, "slow") == node_pb2.FLOAT16
    assert choose(config, rtts, "edge") == node_pb2.FLOAT16
    assert choose(config, rtts, "never-pinged") == node_pb2.FLOAT16
