"""A node that cannot be dialled serves through a libp2p relay: real daemons, a real firewall.

The node runs in a network namespace whose iptables drop every inbound connection (outbound ones and
their answers pass), as behind a home NAT. Outside: the bootstrap peer, a second `homeswarm dht` that
is the node's only initial peer (so its relay), a direct node serving the first half of the blocks, and
the client. The node finds out at start that nobody can dial it, announces itself relayed, and serves
through the relay: greedy tokens equal transformers', the direct node hands off to it, and when the
relay dies mid-generation the client fails over to a direct node and still gets exactly those tokens.
"""

from __future__ import annotations

import contextlib
import socket

import pytest
import torch

from homeswarm.client.config import ClientConfig
from homeswarm.client.local_swarm import LocalSwarm, console_script
from homeswarm.client.model import AutoDistributedModelForCausalLM
from homeswarm.client.transport import ping
from homeswarm.routing.dht import _kill_process_tree
from homeswarm.routing.relay import stream_path
from tests.helpers import netns
from tests.helpers.checkpoints import make_checkpoint, reference_greedy

NUM_LAYERS = 4
NEW_TOKENS = 12
# small enough for libp2p's default relay limits (128 KiB each way per connection), which a relay's p2pd
# serves with when a start-up race inside p2pd goes that way (see SwarmDHT.create's relay_service)
PROMPT = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(17))
HANDOFF = ClientConfig(handoff_min_rtt=0.0)  # hand-off forced on (the client would otherwise relay here)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("nat") / "mistral", "mistral", num_layers=NUM_LAYERS, seed=9)


@pytest.fixture(scope="module")
def expected(checkpoint):
    return reference_greedy(checkpoint, PROMPT, NEW_TOKENS)


@pytest.fixture(scope="module")
def nat(checkpoint, tmp_path_factory):
    reason = netns.why_not()
    if reason is not None:
        pytest.skip(f"no network namespace for a node behind NAT: {reason}")
    with netns.unreachable_namespace() as ns, LocalSwarm(tmp_path_factory.mktemp("swarm")) as swarm:
        swarm.start_bootstrap(host=ns.outside_ip)
        # started side by side: the relay and the direct node need only the bootstrap peer
        relay = swarm.start_process([*console_script("homeswarm"), "dht", "--host", ns.outside_ip,
                                     "--initial-peers", *swarm.initial_peers], "relay", wait=False)
        direct = swarm.start_node(checkpoint, "--host", ns.outside_ip, "--blocks", "0:2", "--compute-threads", "1",
                                  wait=False)
        swarm.wait_ready(relay)
        hidden = swarm.start_process([*ns.exec_prefix(), *console_script("join-swarm"), str(checkpoint),
                                      "--initial-peers", *relay.info["dht_maddrs"], "--host", ns.inside_ip,
                                      "--blocks", "2:4", "--compute-threads", "1"], "hidden", wait=False)
        swarm.wait_ready(direct)
        swarm.wait_ready(hidden)
        yield {"ns": ns, "swarm": swarm, "relay": relay, "direct": direct, "hidden": hidden}


def test_unreachable_node_announces_itself_relayed(nat, checkpoint):
    hidden, relay = nat["hidden"], nat["relay"]
    host, port = hidden.info["address"].rsplit(":", 1)
    with pytest.raises(OSError):  # the firewall really drops inbound connections
        socket.create_connection((host, int(port)), timeout=1.0).close()
    assert "0 peer(s) reached it" in hidden.log()
    with AutoDistributedModelForCausalLM.from_pretrained(checkpoint, initial_peers=nat["swarm"].initial_peers) as model:
        records = {r.peer_id: r for r in model.routes.records(refresh=True)}
    assert records[hidden.info["peer_id"]].relays == tuple(relay.info["dht_maddrs"])
    assert not records[nat["direct"].info["peer_id"]].relayed
    assert "peer(s) reached it" in nat["direct"].log() and "0 could not" in nat["direct"].log()


def test_generation_through_relayed_node_with_handoff(nat, checkpoint, expected):
    hidden = nat["hidden"]
    with AutoDistributedModelForCausalLM.from_pretrained(checkpoint, initial_peers=nat["swarm"].initial_peers,
                                                         config=HANDOFF) as model:
        model.routes.records(refresh=True)  # the channel pool learns from the records how to reach each node
        before = ping(model.pool, hidden.info["peer_id"], hidden.info["address"], 10)[1]
        got = model.generate(PROMPT, max_new_tokens=NEW_TOKENS)
        after = ping(model.pool, hidden.info["peer_id"], hidden.info["address"], 10)[1]
        path = stream_path(model.dht, hidden.info["peer_id"])
    assert got.tolist() == expected.tolist()
    assert path is not None and path.endswith("/p2p-circuit")  # the client's connection went through the relay
    # every step came to the relayed node from the direct one (hand-off), none from the client
    assert after.steps_from_peers - before.steps_from_peers == NEW_TOKENS
    assert after.steps_from_client == before.steps_from_client


def test_relay_killed_mid_generation_fails_over(nat, checkpoint, expected):
    swarm, hidden = nat["swarm"], nat["hidden"]
    state: dict = {}

    def start_replacement() -> None:  # a direct node for the relayed node's blocks, after the route is set
        state["replacement"] = swarm.start_node(checkpoint, "--host", nat["ns"].outside_ip, "--blocks", "2:4",
                                                "--compute-threads", "1")

    def kill_relay(session) -> None:
        assert [a for a, start, _ in session.route if start == 2] == [hidden.info["address"]]
        _kill_process_tree(nat["relay"].process.pid)  # the relay and its DHT process and p2pd, as a crash
        nat["relay"].process.wait()

    kills = {1: lambda _session: start_replacement(), 5: kill_relay}
    with AutoDistributedModelForCausalLM.from_pretrained(checkpoint, initial_peers=swarm.initial_peers,
                                                         config=HANDOFF) as model:
        with model.inference_session(max_length=PROMPT.shape[1] + NEW_TOKENS) as session:
            new = []
            for i, tokens in enumerate(model.generate_stream(PROMPT, max_new_tokens=NEW_TOKENS, session=session)):
                new.append(tokens)
                if i in kills:
                    kills[i](session)
            route = session.route
            failovers = session.failovers
    got = torch.cat([PROMPT, torch.stack(new, dim=1)], dim=1)
    assert failovers == 1
    assert [a for a, start, _ in route if start == 2] == [state["replacement"].info["address"]]
    assert got.tolist() == expected.tolist()
    with contextlib.suppress(Exception):
        LocalSwarm.stop(state["replacement"])
