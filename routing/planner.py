"""The route planner: a pure function from server records to a chain of hops covering every block.

Inputs are plain data: records, smoothed round-trip times, bans (peer -> banned until) and ``now``.
The chain minimises expected time per decoding step: for each hop the round-trip time to the server
plus the compute time of the blocks it runs (from its announced per-block throughput), plus a
penalty for servers that report too little free cache for the session. Shortest path over block
boundaries (a DAG, so one pass in increasing order suffices).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from homeswarm.routing.records import PeerId, ServerRecord, ServerState

DEFAULT_RTT = 0.05  # seconds assumed for a server not yet pinged
SHORT_OF_CACHE_PENALTY = 10.0  # seconds: used only when nothing else covers the blocks


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
        super().__init__(f"no server in the swarm serves block(s) {format_blocks(self.blocks)} of model {model!r}")


def format_blocks(blocks: Iterable[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    ranges: list[list[int]] = []
    for block in sorted(blocks):
        if ranges and block == ranges[-1][1] + 1:
            ranges[-1][1] = block
        else:
            ranges.append([block, block])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


def usable_servers(
    records: Iterable[ServerRecord],
    *,
    banned: Mapping[PeerId, float] | Collection[PeerId] = (),
    now: float = 0.0,
) -> list[ServerRecord]:
    def is_banned(peer: PeerId) -> bool:
        if isinstance(banned, Mapping):
            return banned.get(peer, -math.inf) > now
        return peer in banned

    return [r for r in records if r.state == ServerState.ONLINE and not is_banned(r.peer_id)]


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
    rtts = rtts or {}
    servers = [
        r for r in usable_servers(records, banned=banned, now=now) if r.start < end and r.end > start
    ]
    boundaries = sorted({start, end} | {min(max(r.start, start), end) for r in servers})

    def hop_cost(server: ServerRecord, a: int, b: int) -> float:
        compute = (b - a) / server.throughput if server.throughput > 0 else 1.0 * (b - a)
        penalty = SHORT_OF_CACHE_PENALTY if server.cache_tokens_left < cache_tokens_needed else 0.0
        return rtts.get(server.peer_id, DEFAULT_RTT) + compute + penalty

    # servers covering each boundary position, found by scanning servers once per boundary
    by_start = sorted(servers, key=lambda r: r.start)
    starts = [r.start for r in by_start]
    best: dict[int, tuple[float, int, ServerRecord | None]] = {start: (0.0, -1, None)}
    for p in boundaries:
        if p == end or p not in best:
            continue
        base = best[p][0]
        limit = bisect.bisect_right(starts, p)
        for server in by_start[:limit]:
            if server.end <= p:
                continue
            stop = min(server.end, end)
            # end this hop at the server's end, or earlier where another server could take over
            lo = bisect.bisect_right(boundaries, p)
            hi = bisect.bisect_right(boundaries, stop)
            for q in boundaries[lo:hi]:
                cost = base + hop_cost(server, p, q)
                if q not in best or cost < best[q][0]:
                    best[q] = (cost, p, server)
    if end not in best:
        covered = {b for r in servers for b in range(max(r.start, start), min(r.end, end))}
        missing = set(range(start, end)) - covered
        raise MissingBlocksError(model, missing)
    hops: list[Hop] = []
    q = end
    while q != start:
        _, p, server = best[q]
        assert server is not None
        hops.append(Hop(server, p, q))
        q = p
    return hops[::-1]
