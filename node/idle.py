"""The idle policy of ``--idle-only``: whether this machine's owner is using it, from measurements alone.

A pure function of plain data: :func:`step` takes the previous :class:`IdleState`, one
:class:`Measurement` (taken at ``now`` by :mod:`.idle_probe`) and the thresholds, and returns the next
state. The node serves while ``state.serving``; it does not read a clock or the machine here.

The owner counts as present when the machine runs on battery, when user input came less than
``input_idle`` seconds ago, or when other processes keep more than ``cpu_busy`` of the machine's cores
busy. Input and battery are unambiguous and act at once; a CPU load must last ``busy_after`` seconds
(builds and updates come in short bursts that are not worth a reload). Serving resumes once the owner
has been away for ``idle_after`` seconds. A measurement that is unknown (None) never counts as the
owner being present: a desktop has no battery, a server no input devices we can see.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class IdleThresholds:
    cpu_busy: float = 0.5  # fraction of all cores used by other processes that counts as the owner working
    input_idle: float = 300.0  # seconds without user input before the owner counts as away (0: ignore input)
    busy_after: float = 10.0  # seconds a CPU load must last before the node steps aside
    idle_after: float = 60.0  # seconds the owner must be away before the node serves again
    serve_on_battery: bool = False


@dataclass(frozen=True)
class Measurement:
    now: float
    other_cpu: float | None  # fraction (0..1) of all cores other processes used since the last measurement
    input_idle: float | None  # seconds since the last user input, None where the platform does not tell
    on_battery: bool | None  # None where the machine has no battery (or it cannot be read)


@dataclass(frozen=True)
class IdleState:
    serving: bool
    changing_since: float | None = None  # since when the measurements have said the opposite of ``serving``
    reason: str = ""  # why the owner counts as present (or "" when away), for the logs and the record


def owner_presence(m: Measurement, t: IdleThresholds) -> tuple[str, bool]:
    """(why the owner counts as present, or "" when away; whether that acts at once)."""
    if m.on_battery and not t.serve_on_battery:
        return "the machine runs on battery", True
    if t.input_idle > 0 and m.input_idle is not None and m.input_idle < t.input_idle:
        return f"user input {m.input_idle:.0f} s ago", True
    if m.other_cpu is not None and m.other_cpu > t.cpu_busy:
        return f"other processes use {100 * m.other_cpu:.0f} % of the CPU", False
    return "", False


def initial_state(m: Measurement, t: IdleThresholds) -> IdleState:
    """At start: serve at once if the owner is away now (the node was started to serve)."""
    reason, _ = owner_presence(m, t)
    return IdleState(serving=not reason, reason=reason)


def step(state: IdleState, m: Measurement, t: IdleThresholds) -> IdleState:
    reason, at_once = owner_presence(m, t)
    present = bool(reason)
    if state.serving != present:
        # the measurements agree with what the node does: nothing pending
        return IdleState(state.serving, None, reason)
    since = state.changing_since if state.changing_since is not None else m.now
    delay = (0.0 if at_once else t.busy_after) if state.serving else t.idle_after
    if m.now - since >= delay:
        return IdleState(not state.serving, None, reason)
    return IdleState(state.serving, since, reason)
