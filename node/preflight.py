"""`join-swarm`'s checks of its command line and files, before anything heavy loads or starts.

Run by the console script before torch and hivemind are imported (which takes seconds) and before the
DHT starts: every setting that cannot work fails here in one line with exit code 2, well under two
seconds, instead of after the node has joined the swarm (where a service manager would restart it
forever). What needs the model code (the checkpoint's config read as a model, the shards of each
block) is checked again, more thoroughly, by ``node.main`` before the DHT starts.
"""

from __future__ import annotations

import dataclasses
import json
import re
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from homeswarm.node.capacity import DEFAULT_FIXED_COST, WORKING_MEMORY, parse_size
from homeswarm.node.config import ConfigError, NodeConfig
from homeswarm.routing.preflight import identity_problem, is_wildcard, outgoing_host, port_taken

_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")
_SNAPSHOT = re.compile(r"models--[^/]+/snapshots/[0-9a-f]{40}$")


def parse_args(argv: Sequence[str] | None = None, prog: str = "join-swarm") -> NodeConfig:
    """The checked config; on bad input print ``PROG: error: ...`` and exit with code 2."""
    try:
        return check(NodeConfig.from_args(argv))
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)


def check(config: NodeConfig) -> NodeConfig:
    """Raise ConfigError for a setting or file that cannot work; return the config with a wildcard bind
    address resolved to the address to announce (``public_address``)."""
    check_model_path(config.model_dir, from_peers=bool(config.initial_peers))
    check_memory(config)
    check_identity(config.identity)
    for flag, port in (("--port", config.port), ("--dht-port", config.dht_port), ("--metrics-port", config.metrics_port)):
        if port and (taken := port_taken(config.host, port)) is not None:
            raise ConfigError(f"{flag} {port}: {taken}")
    return resolve_wildcard(config)


def check_model_path(model_dir: str, *, from_peers: bool = False) -> None:
    """A folder here must hold config.json and some weights (``from_peers``, joining a swarm: config.json
    alone will do, the blocks come from nodes serving them); a hub repository id (owner/name, where no
    folder owner exists) is left to the download."""
    path = Path(model_dir)
    if model_dir.lower().endswith(".gguf"):
        return check_gguf_path(path)
    if not path.exists():
        if _REPO_ID.fullmatch(model_dir) and not path.parent.exists():
            return
        raise ConfigError(f"model directory not found: {model_dir}")
    if not path.is_dir():
        raise ConfigError(f"{model_dir} is not a folder: give the checkpoint's folder (config.json and safetensors)")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"no config.json in model directory {model_dir}")
    try:
        if not isinstance(json.loads(config_path.read_text(encoding="utf-8")), dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise ConfigError(f"{config_path} is not a checkpoint config: {e}") from None
    if _SNAPSHOT.search(path.absolute().as_posix()) or from_peers:
        return  # a hub cache snapshot downloads the shards it lacks; a joining node fetches them from peers
    if not (path / "model.safetensors").is_file() and not (path / "model.safetensors.index.json").is_file():
        raise ConfigError(f"{model_dir} holds no block's weights (no model.safetensors, nor a "
                          f"model.safetensors.index.json naming its shards): give the checkpoint's folder with the "
                          f"shards of the blocks to serve, a repository id to download them, or join a swarm "
                          f"(--initial-peers) whose nodes serve them to fetch them from those")


def check_gguf_path(path: Path) -> None:
    """A GGUF file must exist and start as one (its parts, metadata and tensors are read once torch loads)."""
    if not path.is_file():
        raise ConfigError(f"GGUF file not found: {path}")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror or e}") from None
    if magic != b"GGUF":
        raise ConfigError(f"{path} is not a GGUF file (it does not start with GGUF)")


def check_memory(config: NodeConfig) -> None:
    """--max-memory must hold at least the node's runtime (interpreter, torch, DHT, p2pd) unless --fixed-cost
    says otherwise; a bare number is bytes, so ``--max-memory 4`` asks for 4 bytes."""
    if config.max_memory is None or config.fixed_cost is not None:
        return
    budget = parse_size(config.max_memory)
    runtime = DEFAULT_FIXED_COST + WORKING_MEMORY
    if budget < runtime:
        unit = " (a number without a unit is bytes: 4GiB, 500MB)" if config.max_memory.strip().isdigit() else ""
        raise ConfigError(f"--max-memory {config.max_memory} is less than the node's runtime alone (about "
                          f"{runtime / 2**20:.0f} MiB: Python, torch, the DHT and p2pd){unit}")


def check_identity(identity: str | None) -> None:
    """The identity file is read, or created, where the node's user may do so."""
    if identity is not None and (problem := identity_problem(identity)) is not None:
        raise ConfigError(problem)


def resolve_wildcard(config: NodeConfig) -> NodeConfig:
    """A node bound to every interface (0.0.0.0, ::) announces the address of the interface that leads to
    its peers, with the gRPC port fixed now (a free one for --port 0); --public-address overrides both."""
    if not is_wildcard(config.host) or config.public_address is not None:
        return config
    host = outgoing_host(config.initial_peers)
    if host is None:
        raise ConfigError(f"--host {config.host or '0.0.0.0'} binds every interface, and no route out of this machine "
                          f"says which address peers can dial: give --public-address HOST:PORT")
    port = config.port
    if port == 0:
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((config.host, 0))
            port = sock.getsockname()[1]
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return dataclasses.replace(config, port=port, public_address=address)
