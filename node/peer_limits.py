"""Per-peer limits of one node: open sessions and request rate, per remote host.

A peer is the remote host of a gRPC call (``context.peer()`` without its port): one machine opening
many connections still counts once. Requests are metered with a token bucket (``rate`` per second,
bursts up to ``burst``); sessions are counted while open. Beyond either limit the service answers
RESOURCE_EXHAUSTED. Pure: no clock is read here, callers pass ``now``. The table of hosts is bounded:
hosts whose bucket is full and who hold no session are forgotten first.
"""

from __future__ import annotations

from dataclasses import dataclass

_MAX_HOSTS = 4096  # hosts remembered at once; an idle one is forgotten to make room


def peer_host(peer: str) -> str:
    """The host of a gRPC peer string ("ipv4:1.2.3.4:5678", "ipv6:[::1]:5678", "unix:..."), port dropped."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6") and ":" in rest:
        return rest.rsplit(":", 1)[0]
    return peer


@dataclass
class _Host:
    tokens: float
    updated: float
    sessions: int = 0


class PeerLimits:
    def __init__(self, *, max_sessions: int, rate: float, burst: float | None = None):
        """``max_sessions`` open sessions and ``rate`` requests per second per host (0: unlimited)."""
        self.max_sessions = max_sessions
        self.rate = rate
        self.burst = burst if burst is not None else 2 * rate
        self._hosts: dict[str, _Host] = {}

    def _host(self, host: str, now: float) -> _Host:
        entry = self._hosts.get(host)
        if entry is None:
            if len(self._hosts) >= _MAX_HOSTS:
                self._forget_idle(now)
            entry = self._hosts[host] = _Host(tokens=self.burst, updated=now)
        elif self.rate > 0:
            entry.tokens = min(self.burst, entry.tokens + (now - entry.updated) * self.rate)
            entry.updated = now
        return entry

    def _forget_idle(self, now: float) -> None:
        for host in list(self._hosts):
            entry = self._hosts[host]
            refilled = entry.tokens + (now - entry.updated) * self.rate
            if entry.sessions == 0 and refilled >= self.burst:
                del self._hosts[host]

    def request(self, host: str, now: float) -> str | None:
        """Count one request of ``host``; why it is refused, or None."""
        if self.rate <= 0:
            return None
        entry = self._host(host, now)
        if entry.tokens < 1:
            return f"too many requests from {host}: at most {self.rate:g} per second (bursts of {self.burst:g})"
        entry.tokens -= 1
        return None

    def open_session(self, host: str, now: float) -> str | None:
        """Count a session ``host`` opens; why it is refused, or None (then ``close_session`` later)."""
        entry = self._host(host, now)
        if self.max_sessions > 0 and entry.sessions >= self.max_sessions:
            return f"{host} already has {entry.sessions} open sessions here, the most one peer may hold"
        entry.sessions += 1
        return None

    def close_session(self, host: str) -> None:
        entry = self._hosts.get(host)
        if entry is not None and entry.sessions > 0:
            entry.sessions -= 1

    def sessions_of(self, host: str) -> int:
        entry = self._hosts.get(host)
        return entry.sessions if entry is not None else 0
