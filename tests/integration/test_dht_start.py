"""Starting a DHT peer is bounded: a DHT process that does not get ready in time is killed (with the
p2pd daemon it started) and the start retried, and the caller gets an error instead of a hang. A DHT
process killed on its own takes p2pd with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from homeswarm.routing import dht as dht_module
from homeswarm.routing.dht import DHTStartError, SwarmDHT


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.timeout(60)
def test_a_dht_that_is_not_ready_in_time_is_killed_and_retried(monkeypatch):
    started: list[int] = []
    kill = dht_module._kill_process_tree

    def recording_kill(pid):
        started.append(pid)
        started.extend(dht_module._children(pid))  # the p2pd daemon, if it got that far
        kill(pid)

    monkeypatch.setattr(dht_module, "_kill_process_tree", recording_kill)
    t0 = time.monotonic()
    with pytest.raises(DHTStartError, match="did not start within"):
        SwarmDHT.create(start_timeout=0.01, attempts=2)
    assert time.monotonic() - t0 < 30  # two short attempts, not a hang: 0.5-0.7 s with one core kept busy
    assert len([p for p in started if p != os.getpid()]) >= 2  # two attempts, each killed
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in started) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in started if _alive(p)]


@pytest.mark.timeout(60)
def test_a_dht_starts_within_the_timeout():
    dht = SwarmDHT.create(start_timeout=30)
    try:
        assert dht.visible_maddrs()
    finally:
        dht.shutdown()


@pytest.mark.timeout(120)
def test_with_grpc_threads_running_the_dht_comes_from_the_fork_server(monkeypatch):
    import grpc

    channel = grpc.insecure_channel("127.0.0.1:1")  # nothing listens: connecting starts gRPC's threads
    try:
        with pytest.raises(grpc.FutureTimeoutError):
            grpc.channel_ready_future(channel).result(timeout=0.5)
        assert dht_module._grpc_threads_running()
        used: list[str] = []
        original = dht_module._ForkServerDHT._Popen

        def recording_popen(process_obj):
            used.append("forkserver")
            return original(process_obj)

        monkeypatch.setattr(dht_module._ForkServerDHT, "_Popen", staticmethod(recording_popen))
        first = SwarmDHT.create(start_timeout=60)
        try:
            second = SwarmDHT.create(first.visible_maddrs(), client_mode=True, start_timeout=60)
            try:
                assert used == ["forkserver", "forkserver"]
                with open(f"/proc/{second.dht.pid}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
                assert parent != os.getpid() and second.dht.is_alive()  # forked by the server, not by us
                assert second.list_models() == {} and second.get_servers("none", 0, 2) == []
            finally:
                second.shutdown()
        finally:
            first.shutdown()
        assert not first.dht.is_alive() and not second.dht.is_alive()
    finally:
        channel.close()


def test_start_method_is_checked():
    with pytest.raises(ValueError, match="start_method"):
        SwarmDHT.create(start_method="spawn")


_ORPHAN_CHECK = r"""
import ctypes, os, signal, sys, time
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphaned descendants become our children
from homeswarm.routing.dht import SwarmDHT, _children
dht = SwarmDHT.create(start_method=sys.argv[1])
p2pd = _children(dht.dht.pid)
assert len(p2pd) == 1, p2pd
os.kill(p2pd[0], signal.SIGSTOP)  # a p2pd that writes nothing would not die of a broken pipe either
os.kill(dht.dht.pid, signal.SIGKILL)
deadline = time.monotonic() + 10
while time.monotonic() < deadline:
    pid, status = os.waitpid(-1, os.WNOHANG)
    if pid == p2pd[0]:
        print(os.WTERMSIG(status) if os.WIFSIGNALED(status) else -os.WEXITSTATUS(status))
        break
    time.sleep(0.01)
else:
    os.kill(p2pd[0], signal.SIGKILL)
    print("alive")
"""


@pytest.mark.timeout(90)
@pytest.mark.parametrize("start_method", ["fork", "forkserver"])
def test_p2pd_dies_with_a_killed_dht_process(start_method):
    """kill -9 of the DHT process (not of its owner, whose death the DHT process watches for): the
    kernel's parent-death signal ends p2pd. Run in a child process that adopts orphans, to see how p2pd
    ended: killed by that signal, not left running nor ended some other way."""
    result = subprocess.run([sys.executable, "-c", _ORPHAN_CHECK, start_method], capture_output=True, text=True,
                            timeout=80)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == str(int(signal.SIGKILL)), result.stdout
