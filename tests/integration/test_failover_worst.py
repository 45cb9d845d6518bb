"""Failover at the worst moments, with real daemons: kill -9 a node while it computes a step, and while
it hands its output to the next node. The client still gets transformers' numbers and tokens.

Each test serves its own model name on its own nodes; the bootstrap peer is shared by the module.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable

import pytest
import torch

from homeswarm.client.config import ClientConfig
from homeswarm.client.local_swarm import Daemon, LocalSwarm
from homeswarm.client.model import AutoDistributedModelForCausalLM
from homeswarm.client.transport import ChannelPool, HopStream
from tests.helpers.checkpoints import make_checkpoint
from tests.helpers.proxy import DelayingProxy
from tests.helpers.reference import (
    FLOAT32_TOL,
    check_against,
    greedy_steps,
    last_hidden_states,
    node_info,
    reference_in,
    steps_in,
)

pytestmark = pytest.mark.timeout(300)

MODES = {"relay": ClientConfig(handoff=False), "handoff": ClientConfig(handoff_min_rtt=0.0)}


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    with LocalSwarm(tmp_path_factory.mktemp("swarm")) as swarm:
        swarm.start_bootstrap()
        yield swarm


@contextlib.contextmanager
def running(swarm: LocalSwarm, checkpoint, name: str, spans, extra: dict[int, list[str]] | None = None):
    """Nodes serving ``spans`` of ``checkpoint`` under ``name`` (node i with extra[i] arguments), stopped
    on leaving (the module's other tests do not need them)."""
    extra = extra or {}
    daemons = [swarm.start_node(checkpoint, "--model-name", name, "--blocks", f"{a}:{b}", "--compute-threads", "1",
                                *extra.get(i, []), wait=False)
               for i, (a, b) in enumerate(spans)]
    try:
        for daemon in daemons:
            swarm.wait_ready(daemon, timeout=180)
        yield daemons
    finally:
        for daemon in daemons:
            LocalSwarm.stop(daemon)


def serving(daemons: list[Daemon], session, blocks: tuple[int, int]) -> Daemon:
    address = next(addr for addr, a, b in session.route if (a, b) == blocks)
    return next(d for d in daemons if d.info["address"] == address)


def record_results(monkeypatch, on_result: Callable[[HopStream, int], None] | None = None) -> list[tuple[str, int]]:
    """(node address, step id) of every step result the client receives from a node; ``on_result`` runs
    on each, in the client's thread, before the client sees it."""
    received: list[tuple[str, int]] = []
    original = HopStream.poll

    def poll(self: HopStream, step_id: int, timeout: float | None = None):
        event = original(self, step_id, timeout)
        if event is not None and event[0] == "result":
            received.append((self.address, step_id))
            if on_result is not None:
                on_result(self, step_id)
        return event

    monkeypatch.setattr(HopStream, "poll", poll)
    return received


def assert_greedy(reference, got: torch.Tensor, outputs: list[torch.Tensor], prompt_length: int) -> None:
    """Every step's numbers equal transformers', and every new token is its argmax given the tokens
    before it (so the whole generation is transformers' greedy one)."""
    check_against(reference, got, outputs, FLOAT32_TOL)
    _, logits = last_hidden_states(reference, got[:, :-1])
    assert got[:, prompt_length:].tolist() == logits[:, prompt_length - 1 :].argmax(dim=-1).tolist()


# --- killed while computing ----------------------------------------------------------------------------

# Wide enough, and a prompt long enough, that the prefill of 2 blocks takes over a second on one thread
# (1.4 s measured on an idle machine, longer under load): the kill cannot miss it.
SLOW_PROMPT = 2048


@pytest.fixture(scope="module")
def slow_checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("slow") / "llama3", "llama3", num_layers=4, hidden_size=768,
                           intermediate_size=2048, num_heads=8, num_kv_heads=4, seed=7)


@pytest.fixture(scope="module")
def slow_reference(slow_checkpoint):
    return reference_in(slow_checkpoint, torch.float32)


class KillInsideStep(threading.Thread):
    """Watches a node's Info counters; as soon as a step has reached it and its forward pass has not
    finished, kill -9 it. Keeps the last counters read before the kill as evidence."""

    def __init__(self, victim: Daemon, before) -> None:
        super().__init__(daemon=True)
        self.victim = victim
        self.before = before
        self.last = None
        self.error: BaseException | None = None

    def run(self) -> None:
        pool = ChannelPool()
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                info = node_info(self.victim.info["address"], self.victim.info, pool)
                if steps_in(info) > steps_in(self.before):
                    self.last = info
                    LocalSwarm.kill(self.victim)
                    return
                time.sleep(0.002)
            raise TimeoutError("the step never reached the node")
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            self.error = e
        finally:
            pool.close()


