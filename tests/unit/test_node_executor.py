"""The compute executor batches the steps of concurrent sessions and keeps each caller's result its own."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from homeswarm.model import load_span
from homeswarm.node.executor import ComputeExecutor
from tests.helpers.checkpoints import make_checkpoint

TIMEOUT = 30


@pytest.fixture(scope="module")
def span(tmp_path_factory):
    return load_span(make_checkpoint(tmp_path_factory.mktemp("exec") / "qwen3", "qwen3", num_layers=2), 0, 2)


@pytest.fixture
def executor():
    ex = ComputeExecutor()
    yield ex
    ex.shutdown()


def _prefilled(span, n, seed=0):
    """n sessions at different positions, each twice (to run batched and to run alone)."""
    gen = torch.Generator().manual_seed(seed)
    pairs = []
    for i in range(n):
        a, b = span.new_cache(1, 32), span.new_cache(1, 32)
        prefix = torch.randn(1, 3 + 2 * i, 64, generator=gen)
        span(prefix, a)
        span(prefix, b)
        pairs.append((torch.randn(1, 1, 64, generator=gen), a, b))
    return pairs


def _record_batches(monkeypatch, span):
    sizes: list[int] = []
    original = type(span).forward_batch

    def spy(self, items):
        sizes.append(len(items))
        return original(self, items)

    monkeypatch.setattr(type(span), "forward_batch", spy)
    return sizes


async def test_concurrent_steps_are_batched_and_correct(span, executor, monkeypatch):
    sizes = _record_batches(monkeypatch, span)
    pairs = _prefilled(span, 8)
    outputs = await asyncio.wait_for(
        asyncio.gather(*(executor.step(span, hidden, a) for hidden, a, _ in pairs)), TIMEOUT
    )
    assert max(sizes) > 1 and sum(sizes) == 8
    for out, (hidden, a, b) in zip(outputs, pairs, strict=True):
        torch.testing.assert_close(out, span(hidden, b), rtol=1e-5, atol=1e-5)
        assert a.length == b.length
    assert executor.queue_length == 0 and executor.batched_steps == 8


async def test_sessions_decode_in_lockstep_stay_batched(span, executor, monkeypatch):
    sizes = _record_batches(monkeypatch, span)
    pairs = _prefilled(span, 4, seed=1)

    async def decode(hidden, cache, steps):
        for _ in range(steps):
            hidden = await executor.step(span, hidden, cache)
        return hidden

    await asyncio.wait_for(asyncio.gather(*(decode(hidden, a, 5) for hidden, a, _ in pairs)), TIMEOUT)
    assert sum(sizes) == 20 and len(sizes) < 20
    assert [a.length for _, a, _ in pairs] == [b.length + 5 for _, _, b in pairs]


async def test_a_bad_step_fails_only_its_caller(span, executor, monkeypatch):
    sizes = _record_batches(monkeypatch, span)
    pairs = _prefilled(span, 3, seed=2)
    full = span.new_cache(1, 4)
    span(torch.randn(1, 4, 64), full)
    bad = [
        executor.step(span, torch.randn(1, 1, 32), span.new_cache(1, 8)),  # wrong hidden size
        executor.step(span, torch.randn(1, 1, 64), full),  # no room in the cache
    ]
    good = [executor.step(span, hidden, a) for hidden, a, _ in pairs]
    results = await asyncio.wait_for(asyncio.gather(*bad, *good, return_exceptions=True), TIMEOUT)
    assert [type(r) for r in results[:2]] == [ValueError, ValueError]
    assert "hidden size" in str(results[0]) and "cache overflow" in str(results[1])
    for out, (hidden, _, b) in zip(results[2:], pairs, strict=True):
        torch.testing.assert_close(out, span(hidden, b), rtol=1e-5, atol=1e-5)
    assert full.length == 4 and sizes == [3]


async def test_failure_inside_a_batch_falls_back_to_one_by_one(span, executor, monkeypatch):
    pairs = _prefilled(span, 3, seed=3)
    original = type(span).forward_batch
    poisoned = pairs[1][1]

    def flaky(self, items):
        if any(cache is poisoned for _, cache in items):
            raise RuntimeError("boom")
        return original(self, items)

    monkeypatch.setattr(type(span), "forward_batch", flaky)
    results = await asyncio.wait_for(
        asyncio.gather(*(executor.step(span, h, a) for h, a, _ in pairs), return_exceptions=True), TIMEOUT
    )
    assert isinstance(results[1], RuntimeError) and poisoned.length == pairs[1][2].length
    for i in (0, 2):
        hidden, _, b = pairs[i]
        torch.testing.assert_close(results[i], span(hidden, b), rtol=1e-5, atol=1e-5)


async def test_limits_same_cache_and_other_spans_split_batches(span, monkeypatch):
    executor = ComputeExecutor(max_batch_steps=3, max_batch_tokens=2048)
    try:
        sizes = _record_batches(monkeypatch, span)
        other = span.subspan(0, 1)
        cache = span.new_cache(1, 16)
        steps = [executor.step(span, torch.randn(1, 1, 64), span.new_cache(1, 4)) for _ in range(4)]
        steps += [executor.step(span, torch.randn(1, 2, 64), cache), executor.step(span, torch.randn(1, 1, 64), cache)]
        steps += [executor.step(other, torch.randn(1, 1, 64), other.new_cache(1, 4))]
        await asyncio.wait_for(asyncio.gather(*steps), TIMEOUT)
        assert sum(sizes) == 7 and max(sizes) == 3
        assert cache.length == 3
    finally:
        executor.shutdown()


async def test_cancelled_step_never_runs_and_run_still_works(span, executor):
    cache = span.new_cache(1, 8)
    blocker = asyncio.ensure_future(executor.run(torch.mm, torch.randn(200, 200), torch.randn(200, 200)))
    task = asyncio.ensure_future(executor.step(span, torch.randn(1, 1, 64), cache))
    await asyncio.sleep(0)
    assert executor.queue_length == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert executor.queue_length == 0
    assert (await asyncio.wait_for(blocker, TIMEOUT)).shape == (200, 200)
    out = await asyncio.wait_for(executor.step(span, torch.randn(1, 1, 64), cache), TIMEOUT)
    assert out.shape == (1, 1, 64) and cache.length == 1


async def test_timed_step_reports_its_batch_compute_time(span, executor, monkeypatch):
    original = type(span).forward_batch
    delay = 0.05

    def slow(self, items):
        import time

        time.sleep(delay)  # a forward pass that takes a known minimum time
        return original(self, items)

    monkeypatch.setattr(type(span), "forward_batch", slow)
    pairs = _prefilled(span, 3, seed=4)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    results = await asyncio.wait_for(
        asyncio.gather(*(executor.timed_step(span, hidden, a) for hidden, a, _ in pairs)), TIMEOUT
    )
    elapsed = loop.time() - t0
    seconds = [s for _, s in results]
    # the forward pass, not more: at least its known minimum, at most the whole wait for the results
    assert all(delay <= s <= elapsed for s in seconds)
    assert len(set(seconds)) == 1  # one batch: one forward pass, its time shared


async def test_a_lone_short_step_runs_inline_once_its_time_is_known(span):
    executor = ComputeExecutor(inline_max_seconds=10.0)
    try:
        cache, reference = span.new_cache(1, 16), span.new_cache(1, 16)
        outputs = []
        for i in range(4):
            hidden = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(i))
            outputs.append(await asyncio.wait_for(executor.timed_step(span, hidden, cache, inline_ok=True), TIMEOUT))
            torch.testing.assert_close(outputs[-1][0], span(hidden, reference), rtol=1e-5, atol=1e-5)
        # the first step of this size ran on the compute thread and measured it; the rest ran inline
        assert executor.inline_steps == 3 and executor.batched_steps == 4
        assert all(seconds > 0 for _, seconds in outputs)
        # a bad step fails its caller inline too, leaving the cache untouched
        with pytest.raises(ValueError):
            await executor.timed_step(span, torch.randn(1, 1, 32), cache, inline_ok=True)
        assert cache.length == 4
    finally:
        executor.shutdown()


async def test_no_inline_step_when_not_allowed_or_too_slow_or_busy(span, monkeypatch):
    executor = ComputeExecutor(inline_max_seconds=10.0)
    try:
        cache = span.new_cache(1, 16)
        for _ in range(2):  # not allowed by the caller (other sessions to batch with)
            await asyncio.wait_for(executor.timed_step(span, torch.randn(1, 1, 64), cache), TIMEOUT)
        assert executor.inline_steps == 0
        # the compute thread is busy with something else: queue behind it, never run beside it
        started, release = asyncio.Event(), threading.Event()
        loop = asyncio.get_running_loop()

        def blocker():
            loop.call_soon_threadsafe(started.set)
            release.wait(TIMEOUT)

        busy = asyncio.ensure_future(executor.run(blocker))
        await asyncio.wait_for(started.wait(), TIMEOUT)
        step = asyncio.ensure_future(executor.timed_step(span, torch.randn(1, 1, 64), cache, inline_ok=True))
        await asyncio.sleep(0.05)
        assert not step.done()
        release.set()
        await asyncio.wait_for(asyncio.gather(busy, step), TIMEOUT)
        assert executor.inline_steps == 0
        # too slow for the threshold: stays on the compute thread
        executor.inline_max_seconds = 1e-9
        await asyncio.wait_for(executor.timed_step(span, torch.randn(1, 1, 64), cache, inline_ok=True), TIMEOUT)
        assert executor.inline_steps == 0
    finally:
        executor.shutdown()


async def _steps(executor, span, *caches):
    """One decoding step for each cache, queued together (so they run as one batch)."""
    return await asyncio.wait_for(
        asyncio.gather(*(executor.step(span, torch.randn(1, 1, 64), cache) for cache in caches)), TIMEOUT
    )


# A batch wait far beyond TIMEOUT: a step that is let go early completes within TIMEOUT, one that waited
# the whole batch wait fails wait_for(TIMEOUT). No margin between two durations to hold on a busy machine.
LONG_WAIT = 4 * TIMEOUT


async def _paired(span, monkeypatch, batch_wait):
    """An executor that holds batches back ``batch_wait`` s, whose last batch ran sessions a and b:
    (executor, batch sizes so far, a's cache, b's cache)."""
    sizes = _record_batches(monkeypatch, span)
    executor = ComputeExecutor(batch_wait_seconds=batch_wait)
    a, b = span.new_cache(1, 16), span.new_cache(1, 16)
    await _steps(executor, span, a, b)
    return executor, sizes, a, b


def _release(executor, *caches):
    """Let a drain that still waits (a failed test) go at once, so that no thread outlives the test by
    LONG_WAIT, then shut the executor down."""
    executor.batch_wait_seconds = 0.0
    for cache in caches:
        executor.forget(cache)  # wakes the waiting drain, which finds its wait over
    executor.shutdown()


async def test_a_batch_waits_for_the_staggered_steps_of_the_last_one(span, monkeypatch):
    """a's next step arrives first: it waits for b's instead of running alone, and both run as one batch
    as soon as b's arrives (within TIMEOUT, far less than the batch wait)."""
    executor, sizes, a, b = await _paired(span, monkeypatch, LONG_WAIT)
    try:
        assert sizes == [2]
        first = asyncio.ensure_future(executor.step(span, torch.randn(1, 1, 64), a))
        await asyncio.sleep(0.1)
        assert not first.done() and sizes == [2]
        await asyncio.wait_for(asyncio.gather(first, executor.step(span, torch.randn(1, 1, 64), b)), TIMEOUT)
        assert sizes == [2, 2]
    finally:
        _release(executor, a, b)


