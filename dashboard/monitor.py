"""The background refresher: reads the DHT and probes every node every few seconds, samples history.

Requests never wait on it: they read ``Monitor.state`` and ``Monitor.status``, which are replaced
whole (never mutated) when a refresh ends. A refresh that fails (a DHT call times out, no DHT peer
answers any more) leaves the last good state in place and says why in ``status``; the page shows that
state's age. DHT calls block, so they run on a worker thread, each bounded by the DHT's call timeout;
probes run on the event loop. A history sample is written only from a fresh state (the last
refresh succeeded, a few refresh intervals ago at most), so an outage leaves a gap in the charts rather than a copy of stale numbers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import replace

from homeswarm.dashboard.history import History, Sample, sample_of
from homeswarm.dashboard.probe import Prober
from homeswarm.dashboard.state import Probe, RefreshStatus, SwarmState, build_state
from homeswarm.routing.dht import SwarmDHT
from homeswarm.routing.records import PeerId, ServerRecord

logger = logging.getLogger(__name__)


class SwarmUnreachable(Exception):
    """The DHT answered nothing: no peer of the swarm is reachable from here."""


def read_swarm(dht: SwarmDHT) -> tuple[dict[str, int], dict[str, list[ServerRecord]], int]:
    """(models, their server records, DHT peers), from the DHT; blocking. Raises SwarmUnreachable."""
    models = dht.list_models()
    lookups = {name: dht.lookup_servers(name, 0, num_blocks) for name, num_blocks in models.items()}
    records = {name: lookup.result() for name, lookup in lookups.items()}
    peers = dht.num_peers()
    if peers == 0:
        # an empty answer from a DHT peer that reaches nobody says nothing about the swarm
        raise SwarmUnreachable("no DHT peer of the swarm answers")
    return models, records, peers


class Monitor:
    def __init__(
        self,
        read: Callable[[], tuple[dict[str, int], dict[str, list[ServerRecord]], int]],
        prober: Prober,
        history: History,
        *,
        refresh_interval: float,
        history_interval: float,
        clock: Callable[[], float] = time.time,
    ):
        """``read``: the blocking DHT read (``read_swarm`` bound to a DHT); the rest as in DashboardConfig."""
        self._read = read
        self.prober = prober
        self.history = history
        self.refresh_interval = refresh_interval
        self.history_interval = history_interval
        self.clock = clock
        self.state = SwarmState(updated=0.0)
        self.status = RefreshStatus()
        self._versions: dict[PeerId, str] = {}  # last software version each peer reported
        self.refreshed = asyncio.Event()  # set once the first refresh attempt has ended

    async def run(self) -> None:
        """Refresh and sample until cancelled."""
        await asyncio.gather(self._refresh_loop(), self._history_loop())

    async def _refresh_loop(self) -> None:
        while True:
            started = time.monotonic()
            await self.refresh()
            await asyncio.sleep(max(0.0, self.refresh_interval - (time.monotonic() - started)))

    async def refresh(self) -> None:
        attempt = self.clock()
        try:
            models, records, peers = await asyncio.to_thread(self._read)
        except Exception as e:  # noqa: BLE001 - any failure of the DHT leaves the last good state shown
            reason = str(e) or type(e).__name__
            if self.status.ok or self.status.last_attempt == 0.0:
                logger.warning("could not read the swarm: %s (showing the state of %s)", reason,
                               "never" if not self.state.updated else f"{attempt - self.state.updated:.0f} s ago")
            self.status = replace(self.status, ok=False, last_attempt=attempt, error=reason, dht_peers=0)
            self.refreshed.set()
            return
        addresses = {r.peer_id: r.address for rs in records.values() for r in rs}
        certs = {r.peer_id: r.tls_cert for rs in records.values() for r in rs}
        probes = await self.prober.probe_all(addresses, certs)
        probes = {peer: self._remember(peer, probe) for peer, probe in probes.items()}
        self._versions = {peer: v for peer, v in self._versions.items() if peer in addresses}
        self.state = build_state(models, records, probes, now=self.clock())
        if not self.status.ok and self.status.last_attempt:
            logger.info("reading the swarm again")
        self.status = RefreshStatus(ok=True, last_attempt=attempt, error=None, dht_peers=peers)
        self.refreshed.set()

    def _remember(self, peer: PeerId, probe: Probe) -> Probe:
        """A probe that failed keeps the version the peer reported last (the page still says what it ran)."""
        if probe.reachable:
            self._versions[peer] = probe.version
            return probe
        return replace(probe, version=self._versions.get(peer, ""))

    async def _history_loop(self) -> None:
        # the first sample as soon as the swarm was read, not one interval later: the charts draw from the start
        await self.refreshed.wait()
        while True:
            await self.sample()
            await asyncio.sleep(self.history_interval)

    async def sample(self) -> None:
        now = self.clock()
        state = self.state
        # a state older than this is not what the swarm is now (a DHT call hangs, the loop stalled)
        if not self.status.ok or now - state.updated > max(self.history_interval, 3 * self.refresh_interval):
            return
        samples = {m.name: sample_of(m, now, self.history_interval) for m in state.models}
        try:
            await asyncio.to_thread(self._write, samples, now)
        except Exception as e:  # noqa: BLE001 - a full disk must not stop the dashboard serving
            logger.warning("could not write the history: %s", e)

    def _write(self, samples: dict[str, Sample], now: float) -> None:
        if samples:
            self.history.add(samples)
        self.history.compact(now)
