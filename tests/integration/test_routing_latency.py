"""Latency-aware routing with real daemons: a 250 ms-each-way proxy sits in front of one of two
replicas (announced through --public-address); the client measures it and routes through the other.

The delay is far above what a loopback round trip takes on a busy machine (a few ms with one core kept
busy by another process), so the choice cannot flip under load."""

from __future__ import annotations

import socket

import pytest
import torch

from homeswarm.client.local_swarm import LocalSwarm
from homeswarm.client.model import AutoDistributedModelForCausalLM
from tests.helpers.checkpoints import make_checkpoint, reference_greedy
from tests.helpers.proxy import DelayingProxy

DELAY = 0.25


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("lat") / "qwen2", "qwen2", num_layers=4, seed=9)


@pytest.mark.parametrize("delayed", [0, 1])
def test_client_avoids_the_delayed_replica(tmp_path, checkpoint, delayed):
    with LocalSwarm(tmp_path) as swarm:
        swarm.start_bootstrap()
        ports = [free_port(), free_port()]
        proxy = DelayingProxy("127.0.0.1", ports[delayed], delay=DELAY)
        try:
            nodes = []
            for i, port in enumerate(ports):
                args = ["--port", str(port), "--model-name", "lat", "--compute-threads", "1"]
                if i == delayed:
                    args += ["--public-address", proxy.address]
                nodes.append(swarm.start_node(checkpoint, *args, wait=False))
            for node in nodes:
                swarm.wait_ready(node)
            assert nodes[delayed].info["address"] == proxy.address
            fast = nodes[1 - delayed].info["address"]
            with AutoDistributedModelForCausalLM.from_pretrained(
                checkpoint, initial_peers=swarm.initial_peers, model_name="lat"
            ) as model:
                prompt = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(0))
                with model.inference_session(max_length=40) as session:
                    assert session.route == [(fast, 0, 4)]
                    got = model.generate(prompt, max_new_tokens=8, session=session)
                rtts = {r.address: model.routes.rtts[r.peer_id] for r in model.routes.records()}
            assert rtts[proxy.address] >= 2 * DELAY  # the ping really went through the proxy
            assert rtts[fast] < DELAY
            assert proxy.bytes_forwarded > 0
            assert got.tolist() == reference_greedy(checkpoint, prompt, 8).tolist()
        finally:
            proxy.close()