async def test_the_wait_for_a_session_that_stopped_is_bounded(span, monkeypatch):
    """When b never sends its next step, a's runs alone once the batch wait is over (not before it); and
    b, no longer in the last batch, is not waited for again."""
    executor, sizes, a, b = await _paired(span, monkeypatch, 0.2)
    try:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await asyncio.wait_for(executor.step(span, torch.randn(1, 1, 64), a), TIMEOUT)  # b never comes
        # The wait itself is what is checked: at least the 0.2 s, and bounded (0.31-0.35 s measured with
        # one core kept busy by another process; a step that waits for nothing took up to 0.13 s there).
        assert 0.15 <= loop.time() - t0 < 5
        executor.batch_wait_seconds = LONG_WAIT
        await asyncio.wait_for(executor.step(span, torch.randn(1, 1, 64), a), TIMEOUT)  # b left the batch
        assert sizes == [2, 1, 1]
    finally:
        _release(executor, a, b)


async def test_no_batch_waits_for_a_session_that_ended(span, monkeypatch):
    """A session whose cache is forgotten (it closed) is not waited for, also by a drain already waiting."""
    executor, sizes, a, b = await _paired(span, monkeypatch, LONG_WAIT)
    c = span.new_cache(1, 16)
    try:
        executor.forget(b)  # b's session closed
        await asyncio.wait_for(executor.step(span, torch.randn(1, 1, 64), a), TIMEOUT)
        # forgetting while a drain already waits lets it go at once
        await _steps(executor, span, a, c)
        waiting = asyncio.ensure_future(executor.step(span, torch.randn(1, 1, 64), a))
        await asyncio.sleep(0.1)
        assert not waiting.done()
        executor.forget(c)
        await asyncio.wait_for(waiting, TIMEOUT)
        assert sizes == [2, 1, 2, 1]
    finally:
        _release(executor, a, b, c)


