"""A new user's and a new volunteer's first commands, through the console scripts.

Bad input answers in one line with exit code 2 in under two seconds, before torch, hivemind or the DHT
start; a bootstrap peer and a node keep their peer id (and the bootstrap peer its multiaddrs) across
restarts with --identity; a port another process holds is refused by name; a node bound to 0.0.0.0
announces an address peers can dial and `homeswarm chat` talks through it; a peer nobody answers at is
named with what to check; daemons die with the process that started them, and leave no sockets.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from homeswarm.client.local_swarm import LocalSwarm, console_script
from homeswarm.routing.dht import p2pd_sockets
from homeswarm.routing.signing import NodeKey
from tests.e2e.test_cli import (
    MARK,
    assert_usage_error,
    byte_level_tokenizer,
    processes_marked,
    reap_marked,
    run_cli,
)
from tests.helpers.checkpoints import make_checkpoint

DEAD_PEER = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWBGeVDU6RWjU62wSHBu8SxcPN7iTm4V8PdZLu2sjXWcx9"
FAST = 2.0  # seconds a usage error or --help may take, interpreter start included


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "llama3", num_layers=2, seed=5)


@pytest.fixture
def held_port():
    """A port another process listens on, with SO_REUSEPORT as p2pd does."""
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        yield holder.getsockname()[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def timed(script: str, *args: str) -> tuple[float, object]:
    t0 = time.monotonic()
    result = run_cli(script, *args, timeout=30)
    return time.monotonic() - t0, result


@pytest.mark.parametrize("script", ["join-swarm", "homeswarm"])
def test_help_is_fast(script):
    args = ["--help"] if script == "join-swarm" else ["generate", "--help"]
    seconds, result = timed(script, *args)
    assert result.returncode == 0 and "--initial-peers" in result.stdout, result.stderr
    assert seconds < FAST, f"{script} {' '.join(args)} took {seconds:.2f} s"


BAD_INPUT = {
    "join_missing_folder": ("join-swarm", ["{tmp}/nothing", "--new-swarm"], r"model directory not found"),
    "join_no_weights": ("join-swarm", ["{no_weights}", "--new-swarm"], r"holds no block's weights"),
    "join_tiny_budget": ("join-swarm", ["{ckpt}", "--new-swarm", "--max-memory", "1MiB"],
                         r"--max-memory 1MiB is less than the node's runtime"),
    "join_budget_without_unit": ("join-swarm", ["{ckpt}", "--new-swarm", "--max-memory", "4"],
                                 r"--max-memory: a size needs a unit, one of B, KiB, MiB, GiB.*got '4'"),
    "join_bad_peer": ("join-swarm", ["{ckpt}", "--initial-peers", "/ip4/1.2.3.4/tcp/5"], r"with a peer id.*tcp/5'"),
    "join_dht_port_taken": ("join-swarm", ["{ckpt}", "--new-swarm", "--dht-port", "{port}"],
                            r"--dht-port {port}: port {port} on 127\.0\.0\.1 is taken"),
    "join_grpc_port_taken": ("join-swarm", ["{ckpt}", "--new-swarm", "--port", "{port}"], r"--port {port}: .* taken"),
    "join_peers_then_folder": ("join-swarm", ["--initial-peers", DEAD_PEER, "{tmp}/nothing"], r"not found: .*nothing"),
    "dht_port_taken": ("homeswarm", ["dht", "--port", "{port}"], r"--port {port}: port {port} on 127\.0\.0\.1 is taken"),
    "dht_bad_identity": ("homeswarm", ["dht", "--identity", "{tmp}/no/such/folder/id.key"], r"--identity"),
    "generate_missing_folder": ("homeswarm", ["generate", "{tmp}/nothing", "--initial-peers", DEAD_PEER,
                                              "--prompt-ids", "1"], r"no config\.json"),
    "generate_peers_then_folder": ("homeswarm", ["generate", "--initial-peers", DEAD_PEER, "{tmp}/nothing",
                                                 "--prompt-ids", "1"], r"nothing is not a checkpoint folder"),
    "generate_chat_without_prompt": ("homeswarm", ["generate", "{ckpt}", "--initial-peers", DEAD_PEER, "--prompt-ids",
                                                   "1", "--chat"], r"--chat needs --prompt"),
    "join_missing_gguf": ("join-swarm", ["{tmp}/model.gguf", "--new-swarm"], r"GGUF file not found"),
    "generate_missing_gguf": ("homeswarm", ["generate", "{tmp}/model.gguf", "--initial-peers", DEAD_PEER,
                                            "--prompt-ids", "1"], r"GGUF file not found"),
    "generate_bad_peer": ("homeswarm", ["generate", "{ckpt}", "--initial-peers", "garbage", "--prompt-ids", "1"],
                          r"--initial-peers takes multiaddrs.*'garbage'"),
}


@pytest.mark.parametrize("case", BAD_INPUT, ids=list(BAD_INPUT))
def test_bad_input_is_one_fast_line(case, ckpt, tmp_path, held_port):
    script, args, pattern = BAD_INPUT[case]
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((ckpt / "config.json").read_text())
    args = [a.format(tmp=tmp_path, ckpt=ckpt, no_weights=no_weights, port=held_port) for a in args]
    seconds, result = timed(script, *args)
    assert_usage_error(result, script, pattern.format(port=held_port))
    assert seconds < FAST, f"{case} took {seconds:.2f} s: {result.stderr}"


def chat_model(ckpt: Path, tmp_path: Path) -> Path:
    """The checkpoint with a tokenizer and a chat template (the nodes serve the same weights)."""
    folder = tmp_path / "chat-model"
    shutil.copytree(ckpt, folder)
    byte_level_tokenizer().save(str(folder / "tokenizer.json"))
    template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant:{% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    return folder


def test_a_swarm_set_up_by_hand(ckpt, tmp_path):
    """A bootstrap peer keeps its address across restarts with --identity and a fixed port; a second peer and a
    node's DHT are refused its port; a node bound to 0.0.0.0 announces 127.0.0.1 and keeps its own identity;
    `homeswarm chat` talks through it."""
    identity, port = tmp_path / "dht.key", free_port()
    argv = [*console_script("homeswarm"), "dht", "--identity", str(identity), "--port", str(port)]
    with LocalSwarm(tmp_path / "first") as swarm:
        first = swarm.start_process(argv, "dht", timeout=60).info
    assert identity.stat().st_mode & 0o777 == 0o600
    assert first["peer_id"] == NodeKey.load_or_create(identity).peer_id
    with LocalSwarm(tmp_path / "second") as swarm:
        second = swarm.start_process(argv, "dht", timeout=60).info
        assert (second["peer_id"], second["dht_maddrs"]) == (first["peer_id"], first["dht_maddrs"])
        # the port is held by that peer's p2pd now: a second bootstrap peer and a node's DHT are refused
        result = run_cli("homeswarm", "dht", "--port", str(port), timeout=30)
        assert_usage_error(result, "homeswarm", rf"--port {port}: port {port} on 127\.0\.0\.1 is taken")
        result = run_cli("join-swarm", ckpt, "--initial-peers", *second["dht_maddrs"], "--dht-port", str(port),
                         timeout=30)
        assert_usage_error(result, "join-swarm", rf"--dht-port {port}: .* taken")

        # a node bound to every interface announces the one its peers reach it on, with its own identity
        node_key = tmp_path / "node.key"
        node = swarm.start_process([*console_script("join-swarm"), str(ckpt), "--initial-peers", *second["dht_maddrs"],
                                    "--host", "0.0.0.0", "--identity", str(node_key), "--blocks", "0:2",
                                    "--throughput", "100", "--insecure"], "node", timeout=120)
        host, node_port = node.info["address"].rsplit(":", 1)
        assert host == "127.0.0.1" and int(node_port) > 0, node.info
        assert node.info["peer_id"] == NodeKey.load_or_create(node_key).peer_id

        # and a person talks to the model through it: greedy replies stream to stdout, the second turn's prompt
        # holds the first, and after /reset the first turn is answered as before
        chat = subprocess.run(
            [*console_script("homeswarm"), "chat", "--initial-peers", *second["dht_maddrs"], str(chat_model(ckpt, tmp_path)),
             "--model-name", "tiny", "--temperature", "0", "--max-new-tokens", "6"],
            input="hello\nand then?\n/reset\nhello\n/exit\n", capture_output=True, text=True, timeout=120,
        )
        # the same first turn through generate --chat: the message in the template, the answer generated
        generated = run_cli("homeswarm", "generate", chat_model(ckpt, tmp_path / "generate"), "--initial-peers",
                            *second["dht_maddrs"], "--model-name", "tiny", "--chat", "--prompt", "hello",
                            "--max-new-tokens", "6", "--json", timeout=120)
    assert chat.returncode == 0, chat.stderr
    assert "Traceback" not in chat.stderr and "(the conversation is forgotten)" in chat.stderr
    replies = chat.stdout.split("\n")[:3]
    assert len(replies) == 3 and replies[0] == replies[2] and all(replies), chat.stdout
    assert generated.returncode == 0, generated.stderr
    assert json.loads(generated.stdout)["text"] == replies[0]


def test_an_unreachable_peer_is_named_with_what_to_check(ckpt, tmp_path):
    result = run_cli("join-swarm", ckpt, "--initial-peers", DEAD_PEER, "--blocks", "0:1",
                     "--ready-file", tmp_path / "ready.json", timeout=90)
    assert_usage_error(result, "join-swarm", rf"could not reach any of the initial peers \({DEAD_PEER}\): "
                                             r"check that they are running")
    assert "Daemon failed to start" not in result.stderr and not (tmp_path / "ready.json").exists()
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # warnings and errors only: the error


def test_daemons_die_with_the_process_that_started_them(tmp_path):
    """A test run killed by its time limit (SIGKILL) leaves no daemon, DHT process or p2pd behind."""
    mark = uuid.uuid4().hex
    code = ("import sys, time\nfrom homeswarm.client.local_swarm import LocalSwarm\n"
            f"swarm = LocalSwarm({str(tmp_path)!r})\nswarm.start_bootstrap()\n"
            "print(swarm.bootstrap.process.pid, flush=True)\ntime.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, MARK: mark}, start_new_session=True)
    try:
        line = parent.stdout.readline()
        assert line.strip().isdigit(), parent.stderr.read() if parent.poll() is not None else line
        assert len(processes_marked(mark)) >= 3  # the parent, `homeswarm dht` and its p2pd
        os.killpg(parent.pid, signal.SIGKILL)  # the parent's group only: the daemon has a session of its own
        parent.wait(10)
        left = reap_marked(mark, grace=20)
        assert not left, f"left behind: {left}"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        parent.stdout.close()
        parent.stderr.close()
        reap_marked(mark)


def descendants(pid: int) -> list[int]:
    found: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            for child in map(int, f.read().split()):
                found += [child, *descendants(child)]
    return found


def test_a_killed_daemon_leaves_no_sockets(tmp_path):
    """SIGKILL skips hivemind's shutdown; the DHT process, going with its owner, removes p2pd's sockets itself."""
    with LocalSwarm(tmp_path) as swarm:
        swarm.start_bootstrap()
        sockets = [path for pid in descendants(swarm.bootstrap.process.pid) for path in p2pd_sockets(pid)]
        assert len(sockets) == 2 and all(os.path.exists(path) for path in sockets), sockets
        LocalSwarm.kill(swarm.bootstrap)
        deadline = time.monotonic() + 15
        while any(os.path.exists(path) for path in sockets) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [path for path in sockets if os.path.exists(path)]
