"""The start-up checks that touch the machine: ports another process holds (p2pd listens with
SO_REUSEPORT), the interface a wildcard-bound node announces, and that join-swarm's command line answers
without loading torch or hivemind (in a process of its own)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from homeswarm.node.config import ConfigError, NodeConfig
from homeswarm.node.preflight import check, resolve_wildcard
from homeswarm.routing.preflight import is_wildcard, outgoing_host, port_taken

PEER = "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWBGeVDU6RWjU62wSHBu8SxcPN7iTm4V8PdZLu2sjXWcx9"


@pytest.fixture
def model(tmp_path):
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def config(*argv: str) -> NodeConfig:
    return NodeConfig.from_args(list(argv))


@pytest.mark.parametrize("reuse_port", [False, True], ids=["plain", "so_reuseport"])
def test_a_port_another_process_listens_on_is_taken(reuse_port):
    with socket.socket() as holder:  # p2pd listens with SO_REUSEPORT: a second p2pd would share the port
        if reuse_port:
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        message = port_taken("127.0.0.1", port)
        assert message is not None and f"port {port}" in message and "taken" in message
        assert port_taken("0.0.0.0", port) is not None
    assert port_taken("127.0.0.1", port) is None
    assert port_taken("127.0.0.1", 0) is None


def test_an_address_not_of_this_machine():
    message = port_taken("192.0.2.7", 4001)
    assert message is not None and "not an address of this machine" in message


def test_wildcard_hosts_resolve_to_the_interface_toward_the_peers():
    assert is_wildcard("0.0.0.0") and is_wildcard("::") and not is_wildcard("127.0.0.1")
    assert outgoing_host([PEER]) == "127.0.0.1"
    assert outgoing_host(["/dns4/example.org/tcp/1/p2p/Qm", PEER]) == "127.0.0.1"  # the first with an IP


@pytest.mark.parametrize("flag", ["--port", "--dht-port", "--metrics-port"])
def test_taken_ports(flag, model):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"^{flag} {port}: port {port} on 127.0.0.1 is taken"):
            check(config(str(model), "--new-swarm", flag, str(port)))


def test_a_wildcard_bind_announces_the_interface_toward_the_peers(model):
    resolved = resolve_wildcard(config(str(model), "--initial-peers", PEER, "--host", "0.0.0.0"))
    host, port = resolved.public_address.rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) == resolved.port > 0
    fixed = resolve_wildcard(config(str(model), "--initial-peers", PEER, "--host", "0.0.0.0", "--port", "31330"))
    assert fixed.public_address == "127.0.0.1:31330"
    given = config(str(model), "--initial-peers", PEER, "--host", "0.0.0.0", "--public-address", "example.org:1")
    assert resolve_wildcard(given) == given
    plain = config(str(model), "--initial-peers", PEER)
    assert resolve_wildcard(plain) == plain


def test_a_wildcard_bind_without_a_route_names_public_address(model, monkeypatch):
    monkeypatch.setattr("homeswarm.node.preflight.outgoing_host", lambda peers: None)
    with pytest.raises(ConfigError, match="--public-address HOST:PORT"):
        resolve_wildcard(config(str(model), "--new-swarm", "--host", "0.0.0.0"))


def test_the_command_line_loads_no_torch_or_hivemind(model):
    """--help and bad input answer before the heavy imports (seconds of a start)."""
    code = ("import sys\nfrom homeswarm.node.preflight import parse_args\n"
            f"try:\n    parse_args([{str(model)!r}, '--new-swarm', '--max-memory', '1KiB'])\n"
            "except SystemExit as e:\n    assert e.code == 2\n"
            "print(sorted(m for m in ('torch', 'hivemind', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    assert out.stderr.startswith("join-swarm: error: --max-memory 1KiB") and out.stderr.count("\n") == 1
