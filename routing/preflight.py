"""Checks of a DHT peer's settings that run before it starts, and the words for a start that failed.

Everything here is cheap and imports neither hivemind nor torch, so the command lines can refuse bad
input in a fraction of a second, before any process is started: the form of ``--initial-peers`` (and
their place on the command line), a port that another process holds, a wildcard bind address that
must not be announced, and p2pd's own error text turned into a sentence that says what to check.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import socket
from collections.abc import Sequence
from pathlib import Path

PEERS_FLAG = "--initial-peers"
# the protocols a multiaddr of a peer starts with; a path to a folder (a model) starts otherwise
_MADDR_START = re.compile(r"/(ip4|ip6|dns|dns4|dns6|dnsaddr|p2p|p2p-circuit)/")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
# where a wildcard-bound node looks for the address of its outgoing interface when it has no peer to
# ask about (a new swarm): a UDP "connect" only picks a route, it sends nothing
_ROUTE_PROBE = ("192.0.2.1", 9)  # TEST-NET-1 (RFC 5737): routed like any public address, never answered
_P2PD_STAMP = re.compile(r"\d{4}/\d{2}/\d{2} \d{2}:\d{2}:\d{2}(\.\d+)? ?")


def is_multiaddr(text: str) -> bool:
    """Whether ``text`` has the form of a peer's multiaddr (``/ip4/HOST/tcp/PORT/p2p/PEER_ID`` and kin)."""
    return bool(_MADDR_START.match(text))


def check_initial_peers(peers: Sequence[str]) -> str | None:
    """None if every peer is a multiaddr naming its peer id, else a one-line message about the first that is not."""
    for peer in peers:
        if not is_multiaddr(peer) or "/p2p/" not in peer or peer.rstrip("/").endswith("/p2p"):
            return (f"{PEERS_FLAG} takes multiaddrs with a peer id (/ip4/HOST/tcp/PORT/p2p/PEER_ID, as a bootstrap "
                    f"peer prints them), got {peer!r}")
    return None


def split_peers_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` with every ``--initial-peers`` value given on its own (``--initial-peers=M``) and comma-separated
    values split, so that a positional argument may follow the peers: ``--initial-peers M1 M2 MODEL``.

    ``--initial-peers`` takes one value or more; argparse gives it every word up to the next option,
    positional ones included. A peer's multiaddr starts with ``/ip4/``, ``/dns/`` and the like, which a
    model's folder or repository id does not: the first word of another form ends the peers.
    """
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            return out + list(argv[i:])
        if arg == PEERS_FLAG or arg.startswith(PEERS_FLAG + "="):
            values = [arg.split("=", 1)[1]] if "=" in arg else []
            i += 1
            if not values:  # the words that follow, up to the next option or a word that is no multiaddr
                while i < len(argv) and not argv[i].startswith("-") and (not values or is_multiaddr(argv[i])):
                    values.append(argv[i])
                    i += 1
            peers = [p for v in values for p in v.split(",") if p]
            out += [f"{PEERS_FLAG}={p}" for p in peers] or [PEERS_FLAG]  # none: argparse says one is needed
            continue
        out.append(arg)
        i += 1
    return out


def port_taken(host: str, port: int) -> str | None:
    """A one-line message if TCP ``host:port`` cannot be listened on (another process holds it), else None.

    p2pd listens with SO_REUSEPORT, so a second p2pd on a taken port would share it silently; a plain
    socket (with SO_REUSEADDR, which connections lingering in TIME_WAIT do not hinder) finds the holder.
    Port 0 is never taken."""
    if port == 0:
        return None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host or "0.0.0.0", port))
            sock.listen(1)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return f"port {port} on {host} is taken by another process: stop it, or pick another port (0: any free one)"
            if e.errno == errno.EADDRNOTAVAIL:
                return f"{host} is not an address of this machine: give one of its own, or 0.0.0.0 for every interface"
            return f"cannot listen on {host}:{port}: {e.strerror or e}"
    return None


def identity_problem(identity: str) -> str | None:
    """A one-line message if the peer identity file ``identity`` can be neither read nor created, else None
    (whether it holds a key is checked where it is read: ``routing.signing.NodeKey.load_or_create``)."""
    path = Path(identity)
    if path.exists():
        if not path.is_file() or not os.access(path, os.R_OK):
            return f"--identity {identity}: not a readable file"
    elif not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
        return f"--identity {identity}: cannot create it (no writable folder {path.parent})"
    return None


def is_wildcard(host: str) -> bool:
    """Whether ``host`` binds every interface (an address no peer can dial)."""
    return host in WILDCARD_HOSTS


def outgoing_host(initial_peers: Sequence[str]) -> str | None:
    """The address of this machine's interface that leads to the first initial peer with an IP address
    (to any public address when there is none), or None where no route leads out. Nothing is sent."""
    targets: list[tuple[str, int]] = []
    for peer in initial_peers:
        parts = peer.split("/")
        if len(parts) > 4 and parts[1] in ("ip4", "ip6") and parts[3] == "tcp" and parts[4].isdigit():
            targets.append((parts[2], int(parts[4])))
    targets.append(_ROUTE_PROBE)
    for host, port in targets:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                sock.connect((host, port))
                address = sock.getsockname()[0]
        except OSError:
            continue
        if not ipaddress.ip_address(address).is_unspecified:
            return address
    return None


def explain_dht_error(error: BaseException | str, initial_peers: Sequence[str], host: str, port: int) -> str:
    """p2pd's and hivemind's words for a DHT that did not start, as one line that says what to check."""
    text = _P2PD_STAMP.sub("", " ".join(str(error).split())).strip()
    lowered = text.lower()
    if initial_peers and "bootstrap" in lowered:
        tried = ", ".join(initial_peers)
        return (f"could not reach any of the initial peers ({tried}): check that they are running, that these "
                f"addresses are current (a bootstrap peer without --identity and a fixed --port gets new ones at "
                f"every start), and that no firewall blocks them")
    if "address already in use" in lowered:
        return f"port {port} on {host} is taken by another process: stop it, or pick another port (0: any free one)"
    if "cannot assign requested address" in lowered:
        return f"{host} is not an address of this machine: give one of its own, or 0.0.0.0 for every interface"
    if text:
        return text
    return type(error).__name__ if isinstance(error, BaseException) else "no reason given"
