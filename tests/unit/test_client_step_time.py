"""When a step is late: the configured time plus what its positions take at the node's announced speed."""

from __future__ import annotations

import pytest

from homeswarm.client.config import ClientConfig
from homeswarm.client.hop import PREFILL_STEP_FRACTION, step_time_limit
from homeswarm.routing.records import PeerId, ServerRecord, ServerState


def record(throughput: float) -> ServerRecord:
    return ServerRecord(PeerId("p"), "127.0.0.1:1", "m", 0, 10, ServerState.ONLINE, 1, "float32", throughput, 1000)


def test_a_decoding_step_gets_about_the_configured_time():
    config = ClientConfig(step_timeout=20)
    assert step_time_limit(config, record(50.0), 10, 1) == pytest.approx(20 + PREFILL_STEP_FRACTION * 10 / 50)


def test_the_limit_grows_with_the_positions_and_blocks_and_shrinks_with_the_speed():
    config = ClientConfig(step_timeout=20)
    short = step_time_limit(config, record(50.0), 10, 1)
    assert step_time_limit(config, record(50.0), 10, 4096) == pytest.approx(20 + PREFILL_STEP_FRACTION * 4096 * 10 / 50)
    assert step_time_limit(config, record(50.0), 20, 4096) > step_time_limit(config, record(50.0), 10, 4096) > short
    assert step_time_limit(config, record(500.0), 10, 4096) < step_time_limit(config, record(50.0), 10, 4096)


def test_a_node_announcing_no_speed_is_given_a_floor_not_forever():
    config = ClientConfig(step_timeout=20)
    limit = step_time_limit(config, record(0.0), 10, 4096)
    assert limit == step_time_limit(config, None, 10, 4096) == pytest.approx(20 + PREFILL_STEP_FRACTION * 4096 * 10)
