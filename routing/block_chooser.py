"""Which blocks a node should serve, and whether it should move: pure functions over announced records.

A node should strengthen the weakest part of the swarm. Coverage of a block is the summed per-block
throughput of the servers holding it: online ones, and joining ones (still loading), so that nodes
starting together do not all pick the same span; a joining node that announces no throughput yet counts
as a typical one (the median of the known). Busy and offline nodes serve nothing and count for nothing.

Choice: the window of ``n`` blocks whose weakest block is weakest (a gap has coverage 0), ties broken by
the smaller total coverage, then by the lower start, so that identical inputs give identical choices.

Claims (:func:`recheck_claim`): nodes that start in the same moment choose before they see each other's
"joining" records, so each re-checks its claim once the others' have arrived; of two overlapping claims,
an online one outranks a joining one, then the smaller peer id wins, and only the outranked node gives way.

Rebalancing (:func:`plan_move`) uses that same choice for a serving node, with itself taken out, and
moves only when it is worth a reload. Compare the block coverages before and after the move, each sorted
from the weakest up: at the first one that differs, coverage must have risen (so none of the weaker ones
fell), and that block must have been clearly weak: more than ``imbalance`` below the average coverage.
Every accepted move thus strictly raises the sorted vector (lexicographically), so a swarm of nodes
following the rule cannot cycle; and a swarm whose blocks are all within ``imbalance`` of the average,
however it wobbles inside that band, moves nobody.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence

import numpy as np

from homeswarm.routing.records import PeerId, ServerRecord, ServerState

# nodes move only while some block's coverage is 20 % below the average: a reload costs a node minutes, and
# self-tests wobble by several per cent
DEFAULT_IMBALANCE = 0.2
_COUNTED = (ServerState.ONLINE, ServerState.JOINING)
_UNKNOWN_THROUGHPUT = 1.0  # what a joining node counts for when nobody announces a throughput yet


def _counted_throughputs(records: Sequence[ServerRecord]) -> list[float]:
    known = [r.throughput for r in records if r.state in _COUNTED and r.throughput > 0]
    typical = statistics.median(known) if known else _UNKNOWN_THROUGHPUT
    return [
        (r.throughput if r.throughput > 0 or r.state == ServerState.ONLINE else typical)
        if r.state in _COUNTED else 0.0
        for r in records
    ]


def _coverage(records: Sequence[ServerRecord], throughputs: Sequence[float], total_blocks: int) -> np.ndarray:
    """Per block, the summed ``throughputs`` of the ``records`` holding it (a difference array: O(records))."""
    delta = np.zeros(total_blocks + 1)
    if records:
        starts = np.clip([r.start for r in records], 0, total_blocks)
        ends = np.clip([r.end for r in records], 0, total_blocks)
        weights = np.where(starts < ends, np.asarray(throughputs, dtype=float), 0.0)
        np.add.at(delta, starts, weights)
        np.add.at(delta, ends, -weights)
    return np.cumsum(delta[:-1])


def block_coverage(records: Iterable[ServerRecord], total_blocks: int) -> list[float]:
    """Per block, the summed throughput of the online and joining servers holding it."""
    records = list(records)
    return _coverage(records, _counted_throughputs(records), total_blocks).tolist()


def _best_window(coverage: np.ndarray, n: int) -> int:
    """The start of the window of ``n`` blocks with the weakest block weakest, then the least total, then
    the lowest start."""
    windows = np.lib.stride_tricks.sliding_window_view(coverage, n)
    weakest, totals = windows.min(axis=1), windows.sum(axis=1)
    order = np.lexsort((np.arange(len(weakest)), totals, weakest))  # the last key sorts first
    return int(order[0])


def choose_blocks(records: Iterable[ServerRecord], total_blocks: int, n: int) -> tuple[int, int]:
    """The span [start, start + n) a new node with room for ``n`` blocks should serve."""
    if not 0 < n:
        raise ValueError(f"a node must serve at least one block, got {n}")
    if not 0 < total_blocks:
        raise ValueError(f"the model must have at least one block, got {total_blocks}")
    records = list(records)
    return _choose(_coverage(records, _counted_throughputs(records), total_blocks), n)


def _choose(coverage: np.ndarray, n: int) -> tuple[int, int]:
    n = min(n, len(coverage))
    best = _best_window(coverage, n)
    return best, best + n


def worth_moving(after: Sequence[float], before: Sequence[float], imbalance: float) -> bool:
    """Whether coverage ``after`` a move beats ``before`` by the rule in the module docstring."""
    a, b = np.sort(np.asarray(after, dtype=float)), np.sort(np.asarray(before, dtype=float))
    noise = 1e-9 * max(float(a.max(initial=0.0)), float(b.max(initial=0.0)), 1e-12)  # sums in another order
    rose, fell = a > b + noise, a < b - noise
    if not rose.any():
        return False
    first = int(np.argmax(rose))
    if fell[:first].any():
        return False  # a weaker block got weaker still
    # the block lifted was clearly weak (a gap always is)
    return bool(b[first] <= noise or b[first] < (1 - imbalance) * b.mean() - noise)


def plan_move(
    records: Sequence[ServerRecord], total_blocks: int, me: PeerId, *, imbalance: float = DEFAULT_IMBALANCE
) -> tuple[int, int] | None:
    """Where the online node ``me`` should move its span to, or None where it should stay.

    The destination is what :func:`choose_blocks` picks with ``me`` taken out of the swarm, for the same
    number of blocks; the move must make the swarm clearly better (see the module docstring)."""
    mine = [r for r in records if r.peer_id == me]
    if len(mine) != 1 or mine[0].state != ServerState.ONLINE:
        return None  # only a serving node weighs a move; a record of ours we do not find is no basis
    current = mine[0]
    others = [r for r in records if r.peer_id != me]
    others_coverage = _coverage(others, _counted_throughputs(others), total_blocks)
    start, end = _choose(others_coverage, current.num_blocks)  # what choose_blocks(others, ...) picks
    if (start, end) == (current.start, current.end):
        return None
    before, after = others_coverage.copy(), others_coverage.copy()
    before[current.start : current.end] += current.throughput
    after[start:end] += current.throughput
    return (start, end) if worth_moving(after, before, imbalance) else None


_CLAIM_RANK = {ServerState.ONLINE: 0, ServerState.JOINING: 1}  # who keeps a span two nodes claim


def recheck_claim(
    records: Sequence[ServerRecord], total_blocks: int, mine: ServerRecord, *, imbalance: float = DEFAULT_IMBALANCE
) -> tuple[int, int] | None:
    """Where a node that has just claimed a span (``mine``: announced "joining" there, or online there
    since moments ago) should go instead, or None where it keeps the span.

    Nodes that start in the same moment read the swarm before seeing each other's claims and may all pick
    the same span; so each one, after announcing its claim, reads again and calls this. Overlapping claims
    are ranked, online before joining, then by peer id (the smaller first), and only the lower-ranked node
    of a collision gives way: two colliding nodes never both move, and nodes that re-check until their
    claims stop colliding end up as if they had joined one after another in that order. The node goes
    where :func:`choose_blocks` sends it with itself taken out, and only if that is elsewhere (a node
    that chose to serve beside an online one, there where the swarm is weakest, stays). A joining node has
    loaded nothing yet and just goes there; an online one moves only if :func:`plan_move` finds the move
    worth a reload (a gap always is)."""
    rank = _CLAIM_RANK.get(mine.state)
    if rank is None:
        return None
    others = [r for r in records if r.peer_id != mine.peer_id]
    collided = any(
        r.state in _CLAIM_RANK and (_CLAIM_RANK[r.state], r.peer_id) < (rank, mine.peer_id)
        and r.start < mine.end and mine.start < r.end
        for r in others
    )
    if not collided:
        return None
    if mine.state == ServerState.ONLINE:
        return plan_move([*others, mine], total_blocks, mine.peer_id, imbalance=imbalance)
    choice = choose_blocks(others, total_blocks, mine.num_blocks)
    return None if choice == (mine.start, mine.end) else choice
