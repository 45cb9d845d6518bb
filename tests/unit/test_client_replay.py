"""The cache a hop's recorded steps leave, rollbacks applied, and its replay in few messages."""

from __future__ import annotations

import pytest
import torch

from homeswarm.client.replay import cache_length, cache_segments, replay_steps


def steps_of(lengths: list[int], keeps: dict[int, int] | None = None, hidden: int = 4):
    """Recorded steps 1..n of the given token counts; position p of step s holds the value 100 * s + p."""
    keeps = keeps or {}
    out = []
    for i, n in enumerate(lengths, start=1):
        x = (100 * i + torch.arange(n, dtype=torch.float32))[None, :, None].expand(1, n, hidden).clone()
        out.append((i, x, keeps.get(i)))
    return out


def values(messages) -> list[float]:
    return [v for _, x in messages for v in x[0, :, 0].tolist()]


def test_without_rollbacks_the_cache_is_every_input_and_one_message_replays_it():
    steps = steps_of([5, 1, 1, 1])
    assert cache_length(steps) == 8
    messages = replay_steps(steps)
    assert [sid for sid, _ in messages] == [4]
    assert values(messages) == [100, 101, 102, 103, 104, 200, 300, 400]


def test_rollbacks_drop_what_they_dropped_in_the_session():
    # speculative decoding: step 2 sends 3 drafts, step 3 keeps 6 (prompt 5 + one accepted), step 4 keeps all
    steps = steps_of([5, 3, 2, 1], keeps={3: 6, 4: 8})
    assert [sid for sid, _ in cache_segments(steps)] == [1, 2, 3, 4]
    messages = replay_steps(steps)
    assert values(messages) == [100, 101, 102, 103, 104, 200, 300, 301, 400]
    assert cache_length(steps) == 9


def test_a_rollback_to_zero_and_emptied_segments_leave_nothing_behind():
    steps = steps_of([3, 2, 2], keeps={2: 0, 3: 1})
    assert [sid for sid, _ in cache_segments(steps)] == [2, 3]
    assert values(replay_steps(steps)) == [200, 300, 301]


def test_messages_hold_whole_steps_within_the_byte_limit_with_increasing_ids():
    steps = steps_of([4, 1, 1, 1, 1, 6, 1])  # 4 bytes x 4 wide per position
    messages = replay_steps(steps, max_bytes=16 * 5)  # five positions per message
    assert [sid for sid, _ in messages] == [2, 5, 6, 7]  # step 6 (6 positions) goes alone
    assert [x.shape[1] for _, x in messages] == [5, 3, 6, 1]
    assert values(messages) == values(replay_steps(steps))


def test_a_rollback_past_the_cache_is_an_error():
    with pytest.raises(ValueError, match="keeps 9 positions"):
        cache_segments(steps_of([3, 1], keeps={2: 9}))
