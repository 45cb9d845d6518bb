"""join-swarm --idle-only through real daemons: a CPU load started beside the node makes it step aside
(announce busy, refuse new sessions) within its configured delay, an open generation goes on on another
node with the same tokens, and the node serves again once the load ends.

Two nodes serve the whole model: "idle", with --idle-only and a far higher announced throughput (so the
client routes through it), and "steady", an ordinary node. The load runs as another user (nobody), and
the idle node counts only that user's processes (--idle-users), so that other work on a shared test
machine does not count as its owner; delays and thresholds are flags, set short.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import grpc
import pytest
import torch

from homeswarm import AutoDistributedModelForCausalLM
from homeswarm.client.local_swarm import Daemon, LocalSwarm
from homeswarm.client.transport import ChannelPool, HopFailed, HopStream
from homeswarm.routing.dht import SwarmDHT
from homeswarm.routing.records import ServerRecord, ServerState
from tests.helpers.checkpoints import make_checkpoint, reference_greedy

NUM_LAYERS = 4
MODEL = "idle-model"
PROMPT = [7, 1, 200, 33, 64]
NEW_TOKENS = 10
NOBODY = 65534
BUSY_AFTER = 1.0
CHECK_INTERVAL = 0.5
BUSY_GRACE = 2.0

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the CPU load runs as another user (nobody): needs root")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "qwen2", num_layers=NUM_LAYERS, seed=8)


@pytest.fixture(scope="module")
def swarm(ckpt, tmp_path_factory):
    work = tmp_path_factory.mktemp("swarm")
    with LocalSwarm(work, env={"XDG_CACHE_HOME": str(work / "cache")}) as swarm:
        swarm.start_bootstrap()
        common = ("--model-name", MODEL, "--blocks", f"0:{NUM_LAYERS}", "--compute-threads", "1")
        idle = swarm.start_node(
            ckpt, *common, "--throughput", "100000", "--idle-only", "--idle-users", str(NOBODY),
            "--idle-cpu-busy", "0.05", "--idle-input-after", "0", "--busy-after", str(BUSY_AFTER),
            "--idle-after", "1", "--idle-check-interval", str(CHECK_INTERVAL), "--busy-grace", str(BUSY_GRACE),
            wait=False,
        )
        steady = swarm.start_node(ckpt, *common, "--throughput", "10", wait=False)
        for node in (idle, steady):
            swarm.wait_ready(node, timeout=180)
        yield swarm


@pytest.fixture(scope="module")
def dht(swarm):
    dht = SwarmDHT.create(swarm.initial_peers, client_mode=True)
    yield dht
    dht.shutdown()


def record_of(dht: SwarmDHT, peer_id: str) -> ServerRecord | None:
    return next((r for r in dht.get_servers(MODEL, 0, NUM_LAYERS) if r.peer_id == peer_id), None)


def wait_state(dht: SwarmDHT, peer_id: str, state: ServerState, timeout: float) -> float:
    """Seconds until the node's record says ``state``; fails after ``timeout``."""
    t0 = time.monotonic()
    while (record := record_of(dht, peer_id)) is None or record.state != state:
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"the node did not announce {state.value} within {timeout} s: {record}")
        time.sleep(0.1)
    return time.monotonic() - t0


def wait_log(node, text: str, timeout: float) -> None:
    """Until the node's log holds ``text`` (it writes it a moment after what the test saw happen)."""
    deadline = time.monotonic() + timeout
    while text not in node.log():
        assert time.monotonic() < deadline, f"{text!r} not in the log:\n{node.log()[-3000:]}"
        time.sleep(0.1)


def open_session(node: Daemon) -> None:
    """Open (and close) a session on the node directly; HopFailed (with the gRPC status) if refused."""
    pool = ChannelPool()
    pool.note_tls(node.info["peer_id"], node.info.get("tls_cert", ""))
    try:
        HopStream(pool, peer_id=node.info["peer_id"], address=node.info["address"], model=MODEL, start=0, end=NUM_LAYERS, batch_size=1,
                  max_length=32, compression=0, connect_timeout=10, step_timeout=10).close()
    finally:
        pool.close()


@pytest.mark.timeout(240)
def test_a_cpu_load_sends_the_node_aside_and_it_comes_back(swarm, ckpt, dht):
    idle, steady = swarm.nodes
    expected = reference_greedy(ckpt, torch.tensor([PROMPT]), NEW_TOKENS)[0, len(PROMPT):].tolist()
    load: list[subprocess.Popen] = []
    with AutoDistributedModelForCausalLM.from_pretrained(ckpt, initial_peers=swarm.initial_peers,
                                                         model_name=MODEL) as model:
        session = model.inference_session(max_length=len(PROMPT) + NEW_TOKENS)
        stream = model.generate_stream([PROMPT], max_new_tokens=NEW_TOKENS, session=session)
        tokens = [int(next(stream)[0]) for _ in range(3)]
        assert [hop.peer_id for hop in session.hops] == [idle.info["peer_id"]]  # the fast node serves it
        try:
            load = [subprocess.Popen(["sh", "-c", "while :; do :; done"], user=NOBODY, start_new_session=True)
                    for _ in range(os.cpu_count() or 1)]
            took = wait_state(dht, idle.info["peer_id"], ServerState.BUSY, timeout=60)
            # busy_after of load, measured every check interval; a loaded machine runs the checks late
            assert took < BUSY_AFTER + 4 * CHECK_INTERVAL + 10, took
            with pytest.raises(HopFailed) as refused:  # no new sessions: refused, or nobody listening
                open_session(idle)
            assert refused.value.code in (grpc.StatusCode.UNAVAILABLE, None), refused.value
            assert "stepping aside (other processes use" in idle.log()
            # the open generation goes on: the idle node ends it after its grace, the client fails over
            time.sleep(BUSY_GRACE + 1)
            tokens += [int(t[0]) for t in stream]
            assert tokens == expected
            assert [hop.peer_id for hop in session.hops] == [steady.info["peer_id"]]
            assert session.failovers >= 1
        finally:
            for process in load:
                process.kill()
                process.wait()
            session.close()
    # after the grace, the period ends and the weights are let go (a loaded machine may take a while)
    wait_log(idle, "released the memory of blocks 0:4 until the machine is idle again", timeout=30)
    wait_state(dht, idle.info["peer_id"], ServerState.ONLINE, timeout=90)  # idle_after of quiet, a reload
    open_session(idle)  # it takes sessions again
    assert idle.process.poll() is None and steady.process.poll() is None
