"""Failover with real daemons: kill -9 nodes during a greedy generation and still get exactly
transformers' tokens. Each test serves its own model name on its own nodes, so a node killed in one
test cannot affect another; one bootstrap peer is shared by the module.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from homeswarm.client.config import ClientConfig
from homeswarm.client.local_swarm import Daemon, LocalSwarm
from homeswarm.client.model import AutoDistributedModelForCausalLM
from homeswarm.client.transport import HopStream
from tests.helpers.checkpoints import make_checkpoint, reference_greedy

NUM_LAYERS = 6
PROMPT = torch.randint(0, 256, (1, 60), generator=torch.Generator().manual_seed(11))
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("fo") / "llama2", "llama2", num_layers=NUM_LAYERS, seed=5)


@pytest.fixture(scope="module")
def expected(checkpoint):
    return reference_greedy(checkpoint, PROMPT, NEW_TOKENS)


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    with LocalSwarm(tmp_path_factory.mktemp("swarm")) as swarm:
        swarm.start_bootstrap()
        yield swarm


def start_nodes(swarm: LocalSwarm, checkpoint, name: str, spans: list[tuple[int, int]]) -> list[Daemon]:
    daemons = [swarm.start_node(checkpoint, "--model-name", name, "--blocks", f"{a}:{b}",
                                "--compute-threads", "1", wait=False) for a, b in spans]
    for daemon in daemons:
        swarm.wait_ready(daemon)
    return daemons


def kill_serving(daemons: list[Daemon], session, blocks: tuple[int, int]) -> Daemon:
    """kill -9 the node that serves ``blocks`` in the session's current route (its whole process group)."""
    address = next(addr for addr, a, b in session.route if (a, b) == blocks)
    victim = next(d for d in daemons if d.info["address"] == address)
    LocalSwarm.kill(victim)
    return victim


def generate_with_kills(model, kills: dict[int, Callable]) -> tuple[torch.Tensor, int]:
    """Greedy generation; before the step that yields token i, run kills[i](session)."""
    with model.inference_session(max_length=PROMPT.shape[1] + NEW_TOKENS) as session:
        if -1 in kills:
            kills[-1](session)
        new = []
        for i, tokens in enumerate(model.generate_stream(PROMPT, max_new_tokens=NEW_TOKENS, session=session)):
            new.append(tokens)
            if i in kills:
                kills[i](session)
        return torch.cat([PROMPT, torch.stack(new, dim=1)], dim=1), session.failovers


# hand-off forced on (on loopback the client would otherwise relay), and relaying
MODES = {"handoff": ClientConfig(handoff_min_rtt=0.0), "relay": ClientConfig(handoff=False)}


@pytest.mark.parametrize("mode", list(MODES))
def test_kill_mid_generation(swarm, checkpoint, expected, mode):
    daemons = start_nodes(swarm, checkpoint, f"fo-mid-{mode}", [(0, 3), (3, 6), (3, 6)])
    with AutoDistributedModelForCausalLM.from_pretrained(checkpoint, initial_peers=swarm.initial_peers,
                                                         model_name=f"fo-mid-{mode}", config=MODES[mode]) as model:
        got, failovers = generate_with_kills(model, {8: lambda s: kill_serving(daemons, s, (3, 6))})
    assert failovers == 1
    assert got.tolist() == expected.tolist()


def test_kill_before_prefill(swarm, checkpoint, expected):
    daemons = start_nodes(swarm, checkpoint, "fo-prefill", [(0, 3), (0, 3), (3, 6)])
    with AutoDistributedModelForCausalLM.from_pretrained(checkpoint, initial_peers=swarm.initial_peers,
                                                         model_name="fo-prefill", config=MODES["handoff"]) as model:
        got, failovers = generate_with_kills(model, {-1: lambda s: kill_serving(daemons, s, (0, 3))})
    assert failovers == 1
    assert got.tolist() == expected.tolist()


@pytest.mark.parametrize("mode", list(MODES))
def test_two_failures_in_one_generation(swarm, checkpoint, expected, mode):
    daemons = start_nodes(swarm, checkpoint, f"fo-two-{mode}", [(0, 3), (0, 3), (3, 6), (3, 6), (3, 6)])
    with AutoDistributedModelForCausalLM.from_pretrained(checkpoint, initial_peers=swarm.initial_peers,
                                                         model_name=f"fo-two-{mode}", config=MODES[mode]) as model:
        got, failovers = generate_with_kills(model, {
            5: lambda s: kill_serving(daemons, s, (3, 6)),
            6: lambda s: kill_serving(daemons, s, (3, 6)),  # the replacement dies right after
            15: lambda s: kill_serving(daemons, s, (0, 3)),
        })
    assert failovers == 3
    assert got.tolist() == expected.tolist()


