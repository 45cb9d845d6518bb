"""Inference sessions of one node and the KV memory budget they share.

Invariants: the sum of ``reserved_bytes`` over open sessions never exceeds ``budget_bytes``; a
session's cache is reserved in full when it opens (so a step can never run out of memory), and its
bytes return to the budget when it closes. Refusals raise ``SessionRefused`` with a reason the
service maps to a gRPC status. No clock is read here: callers pass ``now``.

A mirror session (a client's second copy of another node's session, for checks and failover without replay)
counts against the budget like any other, and is refused first: it is opened only while, after it, at least
``mirror_reserve`` of the budget stays free for primaries.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NewType

SessionId = NewType("SessionId", str)


MIRROR_RESERVE = 0.25  # share of the KV budget that mirror sessions leave to primary sessions


class Refusal(enum.Enum):
    NO_MEMORY = "resource_exhausted"
    DRAINING = "unavailable"


class SessionRefused(Exception):
    def __init__(self, reason: Refusal, message: str):
        self.reason = reason
        super().__init__(message)


@dataclass
class Session:
    session_id: SessionId
    start: int
    end: int
    batch_size: int
    max_length: int
    reserved_bytes: int
    cache: Any
    opened_at: float
    last_active: float
    steps: int = 0
    mirror: bool = False


class SessionManager:
    def __init__(self, budget_bytes: int, bytes_per_token: int, *, mirror_reserve: float = MIRROR_RESERVE):
        """``bytes_per_token``: cache bytes of one token of batch size 1 over the node's whole span;
        ``mirror_reserve``: the share of the budget a mirror session must leave free."""
        if not 0 <= mirror_reserve <= 1:
            raise ValueError(f"mirror_reserve must be in [0, 1], got {mirror_reserve}")
        self.mirror_reserve = mirror_reserve
        self.budget_bytes = budget_bytes
        self.bytes_per_token = bytes_per_token
        self.sessions: dict[SessionId, Session] = {}
        self.draining = False
        self.drain_message = "this node is shutting down and takes no new sessions"  # why, while draining

    @property
    def used_bytes(self) -> int:
        return sum(s.reserved_bytes for s in self.sessions.values())

    @property
    def free_tokens(self) -> int:
        return max(0, self.budget_bytes - self.used_bytes) // max(1, self.bytes_per_token)

    def open(
        self,
        *,
        start: int,
        end: int,
        batch_size: int,
        max_length: int,
        reserved_bytes: int,
        make_cache: Callable[[], Any],
        now: float,
        mirror: bool = False,
    ) -> Session:
        if self.draining:
            raise SessionRefused(Refusal.DRAINING, self.drain_message)
        free = self.budget_bytes - self.used_bytes
        reserve = int(self.mirror_reserve * self.budget_bytes)
        if mirror and reserved_bytes <= free and free - reserved_bytes < reserve:
            raise SessionRefused(
                Refusal.NO_MEMORY,
                f"not taking mirror sessions: one of {reserved_bytes} bytes would leave {free - reserved_bytes} of "
                f"{self.budget_bytes} bytes of KV cache free, under the {reserve} kept for primary sessions",
            )
        if reserved_bytes > free:
            raise SessionRefused(
                Refusal.NO_MEMORY,
                f"not enough KV cache memory: the session needs {reserved_bytes} bytes "
                f"(batch {batch_size} x {max_length} tokens x blocks {start}:{end}), "
                f"{max(free, 0)} of {self.budget_bytes} are free",
            )
        session = Session(
            session_id=SessionId(uuid.uuid4().hex),
            start=start,
            end=end,
            batch_size=batch_size,
            max_length=max_length,
            reserved_bytes=reserved_bytes,
            cache=make_cache(),
            opened_at=now,
            last_active=now,
            mirror=mirror,
        )
        self.sessions[session.session_id] = session
        return session

    def close(self, session_id: SessionId) -> None:
        self.sessions.pop(session_id, None)

    def __len__(self) -> int:
        return len(self.sessions)
