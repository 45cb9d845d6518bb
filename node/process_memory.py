"""The memory of a node as the operating system sees it: the resident set of its process tree.

A node is more than its Python process: hivemind forks a DHT process, which starts a p2pd daemon, and
torch may start a shared-memory manager. Their resident memory (``VmRSS``, and ``VmHWM`` for the peak)
is read from ``/proc`` for the node's process and every descendant, found through the children of
every thread (the DHT process is forked from a worker thread, so the main thread's children miss it).
Pages that processes share (the torch libraries a forked child still maps) count once per process,
as a sum of RSS does: the figure is an upper bound of what the tree takes, never an underestimate.
On systems without ``/proc`` every reading is None.
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
