"""Route management: server records from the DHT, measured round-trip times, bans; plans via routing.

The planning itself is the pure ``homeswarm.routing.planner.plan_route``; this class only gathers
its inputs (with ``ClientConfig.exact``, ``plan_exact_route``: nodes with unquantized weights only).
With the checkpoint's block digests (``weights``), online records whose announced weights differ from the
checkpoint's for their span are refused (another fine-tune under the same name), with one log line per node.
A client whose folder lacks a span's blocks (a client needs only the head's shards) cannot check that
span against its own files: it says so once, and refuses instead the nodes of the span whose digest
differs from the one a strict majority of the span's online nodes announce (``agreed_digests``; no
majority: all kept, with a warning). That catches a stray node, not a swarm that runs more nodes than
the honest ones.
Round-trip times are smoothed (exponential moving average). A failed node is banned for
``ban_seconds``, doubling with each further failure up to ``max_ban_seconds``. Sessions in several
threads (the HTTP API's concurrent requests) share one manager: planning, bans and round trips are
serialized by a lock, which also keeps the DHT's request pipe to one writer at a time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable

from homeswarm.client.config import ClientConfig
from homeswarm.client.transport import ChannelPool, HopFailed, ping
from homeswarm.model.digest import span_digest
from homeswarm.routing.adapter_routes import plan_for_adapter
from homeswarm.routing.dht import ServersLookup, SwarmDHT
from homeswarm.routing.planner import Hop, MissingBlocksError, plan_exact_route, plan_route
from homeswarm.routing.records import PeerId, ServerRecord, ServerState

logger = logging.getLogger(__name__)


def agreed_digests(records: Iterable[ServerRecord]) -> dict[tuple[int, int], str]:
    """Span -> the weights digest a strict majority of the online nodes serving exactly that span announce
    (nodes announcing none do not count); spans without such a majority are left out."""
    counts: dict[tuple[int, int], Counter[str]] = {}
    for record in records:
        if record.state == ServerState.ONLINE and record.weights:
            counts.setdefault((record.start, record.end), Counter())[record.weights] += 1
    agreed = {}
    for span, digests in counts.items():
        digest, n = digests.most_common(1)[0]
        if 2 * n > digests.total():
            agreed[span] = digest
    return agreed


class RouteManager:
    def __init__(
        self,
        dht: SwarmDHT,
        pool: ChannelPool,
        model: str,
        num_blocks: int,
        config: ClientConfig,
        clock: Callable[[], float] = time.monotonic,
        weights: dict[int, str] | None = None,
    ):
        """``weights``: block index -> digest of the checkpoint's tensors (``model.digest``); None: no check."""
        self.dht = dht
        self.pool = pool
        self.model = model
        self.num_blocks = num_blocks
        self.config = config
        self.clock = clock
        self.rtts: dict[PeerId, float] = {}
        self.bans: dict[PeerId, float] = {}
        self.failures: dict[PeerId, int] = {}
        self._records: list[ServerRecord] = []
        self._records_time = -float("inf")
        self._lookup: ServersLookup | None = None  # a background re-read in flight
        self._lookup_started = -float("inf")
        self._lock = threading.RLock()
        self.weights = weights or {}
        self.check_weights = weights is not None
        self.refused: dict[PeerId, str] = {}  # nodes refused for their weights -> the digest they announced
        self._disputed: set[tuple[int, int]] = set()  # spans whose nodes disagree without a majority (warned)
        if self.check_weights and len(self.weights) < num_blocks:
            held = f"the tensors of {len(self.weights)} of its {num_blocks} blocks" if self.weights else "no block's tensors"
            logger.info("the checkpoint folder holds %s: nodes serving the others cannot be checked against it; they "
                        "are checked against each other (a node is refused when a majority of the nodes serving its "
                        "blocks announce other weights)", held)

    def records(self, *, refresh: bool = False) -> list[ServerRecord]:
        """The server records. Older than ``records_max_age``, they are re-read in the background and
        used meanwhile (a DHT lookup can take many round trips; a node that left meanwhile fails over);
        older than ``records_max_stale``, or with ``refresh``, the caller waits for a fresh read."""
        with self._lock:
            return self._read_records(refresh)

    def _read_records(self, refresh: bool) -> list[ServerRecord]:
        started = self.clock()
        if refresh:
            self._lookup = None  # it started before whatever made the caller ask for fresh records
        elif self._lookup is not None and self._lookup.done():
            lookup, self._lookup = self._lookup, None
            try:
                self._records, self._records_time = self._trusted(lookup.result()), self._lookup_started
            except Exception as e:  # noqa: BLE001 - keep the records held; the next call retries
                logger.warning("re-reading server records failed: %s", e)
        age = started - self._records_time
        if refresh or age > self.config.records_max_stale:
            self._records = self._trusted(self.dht.get_servers(self.model, 0, self.num_blocks))
            self._records_time = started
        elif age > self.config.records_max_age and self._lookup is None:
            self._lookup = self.dht.lookup_servers(self.model, 0, self.num_blocks)
            self._lookup_started = started
        if self.pool is not None:  # the pool dials relayed nodes through their relays
            for record in self._records:
                if isinstance(record, ServerRecord):
                    self.pool.note_relays(record.peer_id, record.relays)
                    self.pool.note_tls(record.peer_id, record.tls_cert)
        return self._records

    def _trusted(self, records: list[ServerRecord]) -> list[ServerRecord]:
        """The records minus online ones whose announced weights are not the checkpoint's (and, when the
        client requires TLS, minus online ones that pin no certificate)."""
        if self.config.require_tls:
            records = [r for r in records if r.tls_cert or r.state != ServerState.ONLINE]
        if not self.check_weights:
            return records
        agreed = agreed_digests(records)
        kept = []
        for record in records:
            expected = span_digest(self.weights, record.start, record.end)
            own = expected is not None
            if not own:  # blocks this folder lacks: the nodes of the span, compared with each other
                expected = agreed.get((record.start, record.end))
                if expected is None:
                    self._warn_disputed(records, record)
                elif not record.weights:
                    expected = None  # announcing nothing is no disagreement
            if record.state != ServerState.ONLINE or expected is None or record.weights == expected:
                kept.append(record)
                continue
            if self.refused.get(record.peer_id) != record.weights:
                self.refused[record.peer_id] = record.weights
                logger.warning("refusing node %s (%s): its weights for blocks %d:%d are not %s (announced digest "
                               "%s)", record.address, record.peer_id[:16], record.start, record.end,
                               "this checkpoint's" if own else "those most nodes of these blocks announce",
                               record.weights[:16] or "none")
        return kept

    def _warn_disputed(self, records: list[ServerRecord], record: ServerRecord) -> None:
        span = (record.start, record.end)
        digests = {r.weights for r in records if (r.start, r.end) == span and r.weights
                   and r.state == ServerState.ONLINE}
        if len(digests) > 1 and span not in self._disputed:
            self._disputed.add(span)
            logger.warning("nodes serving blocks %d:%d announce %d different weights, none by a majority: they are "
                           "all used, unchecked (a checkpoint folder with these blocks' shards would check them)",
                           span[0], span[1], len(digests))

    def ban(self, peer_id: str, seconds: float | None = None) -> None:
        """Avoid the node: for ``seconds``, or (None) for a time that doubles with each failure."""
        with self._lock:
            count = self.failures.get(PeerId(peer_id), 0)
            duration = min(self.config.ban_seconds * 2**count, self.config.max_ban_seconds)
            if seconds is not None:
                duration = max(seconds, self.bans.get(PeerId(peer_id), 0.0) - self.clock())
            self.failures[PeerId(peer_id)] = count + 1
            self.bans[PeerId(peer_id)] = self.clock() + duration
        logger.info("avoiding node %s for %.0f s", peer_id[:16], duration)

    def is_banned(self, peer_id: str) -> bool:
        with self._lock:
            return self.bans.get(PeerId(peer_id), -float("inf")) > self.clock()

    def record_rtt(self, peer_id: str, rtt: float) -> None:
        with self._lock:
            old = self.rtts.get(PeerId(peer_id))
            alpha = self.config.rtt_smoothing
            self.rtts[PeerId(peer_id)] = rtt if old is None else (1 - alpha) * old + alpha * rtt

    def _ping_unknown(self, records: list[ServerRecord]) -> None:
        now = self.clock()
        for record in records:
            if record.peer_id in self.rtts or self.bans.get(record.peer_id, -1.0) > now:
                continue
            try:
                rtt, _info = ping(self.pool, record.peer_id, record.address, self.config.connect_timeout)
            except HopFailed as e:
                logger.info("%s", e)
                self.ban(record.peer_id)
                continue
            self.record_rtt(record.peer_id, rtt)

    def plan(self, start: int, end: int, *, cache_tokens_needed: int = 0, exact: bool | None = None,
             adapter: str | None = None) -> list[Hop]:
        """A chain covering [start, end); MissingBlocksError (naming the blocks) if there is none. ``exact``
        overrides ``config.exact`` (training needs unquantized nodes: quantized ones have no backward);
        ``adapter`` overrides ``config.adapter`` (a LoRA adapter: only nodes announcing it are used)."""
        with self._lock:
            return self._plan(start, end, cache_tokens_needed, self.config.exact if exact is None else exact,
                              self.config.adapter if adapter is None else adapter)

    def _plan(self, start: int, end: int, cache_tokens_needed: int, exact: bool = False,
              adapter: str = "") -> list[Hop]:
        for attempt in range(2):
            records = self.records(refresh=attempt > 0)
            self._ping_unknown([r for r in records if r.start < end and r.end > start])
            plan = plan_exact_route if exact else plan_route  # exact: unquantized nodes only
            try:
                return plan_for_adapter(  # with an adapter: only the nodes that announce it
                    records,
                    start,
                    end,
                    adapter=adapter,
                    plan=plan,
                    rtts=self.rtts,
                    banned=self.bans,
                    now=self.clock(),
                    cache_tokens_needed=cache_tokens_needed,
                    model=self.model,
                )
            except MissingBlocksError:
                if attempt > 0:
                    raise
        raise AssertionError("unreachable")
