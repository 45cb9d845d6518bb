"""How a serving period of a node ends: why (stop, busy, move), what it announces, the grace it gives.

A period ends at the first :class:`PeriodEnd` set on :class:`PeriodEnds`, by the idle watch, the claim
watch or the rebalancer; a stop (a signal) always wins.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass

from homeswarm.routing.records import ServerState


class EndReason(enum.Enum):
    STOP = "stop"
    BUSY = "busy"
    MOVE = "move"


@dataclass(frozen=True)
class PeriodEnd:
    reason: EndReason
    state: ServerState  # announced for the span being left
    grace: float  # seconds open sessions get before they are closed
    refusal: str  # what a session opened meanwhile is told
    destination: tuple[int, int] | None = None  # the next span, for a move
    why: str = ""

    @classmethod
    def stop(cls, grace: float) -> PeriodEnd:
        return cls(EndReason.STOP, ServerState.OFFLINE, grace, "this node is shutting down and takes no new sessions",
                   why="shutting down")

    @classmethod
    def busy(cls, grace: float, why: str) -> PeriodEnd:
        return cls(EndReason.BUSY, ServerState.BUSY, grace,
                   "this node's machine is in use by its owner; it takes no new sessions", why=f"stepping aside ({why})")

    @classmethod
    def move(cls, grace: float, destination: tuple[int, int]) -> PeriodEnd:
        start, end = destination
        return cls(EndReason.MOVE, ServerState.OFFLINE, grace, "this node is moving to other blocks",
                   destination, why=f"moving to blocks {start}:{end}, where the swarm is weaker")


class PeriodEnds:
    """The first reason the current serving period ends; a stop (a signal) always wins."""

    def __init__(self, stop: asyncio.Event, stop_grace: float):
        self.stop_event = stop
        self.stop_grace = stop_grace
        self._end: PeriodEnd | None = None
        self._event = asyncio.Event()

    def set(self, end: PeriodEnd) -> None:
        if self._end is None:
            self._end = end
            self._event.set()

    def reset(self) -> None:
        self._end = None
        self._event.clear()

    @property
    def stopping(self) -> bool:
        return self.stop_event.is_set()

    async def wait(self) -> PeriodEnd:
        waiters = [asyncio.ensure_future(self.stop_event.wait()), asyncio.ensure_future(self._event.wait())]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        if self.stop_event.is_set() or self._end is None:
            return PeriodEnd.stop(self.stop_grace)
        return self._end
