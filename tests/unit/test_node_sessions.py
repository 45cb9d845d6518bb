"""SessionManager: the KV memory budget shared by a node's sessions, with no clock and no sockets."""

from __future__ import annotations

import pytest

from homeswarm.node.sessions import Refusal, SessionId, SessionManager, SessionRefused


def open_session(m: SessionManager, reserved: int, *, now: float = 0.0, cache: object = None):  # noqa: ANN201
    return m.open(start=0, end=4, batch_size=1, max_length=128, reserved_bytes=reserved,
                  make_cache=lambda: cache, now=now)  # fmt: skip


def test_budget_accounting():
    m = SessionManager(budget_bytes=1000, bytes_per_token=10)
    assert (m.used_bytes, m.free_tokens, len(m)) == (0, 100, 0)
    a = open_session(m, 300)
    assert (m.used_bytes, m.free_tokens, len(m)) == (300, 70, 1)
    b = open_session(m, 250)
    assert (m.used_bytes, m.free_tokens, len(m)) == (550, 45, 2)
    assert a.session_id != b.session_id
    assert m.sessions[a.session_id] is a


def test_session_fields():
    m = SessionManager(budget_bytes=1000, bytes_per_token=10)
    cache = object()
    s = m.open(
        start=2, end=5, batch_size=3, max_length=64, reserved_bytes=100, make_cache=lambda: cache, now=12.5
    )
    assert (s.start, s.end, s.batch_size, s.max_length, s.reserved_bytes) == (2, 5, 3, 64, 100)
    assert s.cache is cache
    assert s.opened_at == 12.5 and s.last_active == 12.5 and s.steps == 0


def test_exactly_full_is_allowed_one_byte_more_is_refused():
    m = SessionManager(budget_bytes=1000, bytes_per_token=10)
    open_session(m, 600)
    open_session(m, 400)
    assert m.used_bytes == 1000 and m.free_tokens == 0
    with pytest.raises(SessionRefused) as e:
        open_session(m, 1)
    assert e.value.reason is Refusal.NO_MEMORY
    assert e.value.reason.value == "resource_exhausted"
    assert "0 of 1000 are free" in str(e.value)
    assert len(m) == 2 and m.used_bytes == 1000


def test_refused_session_reserves_nothing_and_builds_no_cache():
    m = SessionManager(budget_bytes=100, bytes_per_token=1)
    built = []
    with pytest.raises(SessionRefused) as e:
        m.open(start=0, end=1, batch_size=1, max_length=1, reserved_bytes=101,
               make_cache=lambda: built.append(1), now=0.0)  # fmt: skip
    assert e.value.reason is Refusal.NO_MEMORY
    assert "needs 101 bytes" in str(e.value)
    assert built == [] and m.used_bytes == 0 and len(m) == 0


def test_close_returns_the_bytes_to_the_budget():
    m = SessionManager(budget_bytes=1000, bytes_per_token=10)
    a = open_session(m, 700)
    with pytest.raises(SessionRefused):
        open_session(m, 400)
    m.close(a.session_id)
    assert (m.used_bytes, m.free_tokens, len(m)) == (0, 100, 0)
    b = open_session(m, 400)  # now it fits
    assert m.used_bytes == 400 and a.session_id not in m.sessions and b.session_id in m.sessions


def test_close_unknown_or_twice_is_harmless():
    m = SessionManager(budget_bytes=1000, bytes_per_token=10)
    a = open_session(m, 100)
    m.close(SessionId("no-such-session"))
    assert m.used_bytes == 100
    m.close(a.session_id)
    m.close(a.session_id)
    assert m.used_bytes == 0 and len(m) == 0


def test_draining_refuses_new_sessions_but_keeps_open_ones():
    m = SessionManager(budget_bytes=1000, bytes_per_token=10)
    a = open_session(m, 100)
    m.draining = True
    with pytest.raises(SessionRefused) as e:
        open_session(m, 1)
    assert e.value.reason is Refusal.DRAINING
    assert e.value.reason.value == "unavailable"
    assert a.session_id in m.sessions and m.used_bytes == 100


def test_free_tokens_rounds_down_and_handles_zero_bytes_per_token():
    m = SessionManager(budget_bytes=1005, bytes_per_token=10)
    assert m.free_tokens == 100
    open_session(m, 6)
    assert m.free_tokens == 99  # 999 // 10
    assert SessionManager(budget_bytes=50, bytes_per_token=0).free_tokens == 50
    assert SessionManager(budget_bytes=0, bytes_per_token=10).free_tokens == 0


def test_mirrors_count_against_the_budget_and_are_refused_first():
    m = SessionManager(budget_bytes=1000, bytes_per_token=10, mirror_reserve=0.25)
    mirror = m.open(start=0, end=4, batch_size=1, max_length=64, reserved_bytes=500, make_cache=lambda: None,
                    now=0.0, mirror=True)
    assert mirror.mirror and m.used_bytes == 500 and m.free_tokens == 50
    # a second mirror would leave 200 bytes free, under the 250 kept for primaries; a primary of that size opens
    with pytest.raises(SessionRefused, match="not taking mirror sessions") as refused:
        m.open(start=0, end=4, batch_size=1, max_length=64, reserved_bytes=300, make_cache=lambda: None, now=0.0,
               mirror=True)
    assert refused.value.reason is Refusal.NO_MEMORY
    primary = open_session(m, 300)
    assert not primary.mirror and m.used_bytes == 800
    # past the budget, a mirror is refused as a primary would be
    with pytest.raises(SessionRefused, match="not enough KV cache memory"):
        m.open(start=0, end=4, batch_size=1, max_length=64, reserved_bytes=300, make_cache=lambda: None, now=0.0,
               mirror=True)
    m.close(mirror.session_id)
    assert m.used_bytes == 300


def test_mirror_reserve_is_a_share():
    with pytest.raises(ValueError, match="mirror_reserve"):
        SessionManager(budget_bytes=1000, bytes_per_token=10, mirror_reserve=1.5)
