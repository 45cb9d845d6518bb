"""Mirror sessions with real daemons: a second server of a hop's blocks gets the same inputs, its answers are
compared with the hop's, and it takes over at once when the hop dies.

Blocks 0..1: an honest node announcing a high throughput (routes take it) and a HOMESWARM_FAULT=corrupt one
(noise on every output) announcing a low one: the corrupt node is the mirror. Blocks 2..3: the other way
round (the corrupt node is the hop, an honest one its mirror), and a third, honest node. Greedy generation is
exact every time, and both corrupt nodes are caught from their first answer; with blocks 0..1's preference
turned (the honest node's round trip made to look slow), and with ``homeswarm generate`` run as a user runs it
too. Then, with the corrupt nodes out of the way, the hop of blocks 2..3 is killed at a long context: its mirror
answers on, with no replay.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import time

import pytest
import torch

from homeswarm.client.config import ClientConfig
from homeswarm.client.local_swarm import LocalSwarm, console_script
from homeswarm.client.model import AutoDistributedModelForCausalLM
from tests.helpers.checkpoints import make_checkpoint, reference_greedy
from tests.helpers.reference import node_info, steps_in

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


@pytest.mark.parametrize("first_hop", ["honest", "corrupt"])
def test_mirrored_generation_is_exact_whichever_replica_routes_prefer(swarm, checkpoint, caplog, first_hop):
    """Blocks 2..3 (the last hop): routes prefer the corrupt node. Blocks 0..1: the honest node as announced, or,
    with its round trip made to look slow, the corrupt one; then the hop after it computed from a wrong answer
    and goes again from the right one (``session.reruns``) before the step returns."""
    nodes = swarm.by_name
    prompt = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(3))
    expected = reference_greedy(checkpoint, prompt, NEW_TOKENS).tolist()
    caplog.set_level("WARNING")
    primary, mirror = ("honest01", "corrupt01") if first_hop == "honest" else ("corrupt01", "honest01")
    for _ in range(2):  # every time: a fresh client, which knows nothing of the corrupt nodes
        with AutoDistributedModelForCausalLM.from_pretrained(checkpoint, initial_peers=swarm.initial_peers,
                                                             config=CONFIG) as model:
            read_every_record(model, swarm)
            if first_hop == "corrupt":  # 30 s of round trip outweighs its announced throughput
                model.routes.record_rtt(nodes["honest01"]["peer_id"], 100.0)
            with model.inference_session(max_length=prompt.shape[1] + NEW_TOKENS) as session:
                assert [a for a, _, _ in session.route] == [nodes[primary]["address"], nodes["corrupt23"]["address"]]
                assert session.mirrors[0] == (nodes[mirror]["address"], 0, 2)
                got = model.generate(prompt, max_new_tokens=NEW_TOKENS, session=session)
                assert got.tolist() == expected
                assert sorted(session.caught) == sorted([nodes["corrupt01"]["peer_id"], nodes["corrupt23"]["peer_id"]])
                assert session.failovers == 0 and session.replayed_tokens == 0
                assert session.reruns == (1 if first_hop == "corrupt" else 0)
                assert [a for a, _, _ in session.route][0] == nodes["honest01"]["address"]
                assert nodes["corrupt23"]["address"] not in [a for a, _, _ in session.route]
            assert model.routes.is_banned(nodes["corrupt01"]["peer_id"])
            assert model.routes.is_banned(nodes["corrupt23"]["peer_id"])
    reports = [r.getMessage() for r in caplog.records if "returned wrong hidden states" in r.getMessage()]
    assert len(reports) == 4, reports


def test_the_cli_with_default_settings_is_exact_whichever_replica_routes_prefer(swarm, checkpoint):
    """``homeswarm generate`` as a user runs it (no --trust, no --verify-fraction): on blocks 0..1 routes prefer the
    honest node (the corrupt one is its mirror), on blocks 2..3 the corrupt one (an honest node is its mirror).
    The process knows nothing of the corrupt nodes; the output is exact from the first token."""
    nodes = swarm.by_name
    prompt = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(5))
    expected = reference_greedy(checkpoint, prompt, NEW_TOKENS)[0, prompt.shape[1]:].tolist()
    argv = [*console_script("homeswarm"), "generate", str(checkpoint), "--initial-peers", *swarm.initial_peers,
            "--prompt-ids", ",".join(map(str, prompt[0].tolist())), "--max-new-tokens", str(NEW_TOKENS), "--json",
            "--verbose"]
    for _ in range(1):  # a process takes ~20 s to start here; fresh clients are repeated in the test above
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stderr[-3000:]
        out = json.loads(done.stdout)
        assert out["token_ids"] == expected
        caught = [line for line in done.stderr.splitlines() if "returned wrong hidden states" in line]
        # the corrupt hop of blocks 2..3 is caught at its first answer and its mirror's answer used; the corrupt
        # mirror of blocks 0..1 is caught too, the honest hop's answer kept
        assert any(nodes["corrupt23"]["address"] in line and "its mirror's answer used" in line for line in caught), \
            done.stderr[-3000:]
        assert any(nodes["corrupt01"]["address"] in line and "answer used" not in line for line in caught), \
            done.stderr[-3000:]
        assert len(caught) == 2, caught
        route = {tuple(hop["blocks"]): hop["address"] for hop in out["route"]}
        assert route[(0, 2)] == nodes["honest01"]["address"]
        assert route[(2, 4)] in (nodes["honest23"]["address"], nodes["spare23"]["address"])


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
            # steps it receives, from the client or pushed by the first hop's node: once the mirrors are gone (no
            # spare server left), steps may go by hand-off, which loopback's round trips under load can favour
            before = steps_in(node_info(mirror, survivor.info))
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
            state = (f"mirror checks {session.mirror_checks}, route {session.route}, mirrors {session.mirrors}, "
                     f"gaps {gaps}")
        after = steps_in(node_info(mirror, survivor.info))
    assert ids.tolist() == expected
    # one message per step: nothing was replayed to it
    assert after - before == new_tokens, f"{before} -> {after} steps received; {state}"
    decoding = gaps[1:]
    assert max(decoding) - statistics.median(decoding) < 1.0, gaps