def test_failure_during_replay(swarm, checkpoint, expected, monkeypatch):
    """The replacement node is killed while the client replays the history to it (replay goes through
    HopStream.replay; live steps use send/receive)."""
    daemons = start_nodes(swarm, checkpoint, "fo-replay", [(0, 3), (3, 6), (3, 6), (3, 6)])
    original_replay = HopStream.replay
    state = {"armed": False, "killed": None, "first": None}

    def replay(self: HopStream, step_id: int, hidden: torch.Tensor, timeout: float | None = None) -> torch.Tensor:
        if state["armed"] and self.start == 3 and state["killed"] is None and self.address != state["first"]:
            victim = next(d for d in daemons if d.info["address"] == self.address)
            LocalSwarm.kill(victim)
            state["killed"] = victim
        return original_replay(self, step_id, hidden, timeout)

    monkeypatch.setattr(HopStream, "replay", replay)

    def first_kill(session) -> None:
        state["first"] = kill_serving(daemons, session, (3, 6)).info["address"]
        state["armed"] = True  # the next step sent to blocks 3..5 is the first replayed one

    with AutoDistributedModelForCausalLM.from_pretrained(checkpoint, initial_peers=swarm.initial_peers,
                                                         model_name="fo-replay", config=MODES["relay"]) as model:
        got, failovers = generate_with_kills(model, {10: first_kill})
    assert state["killed"] is not None
    assert failovers == 2
    assert got.tolist() == expected.tolist()


def test_no_replacement_names_missing_blocks(swarm, checkpoint):
    daemons = start_nodes(swarm, checkpoint, "fo-none", [(0, 3), (3, 6)])
    from homeswarm.client.session import SessionError
    from homeswarm.routing.planner import MissingBlocksError

    with AutoDistributedModelForCausalLM.from_pretrained(checkpoint, initial_peers=swarm.initial_peers,
                                                         model_name="fo-none", config=MODES["relay"]) as model:
        with pytest.raises((MissingBlocksError, SessionError), match=r"3:6"):
            generate_with_kills(model, {4: lambda s: kill_serving(daemons, s, (3, 6))})


def test_a_node_with_a_wrong_certificate_is_refused_and_insecure_nodes_serve(swarm, checkpoint, expected, caplog):
    """A node presenting a TLS certificate other than the one its signed record pins (HOMESWARM_FAULT=wrong-cert)
    is refused with a clear error and routed around; an --insecure node serves in plaintext, handed off to by
    a TLS node. Tokens exact."""
    name = "fo-tls"
    daemons = [swarm.start_node(checkpoint, "--model-name", name, "--blocks", "0:3", "--compute-threads", "1",
                                wait=False)]
    swarm.env["HOMESWARM_FAULT"] = "wrong-cert"
    try:
        daemons.append(swarm.start_node(checkpoint, "--model-name", name, "--blocks", "3:6", "--compute-threads",
                                        "1", wait=False))
    finally:
        del swarm.env["HOMESWARM_FAULT"]
    daemons.append(swarm.start_node(checkpoint, "--model-name", name, "--blocks", "3:6", "--compute-threads", "1",
                                    "--insecure", wait=False))
    for daemon in daemons:
        swarm.wait_ready(daemon)
    tls, wrong, insecure = daemons
    assert tls.info["tls_cert"] and wrong.info["tls_cert"] and insecure.info["tls_cert"] == ""
    assert "THIS NODE ANNOUNCES A TLS CERTIFICATE OTHER THAN" in wrong.log()
    caplog.set_level("INFO", logger="homeswarm.client")
    with AutoDistributedModelForCausalLM.from_pretrained(checkpoint, initial_peers=swarm.initial_peers,
                                                         model_name=name, config=MODES["handoff"]) as model:
        with model.inference_session(max_length=PROMPT.shape[1] + NEW_TOKENS) as session:
            got = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, session=session)
            route = [address for address, _, _ in session.route]
            assert session.uses_handoff
        assert route == [tls.info["address"], insecure.info["address"]]
        assert model.routes.is_banned(wrong.info["peer_id"])
    assert torch.equal(got, expected)
    refusals = [r.getMessage() for r in caplog.records if wrong.info["peer_id"][:16] in r.getMessage()]
    assert any("not the one its signed record pins" in m for m in refusals), refusals
