"""The memory limits that bound a node, read from a fake /proc and /sys/fs/cgroup: its own cgroup's and
every one above it (a systemd service's limit is on /system.slice/NAME.service, not on the root)."""

from __future__ import annotations

from pathlib import Path

from homeswarm.node.process_memory import cgroup_memory_left, own_cgroups

GIB = 2**30
SERVICE = "/system.slice/join-swarm.service"


def fake(tmp_path: Path, cgroup_lines: str, files: dict[str, str]) -> tuple[Path, Path]:
    proc, root = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text(cgroup_lines)
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return proc, root


def test_a_services_own_limit_is_found_below_the_root(tmp_path):
    proc, root = fake(tmp_path, f"0::{SERVICE}\n", {
        "memory.max": "max",  # the root: where the node used to look
        "system.slice/memory.max": "max",
        "system.slice/join-swarm.service/memory.max": str(8 * GIB),
        "system.slice/join-swarm.service/memory.high": str(6 * GIB),
        "system.slice/join-swarm.service/memory.current": str(1 * GIB),
    })
    assert own_cgroups(proc)[""] == SERVICE
    assert cgroup_memory_left(proc, root) == 5 * GIB  # MemoryHigh, less what the service uses


def test_the_tightest_level_wins(tmp_path):
    proc, root = fake(tmp_path, f"0::{SERVICE}\n", {
        "system.slice/memory.max": str(4 * GIB),  # a slice limit above the service's
        "system.slice/memory.current": str(3 * GIB),
        "system.slice/join-swarm.service/memory.max": str(8 * GIB),
        "system.slice/join-swarm.service/memory.current": str(1 * GIB),
    })
    assert cgroup_memory_left(proc, root) == 1 * GIB


def test_a_container_sees_its_own_cgroup_as_the_root(tmp_path):
    # /proc/self/cgroup names a path the container's /sys/fs/cgroup does not show: the visible root is its own
    proc, root = fake(tmp_path, "0::/docker/abc123\n", {"memory.max": str(2 * GIB), "memory.current": str(GIB // 2)})
    assert cgroup_memory_left(proc, root) == GIB + GIB // 2


def test_cgroup_v1(tmp_path):
    proc, root = fake(tmp_path, "4:memory:/process_api/x\n3:cpu,cpuacct:/\n0::/\n", {
        "memory/memory.limit_in_bytes": "9223372036854771712",  # v1's "no limit"
        "memory/process_api/x/memory.limit_in_bytes": str(3 * GIB),
        "memory/process_api/x/memory.usage_in_bytes": str(GIB),
    })
    assert own_cgroups(proc)["memory"] == "/process_api/x" and own_cgroups(proc)["cpuacct"] == "/"
    assert cgroup_memory_left(proc, root) == 2 * GIB


def test_no_limit_anywhere(tmp_path):
    proc, root = fake(tmp_path, f"0::{SERVICE}\n", {"memory.max": "max",
                                                    "system.slice/join-swarm.service/memory.max": "max"})
    assert cgroup_memory_left(proc, root) is None
    assert cgroup_memory_left(tmp_path / "no-proc", root) is None


def test_other_nodes_on_the_machine_are_counted_once_each(tmp_path):
    from homeswarm.node.process_memory import other_nodes

    proc = tmp_path / "proc"

    def process(pid: int, ppid: int, *argv: str) -> None:
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
        (proc / str(pid) / "stat").write_text(f"{pid} (python) S {ppid} 1 1 0")

    process(100, 1, "/venv/bin/python", "/venv/bin/join-swarm", "model", "--new-swarm")  # this node
    process(101, 100, "/venv/bin/python", "/venv/bin/join-swarm", "model", "--new-swarm")  # its DHT process
    process(200, 1, "/venv/bin/python", "/venv/bin/join-swarm", "model", "--initial-peers", "X")  # another
    process(201, 200, "/venv/bin/python", "/venv/bin/join-swarm", "model", "--initial-peers", "X")  # its DHT
    process(300, 1, "python", "-m", "homeswarm.node.main", "model")  # a third, started as a module
    process(400, 1, "/venv/bin/python", "/venv/bin/homeswarm", "dht")  # not a node
    process(500, 1, "vim", "notes-about-join-swarm")  # not a node either
    process(600, 1, "timeout", "60", "/venv/bin/join-swarm", "model")  # what runs one, not the node
    assert other_nodes(proc, me=100) == 2
    assert other_nodes(proc, me=999) == 3
