"""Untrusted nodes with real daemons: wrong activations and wrong weights.

Blocks 2..3 are served by an honest node, by a node started with HOMESWARM_FAULT=corrupt (noise on every
output) announcing a far higher throughput so that routes go through it, and by a node serving another
checkpoint (other weights, same model name) announcing a higher throughput still. Checking every step,
greedy generation is exact every time and the corrupt node ends up banned and reported; without checks
its noise reaches the output. A client with the checkpoint refuses the node of other weights, unless told
not to check them.
"""

from __future__ import annotations

import logging
import time

import pytest
import torch

from homeswarm.client.config import ClientConfig
from homeswarm.client.local_swarm import Daemon, LocalSwarm
from homeswarm.client.model import AutoDistributedModelForCausalLM
from homeswarm.client.verify import rel_err
from homeswarm.protocol import PROTOCOL_VERSION, deserialize_tensor, node_pb2, node_pb2_grpc, serialize_tensor
from tests.helpers.checkpoints import make_checkpoint, reference_greedy

pytestmark = pytest.mark.timeout(300)
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("verify") / "mistral", "mistral", num_layers=4, seed=11)


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("other") / "mistral", "mistral", num_layers=4, seed=12)


@pytest.fixture(scope="module")
def swarm(checkpoint, other_weights, tmp_path_factory):
    with LocalSwarm(tmp_path_factory.mktemp("swarm")) as swarm:
        swarm.start_bootstrap()
        common = ("--compute-threads", "1")
        first = swarm.start_node(checkpoint, "--blocks", "0:2", *common, wait=False)
        honest = swarm.start_node(checkpoint, "--blocks", "2:4", "--throughput", "1", *common, wait=False)
        env = swarm.env
        swarm.env = {**env, "HOMESWARM_FAULT": "corrupt"}
        corrupt = swarm.start_node(checkpoint, "--blocks", "2:4", "--throughput", "1000", *common, wait=False)
        swarm.env = env
        impostor = swarm.start_node(other_weights, "--blocks", "2:4", "--throughput", "10000", *common, wait=False)
        for node in (first, honest, corrupt, impostor):
            swarm.wait_ready(node)
        yield swarm


def read_every_record(model: AutoDistributedModelForCausalLM, swarm: LocalSwarm) -> None:
    """Until the client has read (or refused) every node's record: a DHT read under load may miss one."""
    deadline = time.monotonic() + 60
    while True:
        seen = {r.peer_id for r in model.routes.records(refresh=True)} | set(model.routes.refused)
        if {n.info["peer_id"] for n in swarm.nodes} <= seen:
            return
        assert time.monotonic() < deadline, "some node's record was never read"


def forward(node: Daemon, hidden: torch.Tensor, start: int = 2, end: int = 4) -> torch.Tensor:
    with LocalSwarm.channel(node) as channel:
        response = node_pb2_grpc.NodeStub(channel).Forward(node_pb2.ForwardRequest(
            protocol_version=PROTOCOL_VERSION, hidden=serialize_tensor(hidden), start_block=start, end_block=end),
            timeout=30)
    return deserialize_tensor(response.hidden)


def test_the_faulty_node_says_so_and_is_wrong(swarm):
    honest, corrupt = swarm.nodes[1], swarm.nodes[2]
    assert "HOMESWARM_FAULT=corrupt" in corrupt.log() and "HOMESWARM_FAULT" not in honest.log()
    hidden = torch.randn(1, 5, 64)
    assert rel_err(forward(corrupt, hidden), forward(honest, hidden)) > 0.2
    assert rel_err(forward(honest, hidden), forward(honest, hidden)) == 0.0


def test_checked_generation_is_exact_and_bans_the_corrupt_node(swarm, checkpoint, caplog):
    corrupt = swarm.nodes[2].info
    prompt = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(3))
    expected = reference_greedy(checkpoint, prompt, NEW_TOKENS).tolist()
    config = ClientConfig(verify_fraction=1.0, handoff_min_rtt=0.0)
    with caplog.at_level(logging.WARNING, logger="homeswarm.client.session"):
        with AutoDistributedModelForCausalLM.from_pretrained(checkpoint, initial_peers=swarm.initial_peers,
                                                             config=config) as model:
            read_every_record(model, swarm)
            session = model.inference_session(max_length=prompt.shape[1] + NEW_TOKENS)
            with session:
                assert session.route[1][0] == corrupt["address"]  # the planner preferred the corrupt node
                got = model.generate(prompt, max_new_tokens=NEW_TOKENS, session=session)
                assert got.tolist() == expected
                assert session.caught == [corrupt["peer_id"]]
                assert corrupt["address"] not in [address for address, _, _ in session.route]
            assert model.routes.is_banned(corrupt["peer_id"])
            for _ in range(2):  # later generations stay exact, avoiding it
                assert model.generate(prompt, max_new_tokens=NEW_TOKENS).tolist() == expected
    reports = [r.message for r in caplog.records if "returned wrong hidden states" in r.message]
    assert len(reports) == 1 and corrupt["address"] in reports[0] and "recomputing the step" in reports[0]


def test_without_checks_the_noise_reaches_the_output(swarm, checkpoint):
    prompt = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(3))
    with AutoDistributedModelForCausalLM.from_pretrained(checkpoint, initial_peers=swarm.initial_peers,
                                                         config=ClientConfig(handoff=False)) as model:
        read_every_record(model, swarm)
        embedded = model.head.embed(prompt)
        with model.inference_session(max_length=prompt.shape[1]) as session:
            assert session.route[1][0] == swarm.nodes[2].info["address"]
            got = session.step(embedded)
    honest = forward(swarm.nodes[1], forward(swarm.nodes[0], embedded, 0, 2))
    assert rel_err(got, honest) > 0.2


def test_a_node_of_other_weights_is_refused(swarm, checkpoint, caplog):
    impostor = swarm.nodes[3].info
    prompt = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(5))
    with caplog.at_level(logging.WARNING, logger="homeswarm.client.route"):
        with AutoDistributedModelForCausalLM.from_pretrained(checkpoint, initial_peers=swarm.initial_peers,
                                                             config=ClientConfig(verify_fraction=1.0)) as model:
            read_every_record(model, swarm)
            with model.inference_session(max_length=9) as session:
                assert impostor["address"] not in [address for address, _, _ in session.route]
            assert impostor["peer_id"] in model.routes.refused
            expected = reference_greedy(checkpoint, prompt, NEW_TOKENS).tolist()  # (the corrupt node is caught)
            assert model.generate(prompt, max_new_tokens=NEW_TOKENS).tolist() == expected
    refusals = [r.message for r in caplog.records if "refusing node" in r.message]
    assert len(refusals) == 1 and impostor["address"] in refusals[0]
    unchecked = ClientConfig(handoff=False, check_weights=False)
    with AutoDistributedModelForCausalLM.from_pretrained(checkpoint, initial_peers=swarm.initial_peers,
                                                         config=unchecked) as model:
        read_every_record(model, swarm)
        assert not model.routes.refused  # without the check, its record is routed to like any other
        assert impostor["peer_id"] in {r.peer_id for r in model.routes.records()}
