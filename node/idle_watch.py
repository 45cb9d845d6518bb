"""The idle watch of a node with --idle-only: feeds the pure idle policy (:mod:`.idle`) with the machine's
measurements (:mod:`.idle_probe`) and ends the serving period when the owner comes back."""

from __future__ import annotations

import asyncio
import logging
import pwd
import time
from collections.abc import Callable

from homeswarm.node.config import ConfigError
from homeswarm.node.idle import IdleState, IdleThresholds, initial_state, step
from homeswarm.node.idle_probe import MachineProbe
from homeswarm.node.period import PeriodEnd, PeriodEnds

logger = logging.getLogger("homeswarm.node")


class IdleWatch:
    """Feeds the pure idle policy with measurements every ``interval`` s; ends the period when it turns."""

    def __init__(self, probe: MachineProbe, thresholds: IdleThresholds, interval: float, ends: PeriodEnds,
                 grace: float, clock: Callable[[], float] = time.monotonic):
        self.probe, self.thresholds, self.interval = probe, thresholds, interval
        self.ends, self.grace, self.clock = ends, grace, clock
        self.state = IdleState(serving=True)
        self._changed = asyncio.Event()

    async def start(self) -> None:
        """Take the first state from two measurements (a CPU share needs an interval)."""
        await asyncio.to_thread(self.probe.measure, self.clock())
        await asyncio.sleep(min(self.interval, 1.0))
        self.state = initial_state(await asyncio.to_thread(self.probe.measure, self.clock()), self.thresholds)
        logger.info("idle watch: %s", "the machine is idle" if self.state.serving else f"busy: {self.state.reason}")

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                measurement = await asyncio.to_thread(self.probe.measure, self.clock())
            except Exception as e:  # a probe failing once must not stop the node
                logger.warning("measuring the machine's use failed: %s", e)
                continue
            before = self.state.serving
            self.state = step(self.state, measurement, self.thresholds)
            if self.state.serving == before:
                continue
            self._changed.set()
            if self.state.serving:
                logger.info("the machine is idle again: serving")
            else:
                logger.info("the owner is back: %s", self.state.reason)
                self.ends.set(PeriodEnd.busy(self.grace, self.state.reason))

    async def wait_serving(self, stop: asyncio.Event) -> bool:
        """Wait until the policy says serve (True) or a stop comes (False)."""
        while not self.state.serving and not stop.is_set():
            self._changed.clear()
            waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._changed.wait())]
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()
        return not stop.is_set()


def idle_users(names: tuple[str, ...]) -> frozenset[int] | None:
    if not names:
        return None
    uids = set()
    for name in names:
        if name.isdigit():
            uids.add(int(name))
            continue
        try:
            uids.add(pwd.getpwnam(name).pw_uid)
        except KeyError:
            raise ConfigError(f"--idle-users: no user {name!r} on this machine") from None
    return frozenset(uids)
