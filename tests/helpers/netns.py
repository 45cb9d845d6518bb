"""A Linux network namespace that nobody can dial into: a home PC behind NAT, on one machine.

``unreachable_namespace()`` creates a namespace joined to this one by a veth pair (this side
``outside_ip``, the namespace ``inside_ip``), and in it an iptables INPUT chain that accepts loopback and
packets of connections the namespace opened (ESTABLISHED, RELATED) and drops everything else: outbound
connections work, inbound ones time out, as behind a NAT without port forwarding. Everything goes away
on exit, whatever happened: processes still running in the namespace, the namespace (with its veth end
and its iptables rules), the veth pair.

``why_not()`` says why such a namespace cannot be made here (not root, no ``ip``, no ``iptables``), or
returns None. Debian's ``iptables`` is installed with apt-get when missing and possible.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Namespace:
    name: str
    outside_ip: str
    inside_ip: str

    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=30)


def _install_iptables() -> None:
    if shutil.which("iptables") or not shutil.which("apt-get"):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with contextlib.suppress(subprocess.SubprocessError, OSError):
        subprocess.run(["apt-get", "install", "-y", "-qq", "iptables"], env=env, capture_output=True, timeout=300)
        if not shutil.which("iptables"):
            subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=300)
            subprocess.run(["apt-get", "install", "-y", "-qq", "iptables"], env=env, capture_output=True,
                           timeout=300)


def why_not() -> str | None:
    """Why an unreachable namespace cannot be created here, or None if it can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "creating network namespaces needs root"
    if not shutil.which("ip"):
        return "the `ip` tool (iproute2) is missing"
    _install_iptables()
    if not shutil.which("iptables"):
        return "Debian's `iptables` is missing and could not be installed"
    probe = f"hsprobe{os.getpid()}"
    try:
        _run("ip", "netns", "add", probe)
    except (subprocess.SubprocessError, OSError) as e:
        return f"`ip netns add` fails here: {getattr(e, 'stderr', '') or e}"
    with contextlib.suppress(subprocess.SubprocessError):
        _run("ip", "netns", "delete", probe)
    return None


@contextlib.contextmanager
def unreachable_namespace() -> Iterator[Namespace]:
    tag = f"{os.getpid() % 100000}"
    name, outside, inside = f"hsnat{tag}", f"hsva{tag}", f"hsvb{tag}"
    subnet = f"10.{200 + os.getpid() % 50}.{os.getpid() // 50 % 250}"
    ns = Namespace(name, f"{subnet}.1", f"{subnet}.2")
    try:
        _run("ip", "netns", "add", name)
        _run("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
        _run("ip", "link", "set", inside, "netns", name)
        _run("ip", "addr", "add", f"{ns.outside_ip}/24", "dev", outside)
        _run("ip", "link", "set", outside, "up")
        inns = ["ip", "netns", "exec", name]
        _run(*inns, "ip", "addr", "add", f"{ns.inside_ip}/24", "dev", inside)
        _run(*inns, "ip", "link", "set", inside, "up")
        _run(*inns, "ip", "link", "set", "lo", "up")
        _run(*inns, "iptables", "-A", "INPUT", "-i", "lo", "-j", "ACCEPT")
        _run(*inns, "iptables", "-A", "INPUT", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT")
        _run(*inns, "iptables", "-A", "INPUT", "-j", "DROP")
        yield ns
    finally:
        _kill_processes_in(name)
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            _run("ip", "netns", "delete", name)  # takes its veth end, the pair and its iptables rules along
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            _run("ip", "link", "delete", outside)  # if the namespace never got its end


def _kill_processes_in(name: str) -> None:
    for _ in range(50):
        try:
            pids = [int(p) for p in _run("ip", "netns", "pids", name).stdout.split()]
        except (subprocess.SubprocessError, OSError):
            return
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
