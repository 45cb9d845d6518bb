"""choose_blocks: a joining node strengthens the weakest part of the swarm."""

from __future__ import annotations

import random

import pytest

from homeswarm.routing.block_chooser import block_coverage, choose_blocks
from homeswarm.routing.records import PeerId, ServerRecord, ServerState


def rec(peer: str, start: int, end: int, throughput: float = 10.0, state: ServerState = ServerState.ONLINE):
    return ServerRecord(
        peer_id=PeerId(peer), address="h:1", model="m", start=start, end=end, state=state,
        protocol_version=1, dtype="float32", throughput=throughput, cache_tokens_left=0,
    )  # fmt: skip


def test_empty_swarm_starts_at_zero():
    assert choose_blocks([], 12, 4) == (0, 4)


def test_fills_a_gap_first():
    records = [rec("a", 0, 4), rec("b", 7, 12)]
    assert choose_blocks(records, 12, 3) == (4, 7)


def test_window_covering_a_gap_even_when_wider_than_it():
    # gap at block 5 only; any window of 4 containing 5 has min 0; the lowest total wins
    records = [rec("a", 0, 5, throughput=100.0), rec("b", 6, 12, throughput=1.0)]
    assert choose_blocks(records, 12, 4) == (5, 9)


def test_picks_the_weakest_window():
    records = [rec("strong", 0, 6, 100.0), rec("weak", 6, 12, 5.0), rec("mid", 0, 12, 10.0)]
    # coverage: 110 on 0..5, 15 on 6..11
    assert block_coverage(records, 12) == [110.0] * 6 + [15.0] * 6
    assert choose_blocks(records, 12, 3) == (6, 9)


def test_ties_broken_by_total_then_start():
    records = [rec("a", 0, 10, 10.0), rec("b", 2, 4, 1.0)]
    # min is 10 for windows avoiding 2..3; among those the lowest start
    assert choose_blocks(records, 10, 2) == (0, 2)
    records = [rec("a", 0, 10, 10.0), rec("b", 0, 2, 1.0)]
    assert choose_blocks(records, 10, 2) == (2, 4)


def test_counts_joining_servers_and_ignores_offline_and_busy_ones():
    records = [
        rec("a", 0, 4, state=ServerState.JOINING),  # loading: it will serve 0..3 soon
        rec("b", 4, 8, throughput=5.0),
        rec("c", 0, 4, state=ServerState.OFFLINE),
        rec("d", 4, 8, state=ServerState.BUSY),
    ]
    assert block_coverage(records, 8) == [10.0] * 4 + [5.0] * 4
    assert choose_blocks(records, 8, 4) == (4, 8)


def test_n_larger_than_total_takes_everything():
    assert choose_blocks([rec("a", 0, 3)], 6, 100) == (0, 6)


def test_records_beyond_the_model_are_clipped():
    assert block_coverage([rec("a", 4, 20)], 6) == [0.0] * 4 + [10.0] * 2


def test_deterministic_regardless_of_order():
    rng = random.Random(3)
    records = []
    for i in range(60):
        s = rng.randint(0, 30)
        records.append(rec(f"p{i}", s, s + rng.randint(1, 8), rng.choice([1.0, 2.0, 5.0])))
    first = choose_blocks(records, 40, 6)
    for _ in range(5):
        rng.shuffle(records)
        assert choose_blocks(records, 40, 6) == first


@pytest.mark.parametrize(("total", "n"), [(10, 0), (10, -1), (0, 3)])
def test_rejects_bad_sizes(total, n):
    with pytest.raises(ValueError):
        choose_blocks([], total, n)
