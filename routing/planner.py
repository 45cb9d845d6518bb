"""The route planner: a pure function from server records to a chain of hops covering every block.

Inputs are plain data: records, smoothed round-trip times, bans (peer -> banned until) and ``now``.
The chain minimises expected time per decoding step; a hop on server ``s`` over ``k`` blocks costs

    fixed(s) + k * per_block(s)
    fixed(s)     = RTT (measured, DEFAULT_RTT if unknown) + short-of-cache penalty + queue wait
    per_block(s) = 1 / throughput (UNKNOWN_THROUGHPUT_COST when the server announces 0)

Invariants: the hops are contiguous and cover [start, end) exactly; the chain is optimal for this cost.
``plan_exact_route`` plans the same way over the servers that announce unquantized weights only.

Why only block boundaries where some server's span starts or ends (clipped to [start, end)) need be
considered: the cost is linear in where a hop hands over to the next, so a hand-over point can always
slide, without raising the cost, to the start of the next server's span or to the end of this one's.
Between two consecutive boundaries the set of covering servers is fixed, so the dynamic programme
walks the boundaries in order and updates, with NumPy, every server's "hop still open" cost at once:
O(boundaries x servers) vector work, a few milliseconds for 10,000 servers.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from homeswarm.routing.records import PeerId, ServerRecord, ServerState

DEFAULT_RTT = 0.05  # seconds assumed for a server not yet pinged
SHORT_OF_CACHE_PENALTY = 10.0  # seconds: used only when nothing else covers the blocks
UNKNOWN_THROUGHPUT_COST = 1.0  # seconds per block for a server that announces throughput 0


@dataclass(frozen=True)
class Hop:
    server: ServerRecord
    start: int
    end: int

    @property
    def peer_id(self) -> PeerId:
        return self.server.peer_id

    @property
    def address(self) -> str:
        return self.server.address


class MissingBlocksError(RuntimeError):
    """No online, unbanned server covers some blocks."""

    def __init__(self, model: str, blocks: Collection[int]):
        self.model = model
        self.blocks = sorted(blocks)
        super().__init__(
            f"no server in the swarm serves block(s) {format_blocks(self.blocks)} of model {model!r}"
        )


class QuantizedOnlyError(MissingBlocksError):
    """Exact weights were demanded, and some blocks are served only by nodes with quantized weights."""

    def __init__(self, model: str, quantized: Mapping[int, Collection[str]], missing: Collection[int] = ()):
        self.model = model
        self.blocks = sorted({*quantized, *missing})
        self.quantized_blocks = sorted(quantized)
        formats = sorted({f for fs in quantized.values() for f in fs})
        message = (f"block(s) {format_blocks(quantized)} of model {model!r} are served only by quantized nodes "
                   f"({', '.join(formats)}), and exact weights were demanded (exact=True / --exact)")
        if missing:
            message += f"; no server at all serves block(s) {format_blocks(missing)}"
        RuntimeError.__init__(self, message)


def format_blocks(blocks: Iterable[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0:3, 5:6, 7:9': runs of blocks as ``--blocks`` takes them."""
    from homeswarm.protocol.block_range import block_ranges  # here: the protocol package loads torch

    return block_ranges(blocks)


def usable_servers(
    records: Iterable[ServerRecord],
    *,
    banned: Mapping[PeerId, float] | Collection[PeerId] = (),
    now: float = 0.0,
) -> list[ServerRecord]:
    """Online servers not banned at ``now`` (a mapping bans a peer until a time; a collection, for good)."""
    online = ServerState.ONLINE
    if not banned:
        return [r for r in records if r.state == online]
    if isinstance(banned, Mapping):
        until = banned
        return [r for r in records if r.state == online and until.get(r.peer_id, -math.inf) <= now]
    return [r for r in records if r.state == online and r.peer_id not in banned]


def per_block_cost(server: ServerRecord) -> float:
    """Seconds one block of one decoding step takes on ``server``."""
    return 1.0 / server.throughput if server.throughput > 0 else UNKNOWN_THROUGHPUT_COST


def fixed_cost(server: ServerRecord, rtt: float | None, cache_tokens_needed: int) -> float:
    """Seconds a hop costs on ``server`` however many blocks it runs: round trip, cache and queue penalties."""
    cost = max(0.0, DEFAULT_RTT if rtt is None else rtt)
    if server.cache_tokens_left < cache_tokens_needed:
        cost += SHORT_OF_CACHE_PENALTY
    if server.queue:
        # each queued request ahead of ours runs through the server's whole span first
        cost += server.queue * server.num_blocks * per_block_cost(server)
    return cost


def hop_cost(
    server: ServerRecord, start: int, end: int, *, rtt: float | None = None, cache_tokens_needed: int = 0
) -> float:
    """The planner's cost of running blocks [start, end) on ``server`` (for tests and diagnostics)."""
    return fixed_cost(server, rtt, cache_tokens_needed) + (end - start) * per_block_cost(server)


def route_cost(
    hops: Iterable[Hop], *, rtts: Mapping[PeerId, float] | None = None, cache_tokens_needed: int = 0
) -> float:
    """The planner's cost of a whole chain."""
    rtts = rtts or {}
    return sum(
        hop_cost(h.server, h.start, h.end, rtt=rtts.get(h.peer_id), cache_tokens_needed=cache_tokens_needed)
        for h in hops
    )


