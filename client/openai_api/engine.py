"""Generations through the swarm for the HTTP API: each in a worker thread, reporting to the event loop.

A generation is blocking torch and gRPC code, so it runs in a thread pool (at most ``max_sessions``
at once; more requests wait for a free worker), never on the event loop. Each has its own inference
session, so concurrent requests are concurrent sessions, which the nodes batch into shared forward
passes. Invariants: a generation's events arrive in order and end with exactly one ``Finished`` or
``Failed``; its session is closed when it ends, whatever the reason; ``cancel()`` (the client went
away, the server shuts down) closes its session at once, under the step in flight: the nodes stop its work
(a prefill within one chunk) instead of finishing it for nobody.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from homeswarm.client.openai_api.schemas import APIError
from homeswarm.client.openai_api.text import CompletionText
from homeswarm.client.session import InferenceSession, SessionError
from homeswarm.client.tokenizer import TextCodec
from homeswarm.client.transport import HopFailed
from homeswarm.routing.planner import MissingBlocksError

logger = logging.getLogger(__name__)

# what a swarm that cannot serve raises: no route, nodes failing past the failover budget, a DHT timeout
SWARM_ERRORS = (MissingBlocksError, SessionError, HopFailed, TimeoutError)


class SwarmModel(Protocol):
    """What the engine needs of DistributedModelForCausalLM."""

    eos_token_ids: list[int]

    def inference_session(self, *, max_length: int, batch_size: int = 1) -> InferenceSession: ...

    def generate_stream(self, input_ids: list[list[int]], **kwargs: object): ...  # noqa: ANN201


@dataclass(frozen=True)
class GenerationParams:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float  # 0: greedy
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stops: tuple[str, ...] = ()


@dataclass(frozen=True)
class Opened:
    """The sessions are open on a route through the swarm; text follows."""


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # "stop" (end token or stop string) or "length" (max_tokens reached)
    completion_tokens: int
    text: str


@dataclass(frozen=True)
class Failed:
    error: APIError


Event = Opened | TextDelta | Finished | Failed


class Generation:
    """One generation in flight, as the event loop sees it."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._cancelled = threading.Event()
        self._cancel_error: APIError | None = None
        self.abort: Callable[[], None] | None = None  # stops the step in flight (closes the session)

    async def next_event(self) -> Event:
        return await self._events.get()

    def cancel(self, error: APIError | None = None) -> None:
        """Stop now: the step in flight is abandoned and the nodes stop its work (a prefill within one chunk);
        ``error`` is reported to whoever still listens."""
        if not self._cancelled.is_set():
            self._cancel_error = error
            self._cancelled.set()
            if self.abort is not None:
                self.abort()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def emit(self, event: Event) -> None:
        """From the worker thread: hand an event to the event loop."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the loop has closed: nobody listens any more
            self._cancelled.set()

    def emit_cancelled(self) -> None:
        self.emit(Failed(self._cancel_error or APIError(499, "the generation was cancelled", type="server_error")))


class SwarmEngine:
    def __init__(self, model: SwarmModel, codec: TextCodec, *, max_sessions: int = 8):
        self.model = model
        self.codec = codec
        self._executor = ThreadPoolExecutor(max_workers=max_sessions, thread_name_prefix="generation")
        self._running: set[Generation] = set()
        self._lock = threading.Lock()

    def start(self, params: GenerationParams) -> Generation:
        """Queue a generation (call on the event loop); its events arrive on ``next_event()``."""
        generation = Generation(asyncio.get_running_loop())
        with self._lock:
            self._running.add(generation)
        self._executor.submit(self._run, generation, params)
        return generation

    def cancel_all(self, error: APIError) -> None:
        with self._lock:
            running = list(self._running)
        for generation in running:
            generation.cancel(error)

    def close(self) -> None:
        """Cancel what runs and wait for the workers (each ends after its step in flight)."""
        self.cancel_all(APIError(503, "the server is shutting down", type="server_error"))
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _run(self, generation: Generation, params: GenerationParams) -> None:
        try:
            self._generate(generation, params)
        except APIError as e:
            generation.emit(Failed(e))
        except BaseException as e:  # a worker must report every failure, or its request waits forever
            logger.exception("generation failed")
            generation.emit(Failed(APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error")))
        finally:
            with self._lock:
                self._running.discard(generation)

    def _generate(self, generation: Generation, params: GenerationParams) -> None:
        if generation.cancelled:  # the client left (or the server stops) before a worker was free
            generation.emit_cancelled()
            return
        try:
            session = self.model.inference_session(max_length=len(params.prompt_ids) + params.max_tokens)
        except SWARM_ERRORS as e:
            raise APIError(503, f"no route through the swarm: {e}", type="server_error",
                           code="swarm_unavailable") from None
        try:
            generation.abort = session.close
            if generation.cancelled:
                generation.emit_cancelled()
                return
            generation.emit(Opened())
            self._decode(generation, params, session)
        finally:
            generation.abort = None
            session.close()

    def _decode(self, generation: Generation, params: GenerationParams, session: InferenceSession) -> None:
        text = CompletionText(self.codec.decode, params.stops)
        ids: list[int] = []
        tokens = self.model.generate_stream(
            [params.prompt_ids], max_new_tokens=params.max_tokens, do_sample=params.temperature > 0,
            temperature=params.temperature if params.temperature > 0 else 1.0,
            top_k=params.top_k, top_p=params.top_p, seed=params.seed, session=session,
        )
        try:
            for step in tokens:
                ids.append(int(step[0]))
                delta = text.add(ids)
                if delta:
                    generation.emit(TextDelta(delta))
                if text.stopped:
                    break
                if generation.cancelled:
                    generation.emit_cancelled()
                    return
        except SWARM_ERRORS as e:
            if generation.cancelled:  # the session was closed under the step in flight
                generation.emit_cancelled()
                return
            raise APIError(503, f"the swarm failed during generation: {e}", type="server_error",
                           code="swarm_failed") from None
        finally:
            tokens.close()
        if not text.stopped:
            delta = text.finish(ids)
            if delta:
                generation.emit(TextDelta(delta))
        ended_by_model = bool(ids) and ids[-1] in self.model.eos_token_ids
        reason = "stop" if text.stopped or ended_by_model else "length"
        generation.emit(Finished(reason, len(ids), text.text))
