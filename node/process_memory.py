"""The memory of a node as the operating system sees it: the resident set of its process tree.

A node is more than its Python process: hivemind forks a DHT process, which starts a p2pd daemon, and
torch may start a shared-memory manager. Their resident memory (``VmRSS``, and ``VmHWM`` for the peak)
is read from ``/proc`` for the node's process and every descendant, found through the children of
every thread (the DHT process is forked from a worker thread, so the main thread's children miss it).
Pages that processes share (the torch libraries a forked child still maps) count once per process,
as a sum of RSS does: the figure is an upper bound of what the tree takes, never an underestimate.
On systems without ``/proc`` every reading is None.

``cgroup_memory_left`` reads the memory limits that bound this process: those of its own cgroup
(``/proc/self/cgroup``: a systemd service's is /system.slice/NAME.service, not the root cgroup at
/sys/fs/cgroup) and of every cgroup above it, the tightest of them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TreeMemory:
    rss: int  # bytes resident now, summed over the tree
    peak: int  # the sum of each process's peak resident bytes (an upper bound of the tree's peak)
    processes: dict[str, int]  # command name -> resident bytes (summed over processes of that name)


def _status_bytes(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``: the children of each of its threads, recursively."""
    found: list[int] = []
    stack = [pid]
    while stack:
        for task in Path(f"/proc/{stack.pop()}/task").glob("*/children"):
            try:
                kids = [int(c) for c in task.read_text().split()]
            except (OSError, ValueError):
                continue
            found += kids
            stack += kids
    return found


def tree_memory(pid: int | None = None) -> TreeMemory | None:
    """The resident memory of process ``pid`` (default: this one) and its descendants; None without /proc."""
    pid = os.getpid() if pid is None else pid
    rss = peak = 0
    processes: dict[str, int] = {}
    if _status_bytes(pid, "VmRSS") is None:
        return None
    for p in [pid, *descendants(pid)]:
        now, high = _status_bytes(p, "VmRSS"), _status_bytes(p, "VmHWM")
        if now is None or high is None:  # ended meanwhile
            continue
        try:
            name = Path(f"/proc/{p}/comm").read_text().strip()
        except OSError:
            continue
        rss, peak = rss + now, peak + high
        processes[name] = processes.get(name, 0) + now
    return TreeMemory(rss, peak, processes)


_NO_LIMIT = 2**60  # cgroup v1 writes "no limit" as a huge number


def _read_limit(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) < _NO_LIMIT else None  # "max": no limit


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def own_cgroups(proc: Path = Path("/proc")) -> dict[str, str]:
    """This process's cgroup paths: "" -> its cgroup v2 path ("/system.slice/join-swarm.service"), and each
    cgroup v1 controller -> its path, from /proc/self/cgroup."""
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return {}
    found: dict[str, str] = {}
    for line in lines:
        _hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        for controller in controllers.split(",") if controllers else [""]:
            found[controller] = path or "/"
    return found


def _levels(root: Path, path: str) -> list[Path]:
    """The folders of ``path``'s cgroup and every one above it, under ``root``, innermost first."""
    parts = [p for p in path.strip("/").split("/") if p and p != ".."]
    return [root.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]


def cgroup_memory_left(proc: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes the memory limits above this process still allow, where one is set; None without any.

    At each level from this process's cgroup up to the root, the limit less that cgroup's usage; the
    smallest. cgroup v2: ``memory.max``, and ``memory.high`` (past which the kernel throttles and
    reclaims), less ``memory.current``; cgroup v1: the memory controller's ``memory.limit_in_bytes`` less
    ``memory.usage_in_bytes``. A level the process cannot see is skipped (a container's view of the
    hierarchy starts at its own cgroup)."""
    cgroups = own_cgroups(proc)
    left: list[int] = []
    if "" in cgroups:
        for folder in _levels(cgroup_root, cgroups[""]):
            usage = _read_int(folder / "memory.current")
            for name in ("memory.max", "memory.high"):
                limit = _read_limit(folder / name)
                if limit is not None:
                    left.append(max(0, limit - (usage or 0)))
    if "memory" in cgroups:
        for folder in _levels(cgroup_root / "memory", cgroups["memory"]):
            limit = _read_limit(folder / "memory.limit_in_bytes")
            if limit is not None:
                left.append(max(0, limit - (_read_int(folder / "memory.usage_in_bytes") or 0)))
    return min(left, default=None)


def _is_node(cmdline: bytes) -> bool:
    """A Python running join-swarm (its console script, or ``-m homeswarm.node.main``), not a command that
    merely names it (``timeout 60 join-swarm ...``, an editor)."""
    args = [a for a in cmdline.decode(errors="replace").split("\0") if a]
    if len(args) < 2 or "python" not in os.path.basename(args[0]):
        return False
    return os.path.basename(args[1]) == "join-swarm" or args[1:3] == ["-m", "homeswarm.node.main"]


def _parent(proc: Path, pid: int) -> int | None:
    try:
        return int((proc / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def other_nodes(proc: Path = Path("/proc"), me: int | None = None) -> int:
    """How many other `join-swarm` nodes run on this machine (their DHT processes, forked from them, not
    counted): nodes started side by side each see the same available memory."""
    me = os.getpid() if me is None else me
    nodes: set[int] = set()
    for entry in proc.iterdir() if proc.is_dir() else ():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            if _is_node((entry / "cmdline").read_bytes()):
                nodes.add(int(entry.name))
        except OSError:
            continue
    return sum(1 for pid in nodes if _parent(proc, pid) not in nodes | {me})
