"""join-swarm as a volunteer daemon, through real daemons on loopback: automatic block choice, a fourth
node joining where the swarm is weakest, `homeswarm status`, stopping however it comes (SIGTERM to the
main process, kill -9, SIGTERM to the whole process group) with no process left behind, a node moving
into the gap a stopped one left, and a client naming the blocks nobody serves once too many are gone.

One swarm serves the module: a bootstrap peer and three nodes started in the same moment with no --blocks
and a --max-memory that holds 4 of the model's 12 blocks (counting weights and cache alone:
--fixed-cost 0, as the runtime's memory would drown the tiny blocks); each announces a fixed --throughput, so that
which span is weakest does not hang on self-tests of a busy machine. Only the fourth node rebalances
(every second), so that the others stay where the tests expect them. The tests run in order and later
ones stop the nodes that earlier ones used; the last one kills the DHT process of the last node left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from homeswarm import AutoDistributedModelForCausalLM
from homeswarm.client.local_swarm import Daemon, LocalSwarm, console_script
from homeswarm.model import ModelConfig, span_weight_bytes
from homeswarm.protocol.ready_file import read_ready_file
from homeswarm.routing.block_chooser import choose_blocks
from homeswarm.routing.dht import SwarmDHT
from homeswarm.routing.planner import format_blocks
from homeswarm.routing.records import ServerState
from tests.helpers.checkpoints import make_checkpoint, reference_greedy

NUM_LAYERS = 12
MODEL = "volunteer"
PROMPT = [5, 17, 42, 99, 3, 250]
NEW_TOKENS = 8
THROUGHPUTS = (100.0, 300.0, 200.0)  # steps/s per block the three first nodes announce
TTL = "6"  # seconds a node's record lives: a killed node's expires soon (refreshed every 2 s)


# --- process helpers -----------------------------------------------------------------------------


def descendants(pid: int) -> dict[int, str]:
    """pid -> command name of every descendant of ``pid`` (from /proc)."""
    found: dict[int, str] = {}
    stack = [pid]
    while stack:
        for task in Path(f"/proc/{stack.pop()}/task").glob("*/children"):
            try:
                children = [int(c) for c in task.read_text().split()]
            except OSError:
                continue
            for child in children:
                try:
                    found[child] = Path(f"/proc/{child}/comm").read_text().strip()
                except OSError:
                    continue
                stack.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """The pids still running after up to ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while (left := [p for p in pids if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def kill_leftovers(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny12", "llama3", num_layers=NUM_LAYERS, seed=5)


@pytest.fixture(scope="module")
def max_memory(ckpt) -> str:
    """Room for 4 blocks' weights once the KV cache keeps its quarter (and not for 5)."""
    block = span_weight_bytes(ModelConfig.from_dir(ckpt), 0, 1, torch.float32)
    return f"{int(4.5 * block / 0.75)}B"


@pytest.fixture(scope="module")
def swarm(ckpt, max_memory, tmp_path_factory):
    work = tmp_path_factory.mktemp("swarm")
    with LocalSwarm(work, env={"XDG_CACHE_HOME": str(work / "cache")}) as swarm:
        swarm.start_bootstrap()
        nodes = [swarm.start_node(ckpt, "--model-name", MODEL, "--max-memory", max_memory, "--fixed-cost", "0",
                                  "--throughput", str(throughput), "--compute-threads", "1", "--rebalance-interval", "0",
                                  "--announce-ttl", TTL, wait=False)
                 for throughput in THROUGHPUTS]
        for node in nodes:
            swarm.wait_ready(node, timeout=180)
        yield swarm


@pytest.fixture(scope="module")
def dht(swarm):
    dht = SwarmDHT.create(swarm.initial_peers, client_mode=True)
    yield dht
    dht.shutdown()


def blocks_of(node: Daemon) -> tuple[int, int]:
    """The node's span, from its ready file (rewritten when the node moves)."""
    info = read_ready_file(node.ready_file)
    assert info is not None
    start, end = info["blocks"]
    return start, end


def records_settled(dht: SwarmDHT, count: int, timeout: float = 30.0) -> list:
    """The online records once ``count`` nodes announce online (announcements reach the DHT in ms)."""
    deadline = time.monotonic() + timeout
    while True:
        records = [r for r in dht.get_servers(MODEL, 0, NUM_LAYERS) if r.state == ServerState.ONLINE]
        if len(records) == count or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


# --- tests ---------------------------------------------------------------------------------------


def settled_spans(swarm: LocalSwarm, dht: SwarmDHT, timeout: float = 60.0) -> list[tuple[int, int]]:
    """The nodes' spans once their ready files agree with the online records in the DHT (a node that
    finds, after loading, that one which started with it keeps the same span moves, and rewrites it)."""
    deadline = time.monotonic() + timeout
    while True:
        spans = sorted(blocks_of(node) for node in swarm.nodes)
        online = sorted((r.start, r.end) for r in dht.get_servers(MODEL, 0, NUM_LAYERS) if r.state == ServerState.ONLINE)
        if online == spans or time.monotonic() > deadline:
            return spans
        time.sleep(0.2)


@pytest.mark.timeout(240)
def test_three_nodes_started_together_cover_the_model_and_generate_exactly(swarm, ckpt, dht):
    spans = settled_spans(swarm, dht)
    assert spans == [(0, 4), (4, 8), (8, 12)], spans  # 4 blocks each fit; each claims a span nobody else does
    for node in swarm.nodes:
        assert "4 of 12 blocks fit in the memory budget" in node.log()
    expected = reference_greedy(ckpt, torch.tensor([PROMPT]), NEW_TOKENS)
    with AutoDistributedModelForCausalLM.from_pretrained(ckpt, initial_peers=swarm.initial_peers,
                                                         model_name=MODEL) as model:
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS)
    assert out.tolist() == expected.tolist()


@pytest.mark.timeout(240)
def test_a_fourth_node_joins_where_the_swarm_is_weakest(swarm, ckpt, max_memory, dht):
    records = records_settled(dht, 3)
    weakest = next(blocks_of(n) for n, t in zip(swarm.nodes, THROUGHPUTS, strict=True) if t == min(THROUGHPUTS))
    assert choose_blocks(records, NUM_LAYERS, 4) == weakest
    fourth = swarm.start_node(ckpt, "--model-name", MODEL, "--max-memory", max_memory, "--fixed-cost", "0",
                              "--throughput", "150", "--compute-threads", "1", "--rebalance-interval", "1", "--announce-ttl", TTL,
                              timeout=180)
    # where the 100 steps/s node is (which span each of the three took depends on who started first)
    assert blocks_of(fourth) == weakest == blocks_of(node_at(swarm, 100.0))


@pytest.mark.timeout(240)
def test_status_shows_what_the_swarm_serves(swarm, dht):
    records_settled(dht, 4)
    result = subprocess.run([*console_script("homeswarm"), "status", "--initial-peers", *swarm.initial_peers,
                             "--json"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    model = json.loads(result.stdout)["models"][MODEL]
    assert model["num_blocks"] == NUM_LAYERS and model["missing_blocks"] == []
    assert model["online_servers"] == 4
    servers = {s["address"]: s for s in model["servers"]}
    for node in swarm.nodes:
        server = servers[node.info["address"]]
        assert server["blocks"] == list(blocks_of(node)) and server["state"] == "online"
        assert server["quant"] == "none" and server["dtype"] == "float32" and server["cache_tokens_left"] > 0
    assert sorted(s["throughput"] for s in model["servers"]) == sorted([*THROUGHPUTS, 150.0])
    expected = [0.0] * NUM_LAYERS
    for node, throughput in zip(swarm.nodes, [*THROUGHPUTS, 150.0], strict=True):
        for block in range(*blocks_of(node)):
            expected[block] += throughput
    assert [b["throughput"] for b in model["blocks"]] == expected


def node_at(swarm: LocalSwarm, throughput: float) -> Daemon:
    return swarm.nodes[THROUGHPUTS.index(throughput)]


def sigterm(node: Daemon, *, group: bool) -> None:
    """SIGTERM to the node's main process or to its whole process group: it must exit 0 within 30 s, in
    order (announcing offline while its DHT process still runs), and leave none of its children."""
    pid = node.process.pid
    children = descendants(pid)
    assert "p2pd" in children.values(), children
    t0 = time.monotonic()
    if group:
        os.killpg(pid, signal.SIGTERM)  # what a shell's job control or a service manager sends
    else:
        os.kill(pid, signal.SIGTERM)
    try:
        code = node.process.wait(30)
    except subprocess.TimeoutExpired:
        LocalSwarm.kill(node)
        kill_leftovers(list(children))
        pytest.fail(f"still running 30 s after SIGTERM:\n{node.log()[-3000:]}")
    assert code == 0, node.log()[-3000:]
    left = wait_gone(list(children), timeout=30 - (time.monotonic() - t0))
    kill_leftovers(left)
    assert not left, {p: children[p] for p in left}
    assert "Traceback" not in node.log(), node.log()[-3000:]
    assert "shutting down: announcing offline" in node.log()
    assert "could not announce" not in node.log()  # the DHT process was still up to announce it


@pytest.mark.timeout(120)
def test_sigterm_to_the_main_process_stops_the_node_and_its_children(swarm):
    sigterm(node_at(swarm, 300.0), group=False)


@pytest.mark.timeout(180)
def test_a_node_moves_into_the_gap_and_generation_stays_exact(swarm, ckpt, dht):
    fourth = swarm.nodes[3]
    # the span the stopped 300 steps/s node left: the one neither remaining first node serves
    kept = {blocks_of(node_at(swarm, 100.0)), blocks_of(node_at(swarm, 200.0))}
    gap = next(span for span in [(0, 4), (4, 8), (8, 12)] if span not in kept)
    deadline = time.monotonic() + 120
    while (record := next((r for r in dht.get_servers(MODEL, 0, NUM_LAYERS)
                           if r.peer_id == fourth.info["peer_id"]), None)) is None or \
            (record.state, record.start, record.end) != (ServerState.ONLINE, *gap):
        assert time.monotonic() < deadline, f"the fourth node did not move into blocks {gap}: {record}"
        time.sleep(0.5)
    assert f"moving to blocks {gap[0]}:{gap[1]}, where the swarm is weaker" in fourth.log()
    expected = reference_greedy(ckpt, torch.tensor([PROMPT]), NEW_TOKENS)
    with AutoDistributedModelForCausalLM.from_pretrained(ckpt, initial_peers=swarm.initial_peers,
                                                         model_name=MODEL) as model:
        assert model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS).tolist() == expected.tolist()


@pytest.mark.timeout(120)
def test_kill_9_leaves_no_process_behind(swarm):
    node = node_at(swarm, 100.0)
    pid = node.process.pid
    children = descendants(pid)
    assert "p2pd" in children.values() and "join-swarm" in children.values(), children  # the DHT process
    os.kill(pid, signal.SIGKILL)  # the main process alone, as the OOM killer would
    node.process.wait(10)
    left = wait_gone(list(children), timeout=15)  # the DHT process sees its owner gone within a second
    kill_leftovers(left)
    assert not left, {p: children[p] for p in left}
    assert not group_members(pid)


@pytest.mark.timeout(120)
def test_sigterm_to_the_process_group_stops_the_node_and_its_children(swarm):
    sigterm(node_at(swarm, 200.0), group=True)


@pytest.mark.timeout(180)
def test_a_client_then_fails_fast_naming_the_blocks_nobody_serves(swarm, ckpt, dht):
    running = [n for n in swarm.nodes if n.process.poll() is None]
    assert running == [swarm.nodes[3]]  # only the fourth node, in the gap it moved into, is left
    missing = sorted(set(range(NUM_LAYERS)) - set(range(*blocks_of(running[0]))))
    assert len(missing) == 8
    # the killed node's record expires a TTL after its last refresh (the stopped ones announced offline)
    records_settled(dht, 1)
    t0 = time.monotonic()
    result = subprocess.run(
        [*console_script("homeswarm"), "generate", str(ckpt), "--initial-peers", *swarm.initial_peers,
         "--model-name", MODEL, "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", "4", "--json"],
        capture_output=True, text=True, timeout=150,
    )
    assert result.returncode == 1, result.stderr
    assert f"no server in the swarm serves block(s) {format_blocks(missing)} of model {MODEL!r}" in result.stderr
    # start-up (imports, a DHT peer: 15-35 s on a loaded 2-core machine) and one read of the records; a
    # client that waited for nodes to come back, or retried until some timeout, would take minutes
    assert time.monotonic() - t0 < 90


@pytest.mark.timeout(120)
def test_kill_9_of_the_dht_process_stops_the_node_and_leaves_nothing_behind(swarm):
    node = swarm.nodes[3]
    pid = node.process.pid
    children = descendants(pid)
    dht_process = next(p for p, name in children.items() if "p2pd" in descendants(p).values())
    os.kill(dht_process, signal.SIGKILL)  # p2pd gets its parent-death signal; the node notices within a second
    try:
        code = node.process.wait(30)
    except subprocess.TimeoutExpired:
        LocalSwarm.kill(node)
        kill_leftovers(list(children))
        pytest.fail(f"still running 30 s after its DHT process was killed:\n{node.log()[-3000:]}")
    assert code == 1, node.log()[-3000:]  # a failure: a service manager restarts it
    assert "the DHT process has exited; stopping" in node.log()
    left = wait_gone(list(children), timeout=10)
    kill_leftovers(left)
    assert not left, {p: children[p] for p in left}
    assert not group_members(pid) and not group_members(dht_process)