@pytest.mark.parametrize("mode", list(MODES))
def test_kill_while_the_node_computes_a_step(swarm, slow_checkpoint, slow_reference, mode, monkeypatch):
    """The node serving blocks 2..3 is killed while it computes the prefill (right after the step
    reached it; its forward pass not finished; its answer never came): the spare gets the prefill
    replayed, and every step's numbers and tokens equal transformers'."""
    name = f"slow-{mode}"
    received = record_results(monkeypatch)
    ids = torch.randint(0, 256, (1, SLOW_PROMPT), generator=torch.Generator().manual_seed(8))
    new_tokens = 4
    with (running(swarm, slow_checkpoint, name, [(0, 2), (2, 4), (2, 4)]) as daemons,
          AutoDistributedModelForCausalLM.from_pretrained(slow_checkpoint, initial_peers=swarm.initial_peers,
                                                          model_name=name, config=MODES[mode]) as model,
          model.inference_session(max_length=SLOW_PROMPT + new_tokens) as session):
        victim = serving(daemons, session, (2, 4))
        address = victim.info["address"]
        killer = KillInsideStep(victim, node_info(address, victim.info))

        def arm(i: int) -> None:
            if i == 0:
                killer.start()

        got, outputs = greedy_steps(model, session, ids, new_tokens, before_step=arm)
        killer.join(60)
        assert killer.error is None, killer.error
        assert session.failovers == 1
        assert serving(daemons, session, (2, 4)) is not victim
    # the step had reached the node, its forward pass had not finished, and its answer never arrived
    assert killer.last is not None and killer.last.forward_passes == killer.before.forward_passes
    assert victim.process.returncode == -9
    assert (address, 1) not in received
    assert_greedy(slow_reference, got, outputs, SLOW_PROMPT)


# --- killed while handing its output on ----------------------------------------------------------------

PUSH_DELAY = 0.5  # each way, in front of the receiving node: a push waits there, in flight, this long


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("tiny") / "qwen3", "qwen3", num_layers=4, seed=12)


def test_kill_while_the_node_pushes_its_output(swarm, tiny_checkpoint, monkeypatch):
    """With hand-off, the first node of the route is killed after answering a decoding step, while its push
    to the next node sits in a delaying proxy (it left the first node and had neither completed nor
    arrived). Whichever copy of the step reaches the next node first (the push or the client's relay), that
    node runs it once; the first node is replaced at the next step; every step equals transformers'."""
    port = free_port()
    reference = reference_in(tiny_checkpoint, torch.float32)
    ids = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(13))
    new_tokens, kill_step = 6, 3  # step ids count from 1: the prefill is step 1
    before: dict[str, object] = {}
    at_kill: dict[str, object] = {}
    # every leg to the receiver costs PUSH_DELAY each way, and opening its connection several legs
    config = ClientConfig(handoff_min_rtt=0.0, connect_timeout=30)
    with (DelayingProxy("127.0.0.1", port, delay=PUSH_DELAY) as proxy,
          running(swarm, tiny_checkpoint, "push-kill", [(0, 2), (0, 2), (2, 4)],
                  {2: ["--port", str(port), "--public-address", proxy.address]}) as daemons,
          contextlib.closing(swarm.pool()) as pool):
        receiver = (f"127.0.0.1:{port}", daemons[2].info["peer_id"], pool)  # read without the proxy's delay

        def before_step(i: int) -> None:
            if i + 1 == kill_step:
                before.update(bytes=proxy.bytes_to_target, receiver=node_info(*receiver), pusher=node_info(*pusher))

        def kill_pusher(stream: HopStream, step_id: int) -> None:
            if step_id != kill_step or stream.address != pusher[0] or at_kill:
                return
            # its answer is here; wait until its push (at least the hidden states' bytes) is held in the proxy
            deadline = time.monotonic() + 30
            while proxy.bytes_to_target - before["bytes"] < ids.shape[0] * 64 * 4:
                assert time.monotonic() < deadline, "the push never reached the proxy"
                time.sleep(0.001)
            at_kill.update(receiver=node_info(*receiver), pusher=node_info(*pusher))
            LocalSwarm.kill(victim)

        received = record_results(monkeypatch, kill_pusher)
        with (AutoDistributedModelForCausalLM.from_pretrained(tiny_checkpoint, initial_peers=swarm.initial_peers,
                                                              model_name="push-kill", config=config) as model,
              model.inference_session(max_length=ids.shape[1] + new_tokens, batch_size=2) as session):
            assert session.route[1][0] == proxy.address and session.uses_handoff
            victim = serving(daemons, session, (0, 2))
            pusher = (victim.info["address"], victim.info["peer_id"], pool)
            got, outputs = greedy_steps(model, session, ids, new_tokens, before_step=before_step)
            assert session.failovers == 1
            assert serving(daemons, session, (0, 2)) is not victim
        after = node_info(*receiver)
    assert at_kill, "the pusher was never killed"
    assert victim.process.returncode == -9 and (pusher[0], kill_step) in received
    # at the kill, the push had not completed (counted once the receiver acknowledges it) ...
    assert at_kill["pusher"].pushes_sent == before["pusher"].pushes_sent
    # ... nor reached the receiver
    assert steps_in(at_kill["receiver"]) == steps_in(before["receiver"])
    # the receiver computed every step exactly once, though it may have been sent one twice
    assert after.batched_steps == new_tokens
    assert_greedy(reference, got, outputs, ids.shape[1])
