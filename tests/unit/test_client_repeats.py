"""A failure that repeats at every step (a hand-off refused after a failover) is logged once per hop, with a count."""

from __future__ import annotations

import logging

from homeswarm.client.repeats import RepeatedFailures

LOGGER = logging.getLogger("test.repeats")
FAILURE = "hand-off to 127.0.0.1:4000 failed: UNAVAILABLE: connection refused; relaying through the client"


def lines(caplog) -> list[str]:  # noqa: ANN001
    return [r.getMessage() for r in caplog.records if r.name == LOGGER.name]


def test_seventy_five_failures_in_half_a_second_are_one_line_then_one_count(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER.name)
    repeats = RepeatedFailures(LOGGER)
    for step in range(75):
        repeats.failed(("pusher", "127.0.0.1:4000"), FAILURE, now=100.0 + step * 0.0066)
    assert lines(caplog) == [FAILURE]
    repeats.cleared(("pusher", "127.0.0.1:4000"), now=100.6)
    assert lines(caplog) == [FAILURE, f"{FAILURE} (again 74 time(s) in 0.6 s, then cleared)"]
    repeats.failed(("pusher", "127.0.0.1:4000"), FAILURE, now=200.0)  # a new episode is logged again
    assert lines(caplog)[-1] == FAILURE


def test_each_hop_is_logged_once_and_a_success_without_failures_logs_nothing(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER.name)
    repeats = RepeatedFailures(LOGGER)
    other = FAILURE.replace("4000", "4001")
    for step in range(10):
        repeats.failed("hop A", FAILURE, now=step * 0.01)
        repeats.failed("hop B", other, now=step * 0.01)
    assert lines(caplog) == [FAILURE, other]
    repeats.cleared("hop C", now=1.0)
    repeats.failed("hop D", "once", now=1.0)
    repeats.cleared("hop D", now=1.1)
    assert lines(caplog) == [FAILURE, other, "once"]


def test_a_failure_that_goes_on_is_counted_every_interval_and_at_the_end(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER.name)
    repeats = RepeatedFailures(LOGGER, every=30.0)
    for step in range(101):  # 100 repeats over 40 s: one count line at 30 s, the rest at the end
        repeats.failed("hop", FAILURE if step < 100 else "another error", now=step * 0.4)
    repeats.flush(now=41.0)
    got = lines(caplog)
    assert got[0] == FAILURE
    assert got[1] == f"{FAILURE} (again 75 time(s) in 30.0 s, still failing)"
    assert got[2] == f"{FAILURE} (again 25 time(s) in 11.0 s, until the end; last: another error)"
    assert len(got) == 3
    repeats.flush(now=42.0)
    assert len(lines(caplog)) == 3
