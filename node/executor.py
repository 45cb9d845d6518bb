"""Runs compute off the event loop, on one dedicated thread, batching the steps of concurrent sessions.

One thread, because torch already parallelises each operation over the cores; running two
forwards at once would only make them contend. Work submitted from the loop is awaited there.

Session steps (:meth:`ComputeExecutor.step`) wait in a queue; each time the compute thread gets to
them it takes every step queued at that moment for one span (up to ``max_batch_steps`` steps and
``max_batch_tokens`` tokens, though a single step of any size always runs) and runs them as one
``BlockSpan.forward_batch``. Invariants: each step is checked alone before it joins a batch, so a bad
step fails only its own caller; a cache is in at most one step of a batch; a step cancelled while
queued never runs; the steps of one cache (one session) run in the order they were queued.

A short step may run on the calling (event loop) thread instead: only when the caller allows it (the
node does when it has a single session, so there is nothing to batch with), nothing is queued or
running on the compute thread, and the last step of that span and size took under
``inline_max_seconds``. Two thread hand-offs cost about 0.3 ms on a busy 2-core machine, as much as a
small span's whole step; blocking the loop for a few milliseconds costs other requests no more.

Over the network the answers of one batch leave together but the sessions' next steps come back
staggered, so the first to arrive would run alone and the rest after it, and the sessions would stay
split in two half-batches. With ``batch_wait_seconds`` the compute thread holds the next batch back
until every session of the last batch has queued its next step, at most that long after the last
forward pass ended (or the oldest queued step arrived, if later).

Threads: torch runs each operation on up to ``torch.get_num_threads()`` threads (the node sets it
from ``--compute-threads`` / ``--max-threads``), and every parallel operation ends at a barrier where
all its threads meet. On a machine whose other work keeps a core busy, that barrier waits for a thread
the scheduler has set aside: a decoding step of 4 small blocks took 240 ms with 2 threads and 17 ms with
1 on this project's 2-core machine under load, while on idle cores 2 threads read a large span's weights
faster. So for decoding-sized steps (:class:`ThreadChooser`) the executor times each thread count in turn
for a few steps, runs the fastest, and tries the others again every few hundred steps.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from homeswarm.model import BlockSpan, KVCache

T = TypeVar("T")
logger = logging.getLogger(__name__)


class ThreadChooser:
    """Which torch thread count runs the steps of one kind (``key``: span and size) fastest, found by
    trying each candidate for ``probe_steps`` steps (most threads first, so a new kind starts as torch
    would), keeping the one with the lowest median, and trying them all again after ``reprobe_steps``
    steps, since the machine's other load comes and goes."""

    def __init__(self, max_threads: int, *, probe_steps: int = 3, reprobe_steps: int = 256) -> None:
        if max_threads < 1 or probe_steps < 1 or reprobe_steps < 1:
            raise ValueError("max_threads, probe_steps and reprobe_steps must be positive")
        self.candidates = sorted({1, max(1, max_threads // 2), max_threads}, reverse=True)
        self.probe_steps = probe_steps
        self.reprobe_steps = reprobe_steps
        # key -> (times per candidate in the current probe, chosen count or None, steps left before a probe)
        self._state: dict[object, tuple[dict[int, list[float]], int | None, int]] = {}

    def choose(self, key: object) -> int:
        """The thread count to run the next step of ``key`` with."""
        if len(self.candidates) == 1:
            return self.candidates[0]
        state = self._state.get(key)
        if state is None:
            if len(self._state) >= 1024:  # many kinds of step: keep the table small
                self._state.clear()
            state = self._state[key] = ({}, None, 0)
        samples, chosen, left = state
        if chosen is not None and left > 0:
            return chosen
        for threads in self.candidates:
            if len(samples.get(threads, ())) < self.probe_steps:
                return threads
        return self.candidates[0]  # unreachable: record() settles a finished probe

    def record(self, key: object, threads: int, seconds: float) -> None:
        """The step of ``key`` chosen by :meth:`choose` ran ``threads`` threads for ``seconds``."""
        state = self._state.get(key)
        if state is None:
            return
        samples, chosen, left = state
        if chosen is not None and left > 0:
            self._state[key] = (samples, chosen, left - 1)
            return
        samples.setdefault(threads, []).append(seconds)
        if all(len(samples.get(t, ())) >= self.probe_steps for t in self.candidates):
            best = min(self.candidates, key=lambda t: statistics.median(samples[t]))
            self._state[key] = ({}, best, self.reprobe_steps)

    def chosen(self, key: object) -> int | None:
        """The count settled on for ``key`` (None while probing or unknown)."""
        state = self._state.get(key)
        return state[1] if state is not None else None


@dataclass(eq=False)
class _Step:
    span: BlockSpan
    hidden: torch.Tensor
    cache: KVCache | None
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    queued_at: float = 0.0  # time.monotonic() when it was queued
    seconds: float = 0.0  # the forward pass that computed it (shared by the steps of one batch)

    @property
    def tokens(self) -> int:
        return self.hidden.shape[0] * self.hidden.shape[1]


class ComputeExecutor:
    def __init__(self, *, max_batch_steps: int = 8, max_batch_tokens: int = 2048, batching: bool = True,
                 inline_max_seconds: float = 0.0, batch_wait_seconds: float = 0.0,
                 adaptive_threads: bool = True, adaptive_max_tokens: int = 8) -> None:
        if max_batch_steps < 1 or max_batch_tokens < 1:
            raise ValueError("max_batch_steps and max_batch_tokens must be positive")
        if inline_max_seconds < 0 or batch_wait_seconds < 0:
            raise ValueError("inline_max_seconds and batch_wait_seconds must be >= 0")
        self.batch_wait_seconds = batch_wait_seconds if batching else 0.0
        self._last_batch: set[int] = set()  # caches (by id) of the last batch taken
        self._last_finish = 0.0  # time.monotonic() when the last forward pass ended
        self.inline_max_seconds = inline_max_seconds
        self._last_seconds: dict[tuple[int, int], float] = {}  # (id(span), tokens) -> last forward time
        self._busy = 0  # run() calls and drains in flight on the compute thread
        self.inline_steps = 0  # steps run on the caller's thread
        self.max_batch_steps = max_batch_steps if batching else 1
        self.max_batch_tokens = max_batch_tokens
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        self._lock = threading.Condition()  # guards the queue; notified when a step is queued
        self._queue: list[_Step] = []
        self._drain_scheduled = False
        self.batches = 0  # forward_batch calls so far
        self.batched_steps = 0  # steps they ran
        # thread counts for decoding-sized batches (up to adaptive_max_tokens rows), from torch's setting now
        self.threads = ThreadChooser(torch.get_num_threads()) if adaptive_threads else None
        self.adaptive_max_tokens = adaptive_max_tokens
        # called on the compute (or caller's) thread after each forward pass: (steps, seconds); metrics
        self.on_batch: Callable[[int, float], None] | None = None

    @property
    def queue_length(self) -> int:
        """Steps queued and not yet taken by the compute thread."""
        return len(self._queue)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        with self._lock:
            self._busy += 1
        try:
            return await loop.run_in_executor(self._pool, _no_grad_call, fn, args)
        finally:
            with self._lock:
                self._busy -= 1

    async def step(self, span: BlockSpan, hidden: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        """``span.forward(hidden, cache)``, run together with the other steps queued at the same time."""
        return (await self.timed_step(span, hidden, cache))[0]

    async def timed_step(
        self, span: BlockSpan, hidden: torch.Tensor, cache: KVCache | None, *, inline_ok: bool = False
    ) -> tuple[torch.Tensor, float]:
        """:meth:`step`, and the seconds its forward pass took (its batch's, when batched).

        ``inline_ok``: the caller has nothing to batch this step with, so a short one may run right here.
        """
        loop = asyncio.get_running_loop()
        item = _Step(span, hidden, cache, loop.create_future(), loop, time.monotonic())
        schedule = False
        with self._lock:
            inline = inline_ok and self._inline_now(item)
            if inline:
                self._busy += 1
            else:
                self._queue.append(item)
                self._lock.notify()
                schedule = not self._drain_scheduled
                self._drain_scheduled = True
        if inline:
            try:
                item.span.check(item.hidden, item.cache)
                ((_, output, error),) = self._compute([item])
            finally:
                with self._lock:
                    self._busy -= 1
            self.inline_steps += 1
            if error is not None:
                raise error
            return output, item.seconds
        if schedule:
            # After the callbacks already ready on the loop: sessions woken by the same finished batch
            # queue their next steps first, so they land in one batch instead of a lone one and the rest.
            loop.call_soon(self._submit_drain)
        try:
            return await item.future, item.seconds
        except asyncio.CancelledError:
            with self._lock:
                if item in self._queue:
                    self._queue.remove(item)  # not taken yet: it never runs
            raise

    def forget(self, cache: KVCache) -> None:
        """The session of ``cache`` has ended: no batch waits for its next step any more."""
        with self._lock:
            self._last_batch.discard(id(cache))
            self._lock.notify()

    def _inline_now(self, item: _Step) -> bool:
        """Under the lock: whether ``item`` may run on the caller's thread now."""
        if self.inline_max_seconds <= 0 or self._queue or self._drain_scheduled or self._busy:
            return False
        last = self._last_seconds.get((id(item.span), item.tokens))
        return last is not None and last < self.inline_max_seconds

    def _hold_back(self) -> None:
        """Under the lock, on the compute thread: wait while a session of the last batch has not queued
        its next step yet, for at most ``batch_wait_seconds`` after the later of the last forward pass's
        end and the oldest queued step. New steps wake it."""
        if self.batch_wait_seconds <= 0:
            return
        while self._queue:
            queued = {id(item.cache) for item in self._queue if item.cache is not None}
            if self._last_batch <= queued:
                return
            start = max(self._last_finish, min(item.queued_at for item in self._queue))
            remaining = start + self.batch_wait_seconds - time.monotonic()
            if remaining <= 0:
                return
            self._lock.wait(remaining)

    def _submit_drain(self) -> None:
        try:
            self._pool.submit(self._drain)
        except RuntimeError:  # shut down: fail what waits
            with self._lock:
                waiting, self._queue = self._queue, []
                self._drain_scheduled = False
            _resolve_all([(item, None, RuntimeError("the compute executor is shut down")) for item in waiting])

    def _take(self) -> list[_Step]:
        """Under the lock: the steps for the next batch (same span, distinct caches, within the limits)."""
        batch: list[_Step] = []
        caches: set[int] = set()
        tokens = 0
        rest: list[_Step] = []
        blocked: set[int] = set()  # caches with an earlier step left in the queue: keep their order
        for item in self._queue:
            key = id(item.cache) if item.cache is not None else None
            fits = (
                not batch
                or (item.span is batch[0].span and len(batch) < self.max_batch_steps
                    and tokens + item.tokens <= self.max_batch_tokens)
            ) and key not in caches and key not in blocked
            if fits:
                batch.append(item)
                tokens += item.tokens
                if key is not None:
                    caches.add(key)
            else:
                rest.append(item)
                if key is not None:
                    blocked.add(key)
        self._queue = rest
        self._last_batch = caches
        return batch

    def _drain(self) -> None:
        with self._lock:
            self._busy += 1
        results: list[tuple[_Step, torch.Tensor | None, BaseException | None]] = []
        try:
            self._drain_once(results)
        finally:
            with self._lock:
                self._busy -= 1
            # resolved once no longer busy: a caller woken by its result may run its next short step inline
            _resolve_all(results)

    def _drain_once(self, results: list[tuple[_Step, torch.Tensor | None, BaseException | None]]) -> None:
        with self._lock:
            self._hold_back()
            batch = self._take()
            more = bool(self._queue)
            if not more:
                self._drain_scheduled = False
        if more:
            # Steps left over (another span, over the limits): run them next, after this batch.
            try:
                self._pool.submit(self._drain)
            except RuntimeError:
                pass
        ready = []
        for item in batch:
            if item.future.cancelled():
                continue
            try:
                item.span.check(item.hidden, item.cache)
            except ValueError as e:
                results.append((item, None, e))
                continue
            ready.append(item)
        if ready:
            results.extend(self._compute(ready))

    def _compute(self, ready: list[_Step]) -> list[tuple[_Step, torch.Tensor | None, BaseException | None]]:
        tokens = sum(item.tokens for item in ready)
        key = (id(ready[0].span), tokens)
        tuned = self.threads is not None and tokens <= self.adaptive_max_tokens and ready[0].hidden.device.type == "cpu"
        previous = torch.get_num_threads()
        threads = self.threads.choose(key) if tuned else previous  # type: ignore[union-attr]
        if threads != previous:
            torch.set_num_threads(threads)  # this thread's setting only (OpenMP's and MKL's are per thread)
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                outputs = ready[0].span.forward_batch([(item.hidden, item.cache) for item in ready])
            _synchronize(outputs[0])
        except Exception as e:  # noqa: BLE001 - handed to the callers
            if len(ready) == 1:
                return [(ready[0], None, e)]
            # No cache advanced (forward_batch advances them only at the very end): run each alone so
            # that only the step at fault fails.
            logger.warning("a batch of %d steps failed (%s); running them one by one", len(ready), e)
            results = []
            for item in ready:
                try:
                    with torch.no_grad():
                        (output,) = item.span.forward_batch([(item.hidden, item.cache)])
                except Exception as item_error:  # noqa: BLE001
                    results.append((item, None, item_error))
                else:
                    results.append((item, output, None))
            return results
        finally:
            if threads != previous:
                torch.set_num_threads(previous)
        seconds = time.perf_counter() - t0
        if tuned:
            self.threads.record(key, threads, seconds)  # type: ignore[union-attr]
        self._last_finish = time.monotonic()
        for item in ready:
            item.seconds = seconds
        if len(ready) == 1:
            if len(self._last_seconds) >= 1024:  # prompts of many lengths: keep the table small
                self._last_seconds.clear()
            self._last_seconds[id(ready[0].span), ready[0].tokens] = seconds
        self.batches += 1
        self.batched_steps += len(ready)
        if self.on_batch is not None:
            self.on_batch(len(ready), seconds)
        return [(item, output, None) for item, output in zip(ready, outputs, strict=True)]

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _resolve_all(results: list[tuple[_Step, torch.Tensor | None, BaseException | None]]) -> None:
    """Settle the futures from the compute thread: one callback per loop, so their callers wake together."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for result in results:
        by_loop.setdefault(result[0].loop, []).append(result)
    for loop, group in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle, group)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass


def _settle(group: list[tuple[_Step, torch.Tensor | None, BaseException | None]]) -> None:
    for item, output, error in group:
        if item.future.done():  # cancelled meanwhile
            continue
        if error is not None:
            item.future.set_exception(error)
        else:
            item.future.set_result(output)


def _synchronize(output: torch.Tensor) -> None:
    """Wait for queued GPU kernels, so the measured time is the compute's (they would be waited for
    anyway, when the output is copied to the CPU for the wire)."""
    if output.device.type == "cuda":
        torch.cuda.synchronize(output.device)


def _no_grad_call(fn: Callable[..., T], args: tuple) -> T:
    with torch.no_grad():
        return fn(*args)
