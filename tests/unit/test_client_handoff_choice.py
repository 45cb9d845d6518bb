"""The client's choice between hand-off and relaying, from the route's measured round trips."""

from __future__ import annotations

import pytest

from homeswarm.client.config import ClientConfig
from homeswarm.client.session import use_handoff


@pytest.mark.parametrize(
    ("rtts", "expected"),
    [
        ([0.0004, 0.0005], False),  # loopback: relaying costs less
        ([0.020, 0.030], True),  # across the internet: hand-off saves legs
        ([0.0004, 0.005], True),  # the average decides
        ([0.0004, None], True),  # unknown counts as slow
        ([0.020], False),  # one hop: nothing to hand off to
        ([], False),
    ],
)
def test_handoff_follows_round_trips(rtts, expected):
    assert use_handoff(ClientConfig(handoff_min_rtt=0.001), rtts) is expected


def test_handoff_off_or_forced():
    assert use_handoff(ClientConfig(handoff=False, handoff_min_rtt=0.0), [0.5, 0.5]) is False
    assert use_handoff(ClientConfig(handoff_min_rtt=0.0), [0.0001, 0.0001]) is True
