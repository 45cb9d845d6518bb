"""Long steps with real daemons: a node busy with a long prefill is waited for, not taken for dead, and a
session closed mid-prefill stops its node's compute within one chunk.

One node serves the whole (wide) model and announces a far higher throughput than it has, so that a
2,048-position prefill (a few seconds on one thread) outlasts the client's step time limit.
"""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
import torch

from homeswarm.client.config import ClientConfig
from homeswarm.client.local_swarm import LocalSwarm
from homeswarm.client.model import AutoDistributedModelForCausalLM
from homeswarm.client.session import SessionError
from homeswarm.client.transport import HopStream
from homeswarm.node.service import PREFILL_CHUNK_TOKENS
from homeswarm.protocol import node_pb2
from tests.helpers.checkpoints import make_checkpoint
from tests.helpers.reference import node_info

pytestmark = pytest.mark.timeout(240)
PROMPT = 2048


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("wide") / "llama3", "llama3", num_layers=4, hidden_size=768,
                           intermediate_size=2048, num_heads=8, num_kv_heads=4, seed=7)


@pytest.fixture(scope="module")
def swarm(checkpoint, tmp_path_factory):
    with LocalSwarm(tmp_path_factory.mktemp("swarm")) as swarm:
        swarm.start_bootstrap()
        swarm.start_node(checkpoint, "--blocks", "0:4", "--throughput", "100000", "--compute-threads", "1")
        yield swarm


def test_a_busy_node_is_waited_for_not_banned(swarm, checkpoint, caplog):
    node = swarm.nodes[0].info
    ids = torch.randint(0, 256, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    config = ClientConfig(step_timeout=0.05, handoff=False)
    caplog.set_level("INFO", logger="homeswarm.client.session")
    with (AutoDistributedModelForCausalLM.from_pretrained(checkpoint, initial_peers=swarm.initial_peers,
                                                          config=config) as model,
          model.inference_session(max_length=PROMPT + 1) as session):
        session.step(model.head.embed(ids))
        assert session.busy_waits >= 1 and session.failovers == 0
        assert not model.routes.is_banned(node["peer_id"])
    waits = [r.getMessage() for r in caplog.records if "busy, waiting" in r.getMessage()]
    assert waits and node["address"] in waits[0] and "answers Info" in waits[0]


def test_a_closed_session_stops_its_prefill_within_one_chunk(swarm):
    node = swarm.nodes[0].info
    hidden = torch.randn(1, PROMPT, 768)
    chunks = PROMPT // PREFILL_CHUNK_TOKENS
    with contextlib.closing(swarm.pool()) as pool:
        before = node_info(node["address"], node, pool).forward_passes
        stream = HopStream(pool, peer_id=node["peer_id"], address=node["address"], model="", start=0, end=4,
                           batch_size=1, max_length=PROMPT, compression=node_pb2.NONE, connect_timeout=30,
                           step_timeout=60)
        try:
            stream.send(1, hidden)
            deadline = time.monotonic() + 60
            while node_info(node["address"], node, pool).forward_passes == before:  # the first chunk is done
                assert time.monotonic() < deadline, "the prefill never started"
                time.sleep(0.005)
        finally:
            stream.close()
        at_close = node_info(node["address"], node, pool).forward_passes
        # the chunk running at the close may finish; nothing after it runs
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            info = node_info(node["address"], node, pool)
            if info.active_sessions == 0:
                break
            time.sleep(0.01)
        time.sleep(0.5)
        after = node_info(node["address"], node, pool)
    assert after.active_sessions == 0
    assert after.forward_passes - at_close <= 1 < chunks - (at_close - before)


def test_closing_a_session_under_its_step_cancels_it_and_blames_nobody(swarm, checkpoint):
    """What `homeswarm serve` does when a client leaves mid-prefill: the session is closed from another thread;
    the step ends at once with SessionError, the node is neither banned nor counted as failed, and its
    compute stops within one chunk."""
    node = swarm.nodes[0].info
    ids = torch.randint(0, 256, (1, PROMPT), generator=torch.Generator().manual_seed(2))
    with (AutoDistributedModelForCausalLM.from_pretrained(checkpoint, initial_peers=swarm.initial_peers,
                                                          config=ClientConfig(handoff=False)) as model,
          contextlib.closing(swarm.pool()) as pool):
        session = model.inference_session(max_length=PROMPT)
        before = node_info(node["address"], node, pool).forward_passes
        errors: list[BaseException] = []

        def run() -> None:
            try:
                session.step(model.head.embed(ids))
            except BaseException as e:  # noqa: BLE001 - examined below
                errors.append(e)

        worker = threading.Thread(target=run)
        worker.start()
        deadline = time.monotonic() + 60
        while node_info(node["address"], node, pool).forward_passes == before:
            assert time.monotonic() < deadline, "the prefill never started"
            time.sleep(0.005)
        closed_at = time.monotonic()
        session.close()
        worker.join(30)
        assert not worker.is_alive() and time.monotonic() - closed_at < 5
        assert len(errors) == 1 and isinstance(errors[0], SessionError) and "closed during step 1" in str(errors[0])
        assert session.failovers == 0 and not model.routes.is_banned(node["peer_id"])
        deadline = time.monotonic() + 30
        while node_info(node["address"], node, pool).active_sessions and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.5)
        assert node_info(node["address"], node, pool).forward_passes - before < PROMPT // PREFILL_CHUNK_TOKENS
