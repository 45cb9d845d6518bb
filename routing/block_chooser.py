"""Which blocks a joining node should serve: a pure function over the records already announced.

A new node should strengthen the weakest part of the swarm. Coverage of a block is the summed
per-block throughput of the online servers holding it; the node takes the window of ``n`` blocks
whose weakest block is weakest (a gap has coverage 0), ties broken by the smaller total coverage,
then by the lower start, so that identical inputs give identical choices.
"""

from __future__ import annotations

from collections.abc import Iterable

from homeswarm.routing.records import ServerRecord, ServerState


def block_coverage(records: Iterable[ServerRecord], total_blocks: int) -> list[float]:
    coverage = [0.0] * total_blocks
    for record in records:
        if record.state != ServerState.ONLINE:
            continue
        for block in range(max(record.start, 0), min(record.end, total_blocks)):
            coverage[block] += record.throughput
    return coverage


def choose_blocks(records: Iterable[ServerRecord], total_blocks: int, n: int) -> tuple[int, int]:
    """The span [start, start + n) a new node with room for ``n`` blocks should serve."""
    if not 0 < n:
        raise ValueError(f"a node must serve at least one block, got {n}")
    if not 0 < total_blocks:
        raise ValueError(f"the model must have at least one block, got {total_blocks}")
    n = min(n, total_blocks)
    coverage = block_coverage(records, total_blocks)
    best = min(
        range(total_blocks - n + 1),
        key=lambda s: (min(coverage[s : s + n]), sum(coverage[s : s + n]), s),
    )
    return best, best + n
