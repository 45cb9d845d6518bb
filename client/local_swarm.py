"""LocalSwarm: a bootstrap peer, `join-swarm` daemons and `homeswarm serve` APIs on loopback, as subprocesses.

Used by `homeswarm demo` and by the tests. Every process it starts is stopped on ``close()``
(SIGTERM, then SIGKILL after a timeout; the APIs first, as clients of the nodes), also when start-up
fails half way, and receives SIGTERM if the process that started it dies first (killed, say, by a
test run's time limit) rather than living on in its own session.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from homeswarm.client.transport import ChannelPool
from homeswarm.protocol.ready_file import certificate_path, read_ready_file
from homeswarm.routing.tls import channel_credentials, channel_options


def console_script(name: str) -> list[str]:
    """The console script installed beside this Python, or the module behind it."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return [str(candidate)]
    module = {"join-swarm": "homeswarm.node.main", "homeswarm": "homeswarm.client.cli"}[name]
    return [sys.executable, "-m", module]


_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def with_parent_death_signal(argv: Sequence[str]) -> list[str] | None:
    """``argv`` run through util-linux's ``setpriv --pdeathsig TERM``, which arms the parent-death signal (see
    ``_term_with_parent``) and execs it: no Python runs in the forked child, so the spawn may take the fork-free
    path. A hook run between fork and exec runs the interpreter's after-fork handlers in the child of a process
    with threads (gRPC's, torch's), where it can abort. None off the main thread, off Linux or without setpriv."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    setpriv = shutil.which("setpriv")
    return None if setpriv is None else [setpriv, "--pdeathsig", "TERM", "--", *argv]


def _term_with_parent() -> Callable[[], None] | None:
    """A hook, run in a child between fork and exec, that has the child receive SIGTERM when this process
    dies, however it dies (SIGKILL included: a test run killed by its time limit): each daemon then stops as
    on SIGTERM, its DHT process and p2pd with it. Linux's parent-death signal follows the thread that forks,
    so it is armed only for children started from the main thread (whose end is the process's); None
    elsewhere and on other systems, where ``close()`` alone stops the children."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(1)

    return arm


def split_blocks(num_blocks: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous spans, as even as possible: split_blocks(8, 3) == [(0, 3), (3, 6), (6, 8)]."""
    parts = max(1, min(parts, num_blocks))
    bounds = [round(i * num_blocks / parts) for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(parts)]


@dataclass
class Daemon:
    process: subprocess.Popen
    ready_file: Path
    log_file: Path
    info: dict[str, Any] | None = None

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""


class LocalSwarm:
    def __init__(self, workdir: str | os.PathLike[str] | None = None, *, env: dict[str, str] | None = None):
        self._tmp = tempfile.TemporaryDirectory(prefix="homeswarm-") if workdir is None else None
        self.workdir = Path(workdir) if workdir is not None else Path(self._tmp.name)  # type: ignore[union-attr]
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, **(env or {})}
        self.bootstrap: Daemon | None = None
        self.nodes: list[Daemon] = []
        self.apis: list[Daemon] = []
        self.others: list[Daemon] = []
        self._count = 0

    @property
    def initial_peers(self) -> list[str]:
        if self.bootstrap is None or self.bootstrap.info is None:
            raise RuntimeError("the bootstrap peer is not running")
        return list(self.bootstrap.info["dht_maddrs"])

    def _spawn(self, argv: Sequence[str], name: str) -> Daemon:
        self._count += 1
        ready = self.workdir / f"{name}-{self._count}.ready.json"
        log_path = self.workdir / f"{name}-{self._count}.log"
        log = open(log_path, "wb")  # noqa: SIM115 - owned by the child from here on
        argv = [*argv, "--ready-file", str(ready)]
        armed = with_parent_death_signal(argv)
        process = subprocess.Popen(
            armed or argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            start_new_session=True,  # a Ctrl-C in the terminal reaches us, and we stop the children in order
            preexec_fn=None if armed else _term_with_parent(),
        )
        process.args = argv  # the daemon's own command line, as callers read it, without setpriv's prefix
        log.close()
        return Daemon(process, ready, log_path)

    def _wait_ready(self, daemon: Daemon, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = read_ready_file(daemon.ready_file)
            if info is not None:
                cert = certificate_path(daemon.ready_file)  # a TLS node's, written before the ready file
                if "blocks" in info:  # a node: its announced certificate, "" with --insecure
                    info["tls_cert"] = cert.read_text() if cert.exists() else ""
                daemon.info = info
                return info
            if daemon.process.poll() is not None:
                raise RuntimeError(
                    f"{daemon.process.args[0]} exited with code {daemon.process.returncode}:\n{daemon.log()[-3000:]}"
                )
            time.sleep(0.05)
        raise TimeoutError(f"{daemon.process.args} not ready after {timeout:g} s:\n{daemon.log()[-3000:]}")

    def start_bootstrap(self, timeout: float = 60.0, host: str = "127.0.0.1") -> dict[str, Any]:
        self.bootstrap = self._spawn([*console_script("homeswarm"), "dht", "--host", host], "dht")
        return self._wait_ready(self.bootstrap, timeout)

    def start_process(self, argv: Sequence[str], name: str, *, wait: bool = True, timeout: float = 120.0) -> Daemon:
        """Any daemon that takes ``--ready-file`` (run under ``ip netns exec``, say); stopped with the swarm."""
        daemon = self._spawn(argv, name)
        self.others.append(daemon)
        if wait:
            self._wait_ready(daemon, timeout)
        return daemon

    def start_node(self, model_dir: str | os.PathLike[str], *args: str, wait: bool = True,
                   timeout: float = 120.0) -> Daemon:
        argv = [*console_script("join-swarm"), str(model_dir), "--initial-peers", *self.initial_peers,
                "--host", "127.0.0.1", *args]
        daemon = self._spawn(argv, "node")
        self.nodes.append(daemon)
        if wait:
            self._wait_ready(daemon, timeout)
        return daemon

    def start_api(self, model_dir: str | os.PathLike[str], *args: str, wait: bool = True,
                  timeout: float = 60.0) -> Daemon:
        """`homeswarm serve` on 127.0.0.1, a free port; its ready file holds ``url`` ("http://HOST:PORT/v1")."""
        argv = [*console_script("homeswarm"), "serve", str(model_dir), "--initial-peers", *self.initial_peers,
                "--host", "127.0.0.1", "--port", "0", *args]
        daemon = self._spawn(argv, "api")
        self.apis.append(daemon)
        if wait:
            self._wait_ready(daemon, timeout)
        return daemon

    def wait_ready(self, daemon: Daemon, timeout: float = 120.0) -> dict[str, Any]:
        return self._wait_ready(daemon, timeout)

    def pool(self) -> ChannelPool:
        """A channel pool that reaches the started nodes as a client does: over TLS pinned to the certificate
        each announces (from their ready files), in plaintext to ``--insecure`` ones."""
        pool = ChannelPool()
        for node in self.nodes:
            if node.info is not None:
                pool.note_tls(node.info["peer_id"], node.info.get("tls_cert", ""))
        return pool

    @staticmethod
    def channel(node: Daemon) -> grpc.Channel:
        """A gRPC channel straight to a started node (TLS pinned to its announced certificate, if any)."""
        assert node.info is not None, "the node is not ready"
        cert = node.info.get("tls_cert", "")
        if not cert:
            return grpc.insecure_channel(node.info["address"])
        return grpc.secure_channel(node.info["address"], channel_credentials(cert), options=channel_options())

    @staticmethod
    def kill(daemon: Daemon) -> None:
        """SIGKILL the daemon's whole process group (its DHT process and p2pd too), as a crash would."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(daemon.process.pid, signal.SIGKILL)
        daemon.process.wait()

    @staticmethod
    def stop(daemon: Daemon, *, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the daemon and wait; SIGKILL its process group if it has not exited by ``timeout``."""
        if daemon.process.poll() is None:
            daemon.process.send_signal(sig)
            try:
                daemon.process.wait(timeout)
            except subprocess.TimeoutExpired:
                LocalSwarm.kill(daemon)
        # whatever the daemon left in its group (a helper process orphaned by a crash) goes too
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(daemon.process.pid, signal.SIGKILL)
        return daemon.process.returncode

    def close(self) -> None:
        for daemon in self.apis:
            self.stop(daemon, timeout=15.0)
        for daemon in [*self.nodes, *self.others]:
            if daemon.process.poll() is None:
                daemon.process.send_signal(signal.SIGTERM)
        for daemon in [*self.nodes, *self.others, *([self.bootstrap] if self.bootstrap else [])]:
            self.stop(daemon, timeout=15.0)
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> LocalSwarm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
