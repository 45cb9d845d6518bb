"""Server-to-server hand-off with real daemons: count the legs of a decoding step through 3 nodes.

With hand-off, the client sends each step to the first node only, each node pushes its output to the
next one, and the last answers the client: N+1 legs on the critical path (the client also receives
every node's output, for failover, but nothing waits on those). Without it, the client relays: 2N.
"""

from __future__ import annotations

import pytest
import torch

from homeswarm.client.config import ClientConfig
from homeswarm.client.local_swarm import LocalSwarm, split_blocks
from homeswarm.client.model import AutoDistributedModelForCausalLM
from homeswarm.client.transport import ping
from tests.helpers.checkpoints import make_checkpoint, reference_greedy

NUM_LAYERS = 6
NEW_TOKENS = 10
PROMPT = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(21))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ho") / "mistral", "mistral", num_layers=NUM_LAYERS, seed=3)


@pytest.fixture(scope="module")
def swarm(checkpoint, tmp_path_factory):
    with LocalSwarm(tmp_path_factory.mktemp("swarm")) as swarm:
        swarm.start_bootstrap()
        nodes = [swarm.start_node(checkpoint, "--blocks", f"{a}:{b}", "--compute-threads", "1", wait=False)
                 for a, b in split_blocks(NUM_LAYERS, 3)]
        for node in nodes:
            swarm.wait_ready(node)
        yield swarm


def counters(swarm: LocalSwarm) -> list[tuple[int, int, int]]:
    pool = swarm.pool()
    try:
        infos = [ping(pool, n.info["peer_id"], n.info["address"], 5)[1] for n in swarm.nodes]
    finally:
        pool.close()
    return [(i.steps_from_client, i.steps_from_peers, i.pushes_sent) for i in infos]


@pytest.mark.parametrize("handoff", [True, False])
def test_decoding_step_legs(swarm, checkpoint, handoff):
    before = counters(swarm)
    with AutoDistributedModelForCausalLM.from_pretrained(
        checkpoint, initial_peers=swarm.initial_peers, config=ClientConfig(handoff=handoff, handoff_min_rtt=0.0)
    ) as model:
        got = model.generate(PROMPT, max_new_tokens=NEW_TOKENS)
    after = counters(swarm)
    delta = [tuple(a - b for a, b in zip(x, y, strict=True)) for x, y in zip(after, before, strict=True)]
    steps = NEW_TOKENS  # the prefill and NEW_TOKENS - 1 decoding steps
    n = len(swarm.nodes)
    if handoff:
        # (from client, from peers, pushes sent) per node, in chain order
        assert delta == [(steps, 0, steps), (0, steps, steps), (0, steps, 0)]
        client_sends = sum(d[0] for d in delta)
        pushes = sum(d[2] for d in delta)
        legs_per_step = (client_sends + pushes + steps) / steps  # + one answer to the client per step
        assert legs_per_step == n + 1
    else:
        assert delta == [(steps, 0, 0)] * n
        legs_per_step = 2 * sum(d[0] for d in delta) / steps
        assert legs_per_step == 2 * n
    assert got.tolist() == reference_greedy(checkpoint, PROMPT, NEW_TOKENS).tolist()


def test_bad_pushes_get_clear_statuses(swarm):
    import grpc

    from homeswarm.protocol import PROTOCOL_VERSION, node_pb2, node_pb2_grpc, serialize_tensor

    node = swarm.nodes[1]
    channel = swarm.channel(node)
    stub = node_pb2_grpc.NodeStub(channel)
    step = node_pb2.Step(step_id=1, hidden=serialize_tensor(torch.randn(1, 1, 64)))
    try:
        with pytest.raises(grpc.RpcError) as unknown:
            stub.Push(node_pb2.PushRequest(protocol_version=PROTOCOL_VERSION, session_id="0" * 32, step=step),
                      timeout=10)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        assert "no open session" in unknown.value.details()
        with pytest.raises(grpc.RpcError) as old:
            stub.Push(node_pb2.PushRequest(protocol_version=0, session_id="nope", step=step), timeout=10)
        assert old.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        channel.close()
