"""The node's gRPC service: Info, a stateless Forward, the Inference session stream, and Push.

A session's inputs arrive in one inbox, from its client's stream or pushed by the previous node of
the chain (server-to-server hand-off); steps run in step_id order, a duplicate (a push that lost the
race against the client's relay of the same step) is answered from the last result, never computed
twice, so the KV cache never holds a position twice.

Every request is checked before any compute: protocol version (FAILED_PRECONDITION), model and
block range, batch size, length and tensor shape (INVALID_ARGUMENT), cache budget
(RESOURCE_EXHAUSTED), draining for shutdown (UNAVAILABLE). Compute runs on the executor's thread;
only a short step of a node's single session may run on the event loop (see ``ComputeExecutor``).
A session's cache is released however its stream ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
import torch

from homeswarm.model import BlockSpan, cache_bytes
from homeswarm.node.executor import ComputeExecutor
from homeswarm.node.metrics import NodeMetrics
from homeswarm.node.peers import PeerChannels
from homeswarm.node.sessions import Refusal, Session, SessionManager, SessionRefused
from homeswarm.protocol import (
    PROTOCOL_VERSION,
    CodecError,
    check_protocol_version,
    deserialize_tensor,
    node_pb2,
    node_pb2_grpc,
    serialize_tensor,
)

logger = logging.getLogger(__name__)

_REFUSAL_CODES = {
    Refusal.NO_MEMORY: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Refusal.DRAINING: grpc.StatusCode.UNAVAILABLE,
}
_COMPRESSIONS = frozenset(node_pb2.Compression.values())



_MAX_INBOX = 64


class BadRequest(Exception):
    pass


async def _get_within(inbox: asyncio.Queue, timeout: float):  # noqa: ANN202
    """inbox.get() bounded by ``timeout``; on the hot path, so without wait_for's extra task (3.11+)."""
    if not inbox.empty():
        return inbox.get_nowait()
    if hasattr(asyncio, "timeout"):
        async with asyncio.timeout(timeout):
            return await inbox.get()
    return await asyncio.wait_for(inbox.get(), timeout)


@dataclass
class _Inbound:
    """A step input for a session, from its client or pushed by the previous node."""

    step_id: int
    hidden: node_pb2.Tensor | torch.Tensor
    next: list[node_pb2.NextHop]
    from_peer: bool


@dataclass
class _LiveSession:
    session: Session
    compression: int
    inbox: asyncio.Queue = field(default_factory=asyncio.Queue)
    last_step_id: int = 0
    last_response: node_pb2.InferenceResponse | None = None
    pushes: set[asyncio.Task] = field(default_factory=set)


@dataclass
class NodeStats:
    steps_from_client: int = 0
    steps_from_peers: int = 0
    pushes_sent: int = 0


@dataclass
class NodeIdentity:
    model: str
    dtype: str
    peer_id: str = ""
    throughput: float = 0.0  # steps per second through one block
    software_version: str = ""
    quant: str = "none"  # weight format of the linear layers (none, int8, int4)