def test_thread_chooser_probes_each_count_then_keeps_the_fastest():
    from homeswarm.node.executor import ThreadChooser

    chooser = ThreadChooser(4, probe_steps=2, reprobe_steps=3)
    assert chooser.candidates == [4, 2, 1]
    seconds = {4: 0.030, 2: 0.010, 1: 0.020}
    used = []
    for _ in range(6 + 3 + 6):
        threads = chooser.choose("decode")
        used.append(threads)
        chooser.record("decode", threads, seconds[threads])
    # a probe (each count twice, most threads first), the fastest for 3 steps, then a new probe
    assert used == [4, 4, 2, 2, 1, 1, 2, 2, 2, 4, 4, 2, 2, 1, 1]
    assert chooser.chosen("decode") == 2
    assert chooser.chosen("other") is None and chooser.choose("other") == 4  # kinds are apart
    assert ThreadChooser(1).candidates == [1] and ThreadChooser(1).choose("x") == 1
    with pytest.raises(ValueError):
        ThreadChooser(0)


async def test_decoding_steps_run_with_the_chosen_thread_count(span, monkeypatch):
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    seen: list[int] = []
    original = type(span).forward_batch

    def spy(self, items):
        seen.append(torch.get_num_threads())
        return original(self, items)

    monkeypatch.setattr(type(span), "forward_batch", spy)
    ex = ComputeExecutor()
    try:
        assert ex.threads is not None and ex.threads.candidates == [2, 1]
        cache = span.new_cache(1, 64)
        await asyncio.wait_for(ex.step(span, torch.randn(1, 20, 64), cache), TIMEOUT)  # prefill: not tuned
        for _ in range(8):
            await asyncio.wait_for(ex.step(span, torch.randn(1, 1, 64), cache), TIMEOUT)
        after = await ex.run(torch.get_num_threads)  # the compute thread's own setting, restored
    finally:
        ex.shutdown()
        torch.set_num_threads(previous)
    assert seen[:7] == [2, 2, 2, 2, 1, 1, 1]
    assert seen[7] == ex.threads.chosen((id(span), 1)) and seen[7] in (1, 2)
    assert after == 2
