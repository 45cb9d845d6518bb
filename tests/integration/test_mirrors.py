"""Mirror sessions with real daemons: a second server of a hop's blocks gets the same inputs, its answers are
compared with the hop's, and it takes over at once when the hop dies.

Blocks 0..1: an honest node announcing a high throughput (routes take it) and a HOMESWARM_FAULT=corrupt one
(noise on every output) announcing a low one: the corrupt node is the mirror. Blocks 2..3: the other way
round (the corrupt node is the hop, an honest one its mirror), and a third, honest node. Greedy generation is
exact every time, and both corrupt nodes are caught from their first answer. Then, with the corrupt nodes out
of the way, the hop of blocks 2..3 is killed at a long context: its mirror answers on, with no replay.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from homeswarm.client.config import ClientConfig
from homeswarm.client.local_swarm import LocalSwarm
from homeswarm.client.model import AutoDistributedModelForCausalLM
from tests.helpers.checkpoints import make_checkpoint, reference_greedy
from tests.helpers.reference import node_info

pytestmark = pytest.mark.timeout(300)
NEW_TOKENS = 6
CONFIG = ClientConfig(mirrors=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("mirror") / "mistral", "mistral", num_layers=4, seed=21)


@pytest.fixture(scope="module")
def swarm(checkpoint, tmp_path_factory):
    with LocalSwarm(tmp_path_factory.mktemp("swarm")) as swarm:
        swarm.start_bootstrap()
        common = ("--compute-threads", "1")
        nodes = {"honest01": swarm.start_node(checkpoint, "--blocks", "0:2", "--throughput", "1000", *common, wait=False)}
        env = swarm.env
        swarm.env = {**env, "HOMESWARM_FAULT": "corrupt"}
        nodes["corrupt01"] = swarm.start_node(checkpoint, "--blocks", "0:2", "--throughput", "1", *common, wait=False)
        nodes["corrupt23"] = swarm.start_node(checkpoint, "--blocks", "2:4", "--throughput", "1000", *common,
                                              wait=False)
        swarm.env = env
        nodes["honest23"] = swarm.start_node(checkpoint, "--blocks", "2:4", "--throughput", "1", *common, wait=False)
        nodes["spare23"] = swarm.start_node(checkpoint, "--blocks", "2:4", "--throughput", "10", *common, wait=False)
        for node in nodes.values():
            swarm.wait_ready(node)
        swarm.by_name = {name: node.info for name, node in nodes.items()}
        swarm.daemons = nodes
        yield swarm


def read_every_record(model, swarm) -> None:
    deadline = time.monotonic() + 60
    while {n.info["peer_id"] for n in swarm.nodes} - {r.peer_id for r in model.routes.records(refresh=True)}:
        assert time.monotonic() < deadline, "some node's record was never read"


def test_mirrored_generation_is_exact_whichever_replica_routes_prefer(swarm, checkpoint, caplog):
    nodes = swarm.by_name
    prompt = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(3))
    expected = reference_greedy(checkpoint, prompt, NEW_TOKENS).tolist()
    caplog.set_level("WARNING", logger="homeswarm.client.session")
    for _ in range(2):  # every time: a fresh client, which knows nothing of the corrupt nodes
        with AutoDistributedModelForCausalLM.from_pretrained(checkpoint, initial_peers=swarm.initial_peers,
                                                             config=CONFIG) as model:
            read_every_record(model, swarm)
            with model.inference_session(max_length=prompt.shape[1] + NEW_TOKENS) as session:
                assert [a for a, _, _ in session.route] == [nodes["honest01"]["address"],
                                                            nodes["corrupt23"]["address"]]
                assert session.mirrors[0] == (nodes["corrupt01"]["address"], 0, 2)
                got = model.generate(prompt, max_new_tokens=NEW_TOKENS, session=session)
                assert got.tolist() == expected
                assert sorted(session.caught) == sorted([nodes["corrupt01"]["peer_id"], nodes["corrupt23"]["peer_id"]])
                assert session.failovers == 0 and session.replayed_tokens == 0
                assert nodes["corrupt23"]["address"] not in [a for a, _, _ in session.route]
            assert model.routes.is_banned(nodes["corrupt01"]["peer_id"])
            assert model.routes.is_banned(nodes["corrupt23"]["peer_id"])
    reports = [r.getMessage() for r in caplog.records if "returned wrong hidden states" in r.getMessage()]
    assert len(reports) == 4, reports


LONG_PROMPT = 1500


def test_a_killed_hop_is_replaced_by_its_mirror_without_replay(swarm, checkpoint):
    """Last in the module: it kills a node."""
    nodes = swarm.by_name
    prompt = torch.randint(0, 256, (1, LONG_PROMPT), generator=torch.Generator().manual_seed(4))
    new_tokens, kill_at = 12, 6
    expected = reference_greedy(checkpoint, prompt, new_tokens).tolist()
    with AutoDistributedModelForCausalLM.from_pretrained(checkpoint, initial_peers=swarm.initial_peers,
                                                         config=CONFIG) as model:
        read_every_record(model, swarm)
        for name in ("corrupt01", "corrupt23"):  # out of the way: this test is about failover
            model.routes.ban(nodes[name]["peer_id"], seconds=3600)
        with model.inference_session(max_length=LONG_PROMPT + new_tokens) as session:
            primary, mirror = session.route[1][0], session.mirrors[-1][0]
            assert {primary, mirror} == {nodes["honest23"]["address"], nodes["spare23"]["address"]}
            victim = next(d for d in swarm.daemons.values() if d.info["address"] == primary)
            survivor = next(d for d in swarm.daemons.values() if d.info["address"] == mirror)
            before = node_info(mirror, survivor.info).steps_from_client
            ids, gaps = prompt, []
            for i in range(new_tokens):
                if i == kill_at:
                    LocalSwarm.kill(victim)
                t0 = time.perf_counter()
                hidden = session.step(model.head.embed(ids if i == 0 else ids[:, -1:]))
                gaps.append(time.perf_counter() - t0)
                token = model.head.logits(hidden[:, -1:])[:, -1].float().argmax(dim=-1)
                ids = torch.cat([ids, token[:, None]], dim=1)
            assert session.route[1][0] == mirror
            assert session.failovers == 1 and session.promotions == 1 and session.replayed_tokens == 0
        after = node_info(mirror, survivor.info).steps_from_client
    assert ids.tolist() == expected
    assert after - before == new_tokens  # one message per step: nothing was replayed to it
    decoding = gaps[1:]
    assert max(decoding) - statistics.median(decoding) < 1.0, gaps