class NodeService(node_pb2_grpc.NodeServicer):
    def __init__(
        self,
        span: BlockSpan,
        identity: NodeIdentity,
        sessions: SessionManager,
        executor: ComputeExecutor,
        *,
        max_batch_size: int,
        max_session_length: int,
        session_idle_timeout: float,
        clock: Callable[[], float] = time.monotonic,
        push_timeout: float = 10.0,
        metrics: NodeMetrics | None = None,
    ):
        self.span = span
        self.identity = identity
        self.sessions = sessions
        self.executor = executor
        self.max_batch_size = max_batch_size
        self.max_session_length = max_session_length
        self.session_idle_timeout = session_idle_timeout
        self.clock = clock
        self._subspans: dict[tuple[int, int], BlockSpan] = {}
        self.sessions_changed = asyncio.Event()
        self.push_timeout = push_timeout
        self.peers = PeerChannels()
        self.stats = NodeStats()
        self._live: dict[str, _LiveSession] = {}
        self.metrics = metrics if metrics is not None else NodeMetrics()
        self.started = clock()

    # --- helpers -------------------------------------------------------------------------------

    def _subspan(self, start: int, end: int) -> BlockSpan:
        if (start, end) == (self.span.start, self.span.end):
            return self.span
        if (start, end) not in self._subspans:
            self._subspans[start, end] = self.span.subspan(start, end)
        return self._subspans[start, end]

    def _check_range(self, start: int, end: int) -> None:
        if not self.span.start <= start < end <= self.span.end:
            raise BadRequest(
                f"blocks [{start}, {end}) are not within this node's span [{self.span.start}, {self.span.end})"
            )

    def _decode_hidden(self, message: node_pb2.Tensor, batch_size: int | None) -> torch.Tensor:
        try:
            hidden = deserialize_tensor(message)
        except CodecError as e:
            raise BadRequest(f"bad tensor: {e}") from None
        hidden_size = self.span.config.hidden_size
        if hidden.dim() != 3 or hidden.shape[-1] != hidden_size or hidden.shape[0] == 0 or hidden.shape[1] == 0:
            raise BadRequest(f"hidden states must be [batch, tokens, {hidden_size}], got {list(hidden.shape)}")
        if batch_size is not None and hidden.shape[0] != batch_size:
            raise BadRequest(f"the session was opened for batch {batch_size}, got {hidden.shape[0]}")
        if not hidden.is_floating_point():
            raise BadRequest(f"hidden states must be floating point, got {hidden.dtype}")
        return hidden.to(self.span.device, self.span.dtype)

    def _encode(self, hidden: torch.Tensor, compression: int) -> node_pb2.Tensor:
        return serialize_tensor(hidden.cpu(), compression)

    async def _abort(self, context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> None:
        self.metrics.error(code.name.lower())
        await context.abort(code, message)

    async def _check_version(self, version: int, context: grpc.aio.ServicerContext) -> None:
        error = check_protocol_version(version)
        if error is not None:
            await self._abort(context, grpc.StatusCode.FAILED_PRECONDITION, error)

    # --- RPCs ----------------------------------------------------------------------------------

    async def Info(self, request: node_pb2.InfoRequest, context: grpc.aio.ServicerContext) -> node_pb2.InfoResponse:
        return node_pb2.InfoResponse(
            protocol_version=PROTOCOL_VERSION,
            model=self.identity.model,
            start_block=self.span.start,
            end_block=self.span.end,
            dtype=self.identity.dtype,
            peer_id=self.identity.peer_id,
            throughput=self.identity.throughput,
            cache_tokens_left=self.sessions.free_tokens,
            active_sessions=len(self.sessions),
            software_version=self.identity.software_version,
            steps_from_client=self.stats.steps_from_client,
            steps_from_peers=self.stats.steps_from_peers,
            pushes_sent=self.stats.pushes_sent,
            forward_passes=self.executor.batches,
            batched_steps=self.executor.batched_steps,
            inline_steps=self.executor.inline_steps,
            quant=self.identity.quant,
            uptime_seconds=self.clock() - self.started,
        )

    async def Forward(
        self, request: node_pb2.ForwardRequest, context: grpc.aio.ServicerContext
    ) -> node_pb2.ForwardResponse:
        await self._check_version(request.protocol_version, context)
        try:
            self._check_range(request.start_block, request.end_block)
            if request.response_compression not in _COMPRESSIONS:
                raise BadRequest(f"unknown compression {request.response_compression}")
            hidden = self._decode_hidden(request.hidden, None)
            if hidden.shape[0] > self.max_batch_size or hidden.shape[1] > self.max_session_length:
                raise BadRequest(
                    f"at most batch {self.max_batch_size} x {self.max_session_length} tokens, "
                    f"got {list(hidden.shape[:2])}"
                )
        except BadRequest as e:
            await self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        self.metrics.bytes_received.inc(request.ByteSize())
        span = self._subspan(request.start_block, request.end_block)
        output = await self.executor.run(span.forward, hidden)
        response = node_pb2.ForwardResponse(hidden=self._encode(output, request.response_compression))
        self.metrics.bytes_sent.inc(response.ByteSize())
        return response

    async def Inference(
        self, request_iterator: AsyncIterator[node_pb2.InferenceRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[node_pb2.InferenceResponse]:
        try:
            first = await asyncio.wait_for(anext(request_iterator), self.session_idle_timeout)
        except (StopAsyncIteration, asyncio.TimeoutError):
            return
        await self._check_version(first.protocol_version, context)
        if first.WhichOneof("kind") != "open":
            await self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, "the first message must open the session")
        session = await self._open(first.open, context)
        live = _LiveSession(session, first.open.response_compression)
        self._live[session.session_id] = live
        reader = asyncio.create_task(self._read_client(request_iterator, live))
        try:
            yield node_pb2.InferenceResponse(opened=node_pb2.SessionOpened(session_id=session.session_id))
            while True:
                try:
                    item = await _get_within(live.inbox, self.session_idle_timeout)
                except asyncio.TimeoutError:
                    await self._abort(
                        context,
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"session idle for more than {self.session_idle_timeout:g} s; closed",
                    )
                    return
                if item is None:
                    return
                if isinstance(item, BadRequest):
                    await self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(item))
                    return
                if isinstance(item, node_pb2.HandoffFailed):
                    yield node_pb2.InferenceResponse(handoff_failed=item)
                    continue
                response = await self._process(live, item, context)
                if response is not None:
                    self.metrics.bytes_sent.inc(response.ByteSize())
                    yield response
        finally:
            reader.cancel()
            for task in live.pushes:
                task.cancel()
            self._live.pop(session.session_id, None)
            self.executor.forget(session.cache)
            self.sessions.close(session.session_id)
            self.sessions_changed.set()
            logger.debug("session %s closed after %d steps", session.session_id, session.steps)

    async def _read_client(
        self, request_iterator: AsyncIterator[node_pb2.InferenceRequest], live: _LiveSession
    ) -> None:
        """Moves the client's steps into the session's inbox, where pushes from peers also land."""
        try:
            async for request in request_iterator:
                self.metrics.bytes_received.inc(request.ByteSize())
                if request.WhichOneof("kind") != "step":
                    live.inbox.put_nowait(BadRequest("a session is already open on this stream; send steps"))
                    return
                live.inbox.put_nowait(_Inbound(request.step.step_id, request.step.hidden, list(request.step.next),
                                               from_peer=False))
        except (asyncio.CancelledError, grpc.RpcError):
            pass
        finally:
            live.inbox.put_nowait(None)

    async def Push(self, request: node_pb2.PushRequest, context: grpc.aio.ServicerContext) -> node_pb2.PushResponse:
        await self._check_version(request.protocol_version, context)
        live = self._live.get(request.session_id)
        if live is None:
            await self._abort(context, grpc.StatusCode.NOT_FOUND, f"no open session {request.session_id!r} here")
        try:
            hidden = self._decode_hidden(request.step.hidden, live.session.batch_size)
        except BadRequest as e:
            await self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if live.inbox.qsize() >= _MAX_INBOX:
            await self._abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, "the session's inbox is full")
        self.metrics.bytes_received.inc(request.ByteSize())
        live.inbox.put_nowait(_Inbound(request.step.step_id, hidden, list(request.step.next), from_peer=True))
        return node_pb2.PushResponse()

    async def _process(
        self, live: _LiveSession, item: _Inbound, context: grpc.aio.ServicerContext
    ) -> node_pb2.InferenceResponse | None:
        """Run one step; None for a duplicate of a step already done (a push that lost a race)."""
        session = live.session
        taken_up = time.perf_counter()
        if item.step_id <= live.last_step_id:
            if item.from_peer:
                return None
            if item.step_id == live.last_step_id and live.last_response is not None:
                return live.last_response  # the client relays a step a peer already pushed here
            await self._abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"step {item.step_id} is out of order: the session is at step {live.last_step_id}",
            )
        try:
            hidden = item.hidden
            if not isinstance(hidden, torch.Tensor):
                hidden = self._decode_hidden(hidden, session.batch_size)
            if session.cache.length + hidden.shape[1] > session.max_length:
                raise BadRequest(
                    f"the session holds {session.cache.length} of {session.max_length} tokens; "
                    f"{hidden.shape[1]} more do not fit"
                )
        except BadRequest as e:
            if item.from_peer:
                logger.warning("dropping a bad push: %s", e)
                self.metrics.error("invalid_argument")
                return None
            await self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if item.from_peer:
            self.stats.steps_from_peers += 1
        else:
            self.stats.steps_from_client += 1
        span = self._subspan(session.start, session.end)
        # a single session has nothing to batch with: a short step may skip the compute thread
        try:
            output, seconds = await self.executor.timed_step(span, hidden, session.cache,
                                                             inline_ok=len(self._live) == 1)
        except Exception:
            self.metrics.error("compute")
            raise
        self.metrics.step("peer" if item.from_peer else "client", time.perf_counter() - taken_up)
        session.steps += 1
        session.last_active = self.clock()
        result = node_pb2.StepResult(
            step_id=item.step_id,
            hidden=self._encode(output, live.compression),
            cache_length=session.cache.length,
            compute_seconds=seconds,
        )
        if item.next:
            # concurrently with the answer to the client: the next node must not wait on that leg
            task = asyncio.create_task(self._push(live, item.next, item.step_id, result.hidden))
            live.pushes.add(task)
            task.add_done_callback(live.pushes.discard)
        response = node_pb2.InferenceResponse(result=result)
        live.last_step_id = item.step_id
        live.last_response = response
        return response

    async def _push(
        self, live: _LiveSession, next_hops: list[node_pb2.NextHop], step_id: int, hidden: node_pb2.Tensor
    ) -> None:
        """Hand the output to the next node; on failure, tell the client (it relays instead)."""
        target = next_hops[0]
        request = node_pb2.PushRequest(
            protocol_version=PROTOCOL_VERSION,
            session_id=target.session_id,
            step=node_pb2.Step(step_id=step_id, hidden=hidden, next=next_hops[1:]),
        )
        try:
            await self.peers.stub(target.address).Push(request, timeout=self.push_timeout)
        except grpc.aio.AioRpcError as e:
            error = f"hand-off to {target.address} failed: {e.code().name}: {e.details()}"
        except (ValueError, RuntimeError) as e:  # e.g. a malformed address
            error = f"hand-off to {target.address} failed: {e}"
        else:
            self.stats.pushes_sent += 1
            self.metrics.bytes_sent.inc(request.ByteSize())
            return
        logger.info("%s", error)
        self.metrics.error("handoff")
        live.inbox.put_nowait(node_pb2.HandoffFailed(step_id=step_id, error=error))

    async def _open(self, request: node_pb2.OpenSession, context: grpc.aio.ServicerContext) -> Session:
        try:
            if request.model and request.model != self.identity.model:
                raise BadRequest(f"this node serves model {self.identity.model!r}, not {request.model!r}")
            self._check_range(request.start_block, request.end_block)
            if not 1 <= request.batch_size <= self.max_batch_size:
                raise BadRequest(f"batch_size must be in 1..{self.max_batch_size}, got {request.batch_size}")
            if not 1 <= request.max_length <= self.max_session_length:
                raise BadRequest(f"max_length must be in 1..{self.max_session_length}, got {request.max_length}")
            if request.response_compression not in _COMPRESSIONS:
                raise BadRequest(f"unknown compression {request.response_compression}")
        except BadRequest as e:
            await self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        span = self._subspan(request.start_block, request.end_block)
        needed = cache_bytes(
            span.config, span.num_blocks, request.batch_size, request.max_length, span.dtype
        )
        try:
            session = self.sessions.open(
                start=request.start_block,
                end=request.end_block,
                batch_size=request.batch_size,
                max_length=request.max_length,
                reserved_bytes=needed,
                make_cache=lambda: span.new_cache(request.batch_size, request.max_length),
                now=self.clock(),
            )
        except SessionRefused as e:
            await self._abort(context, _REFUSAL_CODES[e.reason], str(e))
        self.metrics.sessions_opened.inc()
        self.sessions_changed.set()
        return session
