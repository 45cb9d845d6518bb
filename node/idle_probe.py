"""Measurements for the idle policy, read from the machine: the thin adapter beside :mod:`.idle`.

- CPU used by processes other than this node's (the node, its DHT process and p2pd are one process
  tree): from /proc on Linux, psutil elsewhere when it is installed, else unknown.
- Seconds since the last user input: terminals (a tty's access time moves with each keystroke) and,
  where systemd-logind runs, the idle hint that desktop sessions set; unknown when neither exists.
- Battery power: /sys/class/power_supply on Linux, psutil elsewhere.
Whatever cannot be read is None, which the policy never takes for the owner being present.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import time
from pathlib import Path

from homeswarm.node.idle import Measurement

_LOGIND_TIMEOUT = 2.0
_GRAPHICAL = ("x11", "wayland", "mir")


class MachineProbe:
    """Takes :class:`Measurement` s; the CPU share is over the time since the previous call.

    ``users``: count only the processes of these user ids as the owner's (default: every process)."""

    def __init__(self, own_pid: int | None = None, users: frozenset[int] | None = None):
        self.own_pid = os.getpid() if own_pid is None else own_pid
        self.users = users
        self._last: tuple[float, float, float] | None = None  # (busy, total, ours) CPU seconds
        self._last_scan: tuple[float, dict[tuple[int, int], float]] | None = None  # users given

    def measure(self, now: float) -> Measurement:
        other = self._users_cpu() if self.users is not None else self._other_cpu()
        return Measurement(now=now, other_cpu=other, input_idle=input_idle_seconds(), on_battery=on_battery())

    def _other_cpu(self) -> float | None:
        sample = _cpu_sample(self.own_pid)
        if sample is None:
            return None
        last, self._last = self._last, sample
        if last is None:
            return None
        busy, total, ours = (now - then for now, then in zip(sample, last, strict=True))
        if total <= 0:
            return None
        return min(1.0, max(0.0, (busy - ours) / total))

    def _users_cpu(self) -> float | None:
        """The share of all cores that the given users' processes (ours excepted) used since the last call."""
        assert self.users is not None
        ours = _proc_tree(self.own_pid)
        wall = time.monotonic()
        seconds: dict[tuple[int, int], float] = {}  # (pid, start time) -> CPU seconds
        for pid_text in filter(str.isdigit, os.listdir("/proc") if os.path.isdir("/proc") else ()):
            pid = int(pid_text)
            if pid in ours:
                continue
            try:
                if os.stat(f"/proc/{pid}").st_uid not in self.users:
                    continue
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue  # it has ended
            seconds[pid, int(fields[19])] = (int(fields[11]) + int(fields[12])) / _TICK
        last, self._last_scan = self._last_scan, (wall, seconds)
        if last is None or not os.path.isdir("/proc"):
            return None
        elapsed = (wall - last[0]) * (os.cpu_count() or 1)
        if elapsed <= 0:
            return None
        # a process that started since the last call used all its CPU time since then
        used = sum(cpu - last[1].get(key, 0.0) for key, cpu in seconds.items())
        return min(1.0, max(0.0, used / elapsed))


# --- CPU -----------------------------------------------------------------------------------------


def _cpu_sample(own_pid: int) -> tuple[float, float, float] | None:
    """(busy, total) CPU seconds of the whole machine and the seconds of our process tree."""
    if os.path.exists("/proc/stat"):
        try:
            return (*_proc_stat(), _proc_tree_seconds(own_pid))
        except (OSError, ValueError, IndexError):
            return None
    try:
        import psutil
    except ImportError:
        return None
    times = psutil.cpu_times()
    idle = times.idle + getattr(times, "iowait", 0.0)
    total = sum(times)
    ours = 0.0
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(own_pid)
        for process in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                cpu = process.cpu_times()
                ours += cpu.user + cpu.system
    return total - idle, total, ours


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_stat() -> tuple[float, float]:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is already counted in user)
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq
    return busy / _TICK, (busy + idle + iowait + steal) / _TICK


def _proc_tree(pid: int) -> set[int]:
    """``pid`` and its descendants (from /proc)."""
    tree: set[int] = set()
    stack = [pid]
    while stack:
        current = stack.pop()
        if current in tree:
            continue
        tree.add(current)
        for task in glob.glob(f"/proc/{current}/task/*/children"):
            with contextlib.suppress(OSError):
                stack += [int(c) for c in Path(task).read_text().split()]
    return tree


def _proc_tree_seconds(pid: int) -> float:
    total = 0.0
    for member in _proc_tree(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # it has ended
        total += (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime
    return total


# --- user input ----------------------------------------------------------------------------------


def input_idle_seconds() -> float | None:
    """Seconds since the last user input, as far as the platform tells; None when it tells nothing."""
    found = [s for s in (_terminal_idle(), _logind_idle()) if s is not None]
    return min(found) if found else None


def _terminal_idle() -> float | None:
    """Seconds since a keystroke on a logged-in terminal (the tty's access time, as `w` reads it)."""
    now = time.time()
    times = []
    for path in glob.glob("/dev/pts/[0-9]*") + glob.glob("/dev/tty[0-9]*"):
        try:
            info = os.stat(path)
        except OSError:
            continue
        times.append(now - info.st_atime)
    return max(0.0, min(times)) if times else None


def _logind_idle() -> float | None:
    """Idle seconds of graphical sessions from systemd-logind's IdleHint, which desktops set."""
    loginctl = shutil.which("loginctl")
    if loginctl is None:
        return None
    try:
        listed = subprocess.run([loginctl, "list-sessions", "--no-legend"], capture_output=True, text=True,
                                timeout=_LOGIND_TIMEOUT, check=True).stdout
        idle: list[float] = []
        for line in listed.splitlines():
            session = line.split()[0] if line.split() else ""
            if not session:
                continue
            shown = subprocess.run(
                [loginctl, "show-session", session, "-p", "Type", "-p", "IdleHint", "-p", "IdleSinceHint"],
                capture_output=True, text=True, timeout=_LOGIND_TIMEOUT, check=True,
            ).stdout
            props = dict(p.split("=", 1) for p in shown.splitlines() if "=" in p)
            if props.get("Type") not in _GRAPHICAL:
                continue
            if props.get("IdleHint") != "yes":
                idle.append(0.0)  # the desktop says the user is there
            elif props.get("IdleSinceHint", "0").isdigit() and int(props["IdleSinceHint"]) > 0:
                idle.append(max(0.0, time.time() - int(props["IdleSinceHint"]) / 1e6))
        return min(idle) if idle else None
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


# --- power ---------------------------------------------------------------------------------------


def on_battery() -> bool | None:
    """True on battery power, False on mains, None without a battery (or where it cannot be read)."""
    supplies = glob.glob("/sys/class/power_supply/*")
    if supplies:
        batteries, mains_online = False, False
        for supply in supplies:
            try:
                kind = Path(supply, "type").read_text().strip()
                if kind == "Battery":
                    batteries = True
                elif kind in ("Mains", "USB") and Path(supply, "online").read_text().strip() == "1":
                    mains_online = True
            except OSError:
                continue
        return (not mains_online) if batteries else None
    try:
        import psutil
    except ImportError:
        return None
    battery = psutil.sensors_battery() if hasattr(psutil, "sensors_battery") else None
    return None if battery is None else not battery.power_plugged
