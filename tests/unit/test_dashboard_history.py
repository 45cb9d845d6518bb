"""The history database: samples in, downsampled with age, dropped after 30 days (time passed in)."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from homeswarm.dashboard.history import DAY, RETENTION, History, Sample, sample_of
from homeswarm.dashboard.state import Probe, build_state
from homeswarm.routing.records import PeerId, ServerRecord, ServerState

T0 = 1_800_000_000.0  # a multiple of 3600: buckets line up with it
MINUTE = 60.0


def sample(t: float, online: float, *, span: float = MINUTE, healthy: float = 1.0, weakest: float = 5.0) -> Sample:
    return Sample(time=t, span=span, servers=online, online=online, covered_blocks=4, num_blocks=4, healthy=healthy,
                  weakest_throughput=weakest)


@pytest.fixture
def history(tmp_path):
    h = History(tmp_path / "sub" / "h.sqlite3")  # the folder is created
    yield h
    h.close()


def fill(history: History, start: float, end: float, value: Callable[[float], float], model: str = "m") -> None:
    t = start
    while t < end:
        history.add({model: sample(t, value(t))})
        t += MINUTE


def test_samples_come_back_in_order_and_per_model(history):
    history.add({"m": sample(T0 + 60, 3), "other": sample(T0 + 60, 9)})
    history.add({"m": sample(T0, 2)})
    assert [s.online for s in history.query("m", 0)] == [2, 3]
    assert [s.online for s in history.query("m", T0 + 1)] == [3]
    assert history.query("m", 0, until=T0 + 60) == [sample(T0, 2)]
    assert history.knows("other") and not history.knows("nobody")


def test_recent_samples_stay_as_taken(history):
    fill(history, T0, T0 + 3600, lambda t: 3)
    history.compact(now=T0 + 3600)
    assert len(history.query("m", 0)) == 60


def test_older_than_a_day_merge_into_ten_minute_rows_with_span_weighted_means(history):
    # two hours of samples: online 2 in the first 5 minutes of every 10, 4 in the other 5
    fill(history, T0, T0 + 7200, lambda t: 2 if (t - T0) % 600 < 300 else 4)
    history.compact(now=T0 + 7200 + DAY)
    rows = history.query("m", 0)
    assert len(rows) == 12
    assert all(r.span == 600 and r.online == 3 and r.time % 600 == 0 for r in rows)
    # and the range they stand for: no moment had 3 servers
    assert all((r.online_low, r.online_high, r.weakest_low, r.weakest_high) == (2, 4, 5, 5) for r in rows)
    # compacting again changes nothing: every bucket was merged once, whole
    history.compact(now=T0 + 7200 + DAY + 1)
    assert history.query("m", 0) == rows
    # merged again into hours, the ranges of the merged rows carry over
    history.compact(now=T0 + 7200 + 8 * DAY)
    hours = history.query("m", 0)
    assert len(hours) == 2 and all((r.online, r.online_low, r.online_high) == (3, 2, 4) for r in hours)


def test_only_whole_buckets_are_merged(history):
    fill(history, T0, T0 + 1200, lambda t: 1)
    # the cut-off falls inside the second 10-minute bucket: it stays as taken until all of it is old
    history.compact(now=T0 + 900 + DAY)
    rows = history.query("m", 0)
    assert [r.span for r in rows] == [600] + [MINUTE] * 10


def test_older_than_a_week_merge_into_hours_and_past_30_days_go(history):
    fill(history, T0, T0 + 2 * 3600, lambda t: 2 if t < T0 + 3600 else 6)
    history.compact(now=T0 + 2 * 3600 + DAY)  # first into 10-minute rows
    history.compact(now=T0 + 2 * 3600 + 7 * DAY)  # then into hours
    rows = history.query("m", 0)
    assert [(r.span, r.online, r.time) for r in rows] == [(3600, 2, T0), (3600, 6, T0 + 3600)]
    history.compact(now=T0 + 1 + RETENTION)
    assert [r.time for r in history.query("m", 0)] == [T0 + 3600]
    history.compact(now=T0 + 3600 + 1 + RETENTION)
    assert history.query("m", 0) == []


def test_health_merges_into_the_fraction_of_time_healthy(history):
    fill(history, T0, T0 + 600, lambda t: 1)
    history.add({"m": sample(T0, 1, healthy=0.0)})  # one broken minute of eleven
    history.compact(now=T0 + 600 + DAY)
    (row,) = history.query("m", 0)
    assert math.isclose(row.healthy, 10 / 11) and row.span == 11 * MINUTE


def test_sample_of_a_model_view():
    record = ServerRecord(peer_id=PeerId("a"), address="h:1", model="m", start=0, end=2, state=ServerState.ONLINE,
                          protocol_version=1, dtype="float32", throughput=7.0, cache_tokens_left=1)
    state = build_state({"m": 3}, {"m": [record]}, {PeerId("a"): Probe(reachable=True)}, now=T0)
    s = sample_of(state.models[0], T0, 60.0)
    assert s == Sample(time=T0, span=60.0, servers=1, online=1, covered_blocks=2, num_blocks=3, healthy=0.0,
                       weakest_throughput=0.0)


def test_a_database_from_before_the_ranges_opens_and_merges(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript("""CREATE TABLE samples (model TEXT NOT NULL, level INTEGER NOT NULL, time REAL NOT NULL,
            span REAL NOT NULL, servers REAL NOT NULL, online REAL NOT NULL, covered_blocks REAL NOT NULL,
            num_blocks INTEGER NOT NULL, healthy REAL NOT NULL, weakest_throughput REAL NOT NULL);""")
        db.execute("INSERT INTO samples VALUES ('m', 0, ?, 60, 3, 3, 4, 4, 1, 5)", (T0,))
    db.close()
    history = History(path)
    try:
        history.add({"m": sample(T0 + 60, 2)})
        history.compact(now=T0 + 600 + DAY)
        (row,) = history.query("m", 0)
        assert (row.online, row.online_low, row.online_high) == (2.5, 2, 3)
    finally:
        history.close()


def test_in_memory_database():
    history = History(":memory:")
    history.add({"m": sample(T0, 1)})
    assert len(history.query("m", 0)) == 1
    history.close()