def plan_route(
    records: Iterable[ServerRecord],
    start: int,
    end: int,
    *,
    rtts: Mapping[PeerId, float] | None = None,
    banned: Mapping[PeerId, float] | Collection[PeerId] = (),
    now: float = 0.0,
    cache_tokens_needed: int = 0,
    model: str = "",
) -> list[Hop]:
    """The cheapest chain of hops covering blocks [start, end); MissingBlocksError if none exists."""
    if not 0 <= start < end:
        raise ValueError(f"plan_route needs 0 <= start < end, got [{start}, {end})")
    rtts = rtts or {}
    servers = [r for r in usable_servers(records, banned=banned, now=now) if r.start < end and r.end > start]
    if not servers:
        raise MissingBlocksError(model, range(start, end))

    # one pass over the records into columns; the costs are then computed as fixed_cost/per_block_cost do
    columns = np.array(
        [
            (r.start, r.end, r.throughput, r.cache_tokens_left, r.queue, rtts.get(r.peer_id, DEFAULT_RTT))
            for r in servers
        ],
        dtype=np.float64,
    ).T
    lo = np.maximum(columns[0], start).astype(np.int64)
    hi = np.minimum(columns[1], end).astype(np.int64)
    throughput = columns[2]
    with np.errstate(divide="ignore"):
        per_block = np.where(throughput > 0, 1.0 / throughput, UNKNOWN_THROUGHPUT_COST)
    fixed = np.maximum(columns[5], 0.0)
    fixed += np.where(columns[3] < cache_tokens_needed, SHORT_OF_CACHE_PENALTY, 0.0)
    fixed += columns[4] * (columns[1] - columns[0]) * per_block
    boundaries = np.union1d(lo, hi)  # sorted; starts at start and ends at end unless the span has a gap there

    # best[i]: cheapest chain covering [start, boundaries[i]) whose last hop ends there (inf: none);
    # open_cost[s]: cheapest chain whose last hop, on server s and begun at open_from[s], is still open.
    best = np.full(len(boundaries), math.inf)
    best[0] = 0.0 if boundaries[0] == start else math.inf
    came_from = np.full(len(boundaries), -1, dtype=np.int64)  # server of the last hop
    hop_from = np.zeros(len(boundaries), dtype=np.int64)  # where that hop began
    open_cost = np.full(len(servers), math.inf)
    open_from = np.zeros(len(servers), dtype=np.int64)
    for i in range(len(boundaries) - 1):
        a, b = int(boundaries[i]), int(boundaries[i + 1])
        covers = (lo <= a) & (hi >= b)
        # open a new hop at a where that is strictly cheaper than extending one (ties: fewer hops)
        fresh = best[i] + fixed
        take = covers & (fresh < open_cost)
        open_cost = np.where(take, fresh, open_cost)
        open_from = np.where(take, a, open_from)
        open_cost = np.where(covers, open_cost + (b - a) * per_block, math.inf)
        s = int(np.argmin(open_cost))
        if open_cost[s] < math.inf:
            best[i + 1], came_from[i + 1], hop_from[i + 1] = open_cost[s], s, open_from[s]

    if int(boundaries[-1]) != end or not math.isfinite(best[-1]):
        covered = np.zeros(end - start, dtype=bool)
        for a, b in zip(lo.tolist(), hi.tolist(), strict=True):
            covered[a - start : b - start] = True
        raise MissingBlocksError(model, (start + int(k) for k in np.flatnonzero(~covered)))

    index = {int(p): i for i, p in enumerate(boundaries)}
    hops: list[Hop] = []
    q = end
    while q != start:
        i = index[q]
        p = int(hop_from[i])
        hops.append(Hop(servers[int(came_from[i])], p, q))
        q = p
    return hops[::-1]


def plan_exact_route(
    records: Iterable[ServerRecord],
    start: int,
    end: int,
    *,
    rtts: Mapping[PeerId, float] | None = None,
    banned: Mapping[PeerId, float] | Collection[PeerId] = (),
    now: float = 0.0,
    cache_tokens_needed: int = 0,
    model: str = "",
) -> list[Hop]:
    """:func:`plan_route` through servers with unquantized weights only (``record.quant == "none"``).

    Raises QuantizedOnlyError, naming the blocks, when quantized servers would cover blocks that no
    unquantized one does (a plain MissingBlocksError when nobody serves them at all).
    """
    records = list(records)
    try:
        return plan_route([r for r in records if r.exact], start, end, rtts=rtts, banned=banned, now=now,
                          cache_tokens_needed=cache_tokens_needed, model=model)
    except MissingBlocksError as e:
        quantized: dict[int, set[str]] = {}
        for record in usable_servers(records, banned=banned, now=now):
            if not record.exact:
                for block in range(max(record.start, start), min(record.end, end)):
                    quantized.setdefault(block, set()).add(record.quant)
        covered = {b: quantized[b] for b in e.blocks if b in quantized}
        if not covered:
            raise
        raise QuantizedOnlyError(model, covered, [b for b in e.blocks if b not in quantized]) from None
