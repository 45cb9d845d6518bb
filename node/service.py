"""The node's gRPC service: Info, a stateless Forward and Backward, the Inference session stream, Push, and
Weights (a block's checkpoint tensors for a peer fetching them: node/weight_upload.py).

A session's inputs arrive in one inbox, from its client's stream or pushed by the previous node of
the chain (server-to-server hand-off); steps run in step_id order, a duplicate (a push that lost the
race against the client's relay of the same step) is answered from the last result, never computed
twice, so the KV cache never holds a position twice.

Every request is checked before any compute, and a tensor's declared shape and dtype before its
values are decoded: protocol version, on every message of a stream (FAILED_PRECONDITION); model and
block range, batch size, length, shape, dtype, NaN/inf, session ids, step order (each step the one
after the last; a client's replayed history, ``Step.replay``, may skip the ids merged into it),
hand-off targets (only nodes the DHT's records name for the block after the span),
a cache rollback (``Step.keep_length``) within the positions the cache holds (INVALID_ARGUMENT); cache
budget, open sessions and request rate per peer host (RESOURCE_EXHAUSTED);
draining for shutdown (UNAVAILABLE). A client's stream is read no faster than its steps are taken up
(at most ``_MAX_INBOX`` waiting), so nobody can queue unbounded work or memory here. Compute runs on the executor's thread;
only a short step of a node's single session may run on the event loop (see ``ComputeExecutor``). A long
step runs in chunks (``PREFILL_CHUNK_TOKENS``): a session whose client leaves stops within one chunk.
A session's cache is released however its stream ends.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
import torch

from homeswarm.model import BlockSpan, cache_bytes
from homeswarm.node import backward, lora_rpc
from homeswarm.node.adapters import SpanAdapters
from homeswarm.node.executor import ComputeExecutor
from homeswarm.node.handoff_targets import HandoffTargets, TargetsUnknown
from homeswarm.node.metrics import NodeMetrics
from homeswarm.node.peer_limits import PeerLimits, peer_host
from homeswarm.node.peers import PeerChannels
from homeswarm.node.sessions import Refusal, Session, SessionManager, SessionRefused
from homeswarm.node.weight_upload import WeightUploader
from homeswarm.node.wire import MalformedRequest
from homeswarm.protocol import (
    PROTOCOL_VERSION,
    CodecError,
    check_protocol_version,
    deserialize_tensor,
    node_pb2,
    node_pb2_grpc,
    serialize_tensor,
)
from homeswarm.routing.records import is_valid_address

logger = logging.getLogger(__name__)

_REFUSAL_CODES = {
    Refusal.NO_MEMORY: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Refusal.DRAINING: grpc.StatusCode.UNAVAILABLE,
}
_COMPRESSIONS = frozenset(node_pb2.Compression.values())
_HIDDEN_DTYPES = ("float32", "bfloat16", "float16")
_SESSION_ID = re.compile(r"[0-9a-f]{32}")  # what SessionManager hands out (uuid4().hex)

_MAX_INBOX = 64
# positions of a long step computed at once: a cancelled session stops within one chunk, and a chunk's
# attention scores stay bounded (a chunk of 512 after 4k cached positions: 512 x 4.5k per head)
PREFILL_CHUNK_TOKENS = 512


def _keep_length(step: node_pb2.Step) -> int | None:
    return step.keep_length if step.HasField("keep_length") else None


class BadRequest(Exception):
    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT):
        self.code = code
        super().__init__(message)


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
    keep_length: int | None = None  # cache rollback before appending (Step.keep_length), None: append only
    replay: bool = False  # a replayed history (Step.replay): its step id may skip those merged into it


@dataclass
class _LiveSession:
    session: Session
    compression: int
    inbox: asyncio.Queue = field(default_factory=asyncio.Queue)
    last_step_id: int = 0
    last_response: node_pb2.InferenceResponse | None = None
    pushes: set[asyncio.Task] = field(default_factory=set)
    # the client's steps read from its stream and not yet taken up: reading waits while it is full
    client_slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(_MAX_INBOX))
    adapter: str = ""  # the LoRA adapter every step runs with (OpenSession.adapter); "": the base weights
    view: BlockSpan | None = None  # the span with the client's own LoRA matrices (OpenSession.lora), if sent


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
    quant: str = "none"  # weight format (model.weight_format: none, int8, int4, int4-experts)
    block_digests: tuple[str, ...] = ()  # per block of the span, from the checkpoint files (model.digest)
    file_digests: dict[str, str] = field(default_factory=dict)  # client files it can send (node.weight_upload)


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
        peer_limits: PeerLimits | None = None,
        handoff_targets: HandoffTargets | None = None,
        corrupt_outputs: bool = False,
        prefill_chunk_tokens: int = PREFILL_CHUNK_TOKENS,
        weight_uploads: WeightUploader | None = None,
        adapters: SpanAdapters | None = None,
    ):
        """``peer_limits``: per-host sessions and request rate (None: unlimited); ``handoff_targets``:
        which addresses outputs may be pushed to (None: any well-formed address, for tests alone);
        ``corrupt_outputs``: add noise to every output (a faulty node, for testing the clients' checks)."""
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
        self._closing_pushes: set[asyncio.Task] = set()  # strong references: the loop keeps only weak ones
        self.metrics = metrics if metrics is not None else NodeMetrics()
        self.started = clock()
        self.peer_limits = peer_limits
        self.handoff_targets = handoff_targets
        self.corrupt_outputs = corrupt_outputs
        if prefill_chunk_tokens < 1:
            raise ValueError(f"prefill_chunk_tokens must be positive, got {prefill_chunk_tokens}")
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.weight_uploads = weight_uploads  # None: the Weights rpc answers UNAVAILABLE
        self.adapters = adapters  # LoRA adapters served beside the base weights (None: none)

    # --- helpers -------------------------------------------------------------------------------

    def _subspan(self, start: int, end: int, adapter: str = "") -> BlockSpan:
        """Blocks [start, end), with LoRA ``adapter`` applied when named (checked by ``_check_adapter``)."""
        if (start, end) == (self.span.start, self.span.end):
            span = self.span
        else:
            if (start, end) not in self._subspans:
                self._subspans[start, end] = self.span.subspan(start, end)
            span = self._subspans[start, end]
        if adapter and self.adapters is not None:
            return self.adapters.view(adapter, span)
        return span

    def _check_adapter(self, adapter: str) -> None:
        """BadRequest (NOT_FOUND) unless the node serves ``adapter`` ("" asks for the base weights)."""
        if adapter and (self.adapters is None or adapter not in self.adapters):
            message = (self.adapters.missing(adapter) if self.adapters is not None
                       else f"this node does not serve LoRA adapter {adapter[:80]!r} (it serves none)")
            raise BadRequest(message, grpc.StatusCode.NOT_FOUND)

    def _check_range(self, start: int, end: int) -> None:
        if not self.span.start <= start < end <= self.span.end:
            raise BadRequest(
                f"blocks [{start}, {end}) are not within this node's span [{self.span.start}, {self.span.end})"
            )

    def _decode_hidden(self, message: node_pb2.Tensor, batch_size: int | None, max_tokens: int) -> torch.Tensor:
        """The hidden states of a request; the declared dtype and shape are checked before decoding, so
        a message never makes the node allocate more than a valid one of its session could."""
        hidden_size = self.span.config.hidden_size
        shape = list(message.shape)
        if message.dtype not in _HIDDEN_DTYPES:
            raise BadRequest(f"hidden states must be {', '.join(_HIDDEN_DTYPES)}, got dtype {message.dtype!r}")
        if len(shape) != 3 or shape[-1] != hidden_size or shape[0] < 1 or shape[1] < 1:
            raise BadRequest(f"hidden states must be [batch, tokens, {hidden_size}], got {shape}")
        if batch_size is not None and shape[0] != batch_size:
            raise BadRequest(f"the session was opened for batch {batch_size}, got {shape[0]}")
        if shape[0] > self.max_batch_size or shape[1] > max_tokens:
            raise BadRequest(f"at most batch {self.max_batch_size} x {max_tokens} tokens, got {shape[:2]}")
        try:
            hidden = deserialize_tensor(message, max_elements=shape[0] * shape[1] * hidden_size)
        except CodecError as e:
            raise BadRequest(f"bad tensor: {e}") from None
        if not bool(torch.isfinite(hidden).all()):
            raise BadRequest("hidden states contain NaN or infinite values")
        return hidden.to(self.span.device, self.span.dtype)

    async def _check_next(self, session: Session, next_hops: list[node_pb2.NextHop]) -> None:
        """BadRequest unless every hand-off hop is well-formed and the first is a node serving the block
        after the session's span; TargetsUnknown when the swarm's records cannot be read."""
        if not next_hops:
            return
        following = self.span.config.num_hidden_layers - session.end
        if len(next_hops) > following:
            raise BadRequest(f"{len(next_hops)} next hops, but {following} blocks follow blocks "
                             f"{session.start}:{session.end}")
        for hop in next_hops:
            if not is_valid_address(hop.address):
                raise BadRequest(f"bad next hop address {hop.address[:80]!r}")
            if not _SESSION_ID.fullmatch(hop.session_id):
                raise BadRequest(f"bad next hop session id {hop.session_id[:80]!r}")
        if self.handoff_targets is not None:
            why = await self.handoff_targets.check(next_hops[0].address, session.end)
            if why is not None:
                raise BadRequest(why)

    async def _admit(self, context: grpc.aio.ServicerContext, request: object = None) -> str:
        """The calling peer's host, after counting the request against its rate limit and checking that
        it parsed."""
        host = peer_host(context.peer() or "")
        if self.peer_limits is not None:
            why = self.peer_limits.request(host, self.clock())
            if why is not None:
                await self._abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, why)
        if isinstance(request, MalformedRequest):
            await self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(request))
        return host

    def _encode(self, hidden: torch.Tensor, compression: int) -> node_pb2.Tensor:
        if self.corrupt_outputs:  # noise of half the values' root mean square
            hidden = hidden + 0.5 * hidden.float().pow(2).mean().sqrt().to(hidden.dtype) * torch.randn_like(hidden)
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
        await self._admit(context, request)
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
            block_digests=self.identity.block_digests,
            file_digests=self.identity.file_digests,
        )

    async def Forward(
        self, request: node_pb2.ForwardRequest, context: grpc.aio.ServicerContext
    ) -> node_pb2.ForwardResponse:
        await self._admit(context, request)
        await self._check_version(request.protocol_version, context)
        try:
            self._check_range(request.start_block, request.end_block)
            if request.response_compression not in _COMPRESSIONS:
                raise BadRequest(f"unknown compression {request.response_compression}")
            self._check_adapter(request.adapter)
            hidden = self._decode_hidden(request.hidden, None, self.max_session_length)
        except BadRequest as e:
            await self._abort(context, e.code, str(e))
        self.metrics.bytes_received.inc(request.ByteSize())
        span = self._subspan(request.start_block, request.end_block, request.adapter)
        # deep prompts, when sent; a client's own LoRA matrices (node/lora_rpc.py)
        output = await (lora_rpc.forward if request.lora else backward.forward)(self, request, span, hidden, context)
        response = node_pb2.ForwardResponse(hidden=self._encode(output, request.response_compression))
        self.metrics.bytes_sent.inc(response.ByteSize())
        return response

    async def Backward(
        self, request: node_pb2.BackwardRequest, context: grpc.aio.ServicerContext
    ) -> node_pb2.BackwardResponse:
        if isinstance(request, MalformedRequest):  # answered INVALID_ARGUMENT by the admission check
            await self._admit(context, request)
        if request.adapter or request.lora:  # through a served adapter or the client's LoRA: node/lora_rpc.py
            return await lora_rpc.backward(self, request, context)
        return await backward.backward(self, request, context)  # see node/backward.py

    async def Inference(
        self, request_iterator: AsyncIterator[node_pb2.InferenceRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[node_pb2.InferenceResponse]:
        host = await self._admit(context)
        try:
            first = await asyncio.wait_for(anext(request_iterator), self.session_idle_timeout)
        except (StopAsyncIteration, asyncio.TimeoutError):
            return
        if isinstance(first, MalformedRequest):
            await self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(first))
        await self._check_version(first.protocol_version, context)
        if first.WhichOneof("kind") != "open":
            await self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, "the first message must open the session")
        try:  # the client's own LoRA matrices, for the session's life (node/lora_rpc.py)
            view = lora_rpc.session_view(self, first.open)
        except BadRequest as e:
            await self._abort(context, e.code, str(e))
        if self.peer_limits is not None:
            why = self.peer_limits.open_session(host, self.clock())
            if why is not None:
                await self._abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, why)
        try:
            session = await self._open(first.open, context)
        except BaseException:
            if self.peer_limits is not None:
                self.peer_limits.close_session(host)
            raise
        live = _LiveSession(session, first.open.response_compression, adapter=first.open.adapter, view=view)
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
                    await self._abort(context, item.code, str(item))
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
            # a push already sent is left to finish (bounded by push_timeout): the client may close as soon
            # as the last node answers, before this node has read the push's acknowledgement, and
            # cancelling it then would leave a delivered push uncounted in Info
            for task in live.pushes:
                self._closing_pushes.add(task)
                task.add_done_callback(self._closing_pushes.discard)
            self._live.pop(session.session_id, None)
            self.executor.forget(session.cache)
            self.sessions.close(session.session_id)
            if self.peer_limits is not None:
                self.peer_limits.close_session(host)
            self.sessions_changed.set()
            logger.debug("session %s closed after %d steps", session.session_id, session.steps)

    async def _read_client(
        self, request_iterator: AsyncIterator[node_pb2.InferenceRequest], live: _LiveSession
    ) -> None:
        """Moves the client's steps into the session's inbox, where pushes from peers also land."""
        try:
            async for request in request_iterator:
                if isinstance(request, MalformedRequest):
                    live.inbox.put_nowait(BadRequest(str(request)))
                    return
                self.metrics.bytes_received.inc(request.ByteSize())
                error = check_protocol_version(request.protocol_version)
                if error is not None:
                    live.inbox.put_nowait(BadRequest(error, grpc.StatusCode.FAILED_PRECONDITION))
                    return
                if request.WhichOneof("kind") != "step":
                    live.inbox.put_nowait(BadRequest("a session is already open on this stream; send steps"))
                    return
                await live.client_slots.acquire()  # released when the step is taken up
                live.inbox.put_nowait(_Inbound(request.step.step_id, request.step.hidden, list(request.step.next),
                                               from_peer=False, keep_length=_keep_length(request.step),
                                               replay=request.step.replay))
        except (asyncio.CancelledError, grpc.RpcError):
            pass
        finally:
            live.inbox.put_nowait(None)

    async def Weights(self, request: node_pb2.WeightsRequest,
                      context: grpc.aio.ServicerContext) -> AsyncIterator[node_pb2.WeightsChunk]:
        """A block's checkpoint tensors for a peer fetching them (node.weight_upload)."""
        await self._admit(context, request)
        await self._check_version(request.protocol_version, context)
        if self.weight_uploads is None:
            await self._abort(context, grpc.StatusCode.UNAVAILABLE, "this node does not upload weights")
        async for chunk in self.weight_uploads.stream(request, context):
            self.metrics.bytes_sent.inc(len(chunk.data))
            yield chunk

    async def Push(self, request: node_pb2.PushRequest, context: grpc.aio.ServicerContext) -> node_pb2.PushResponse:
        await self._admit(context, request)
        await self._check_version(request.protocol_version, context)
        if not _SESSION_ID.fullmatch(request.session_id):
            await self._abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                              f"malformed session id {request.session_id[:80]!r}")
        live = self._live.get(request.session_id)
        if live is None:
            await self._abort(context, grpc.StatusCode.NOT_FOUND, f"no open session {request.session_id!r} here")
        try:
            if request.step.replay:
                raise BadRequest("a replayed history comes from the session's client, not in a push")
            hidden = self._decode_hidden(request.step.hidden, live.session.batch_size, live.session.max_length)
            await self._check_next(live.session, list(request.step.next))
        except BadRequest as e:
            await self._abort(context, e.code, str(e))
        except TargetsUnknown as e:
            await self._abort(context, grpc.StatusCode.UNAVAILABLE, str(e))
        if live.inbox.qsize() >= _MAX_INBOX:
            await self._abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, "the session's inbox is full")
        self.metrics.bytes_received.inc(request.ByteSize())
        live.inbox.put_nowait(_Inbound(request.step.step_id, hidden, list(request.step.next), from_peer=True,
                                       keep_length=_keep_length(request.step)))
        return node_pb2.PushResponse()

    async def _process(
        self, live: _LiveSession, item: _Inbound, context: grpc.aio.ServicerContext
    ) -> node_pb2.InferenceResponse | None:
        """Run one step; None for a duplicate of a step already done (a push that lost a race)."""
        session = live.session
        taken_up = time.perf_counter()
        if not item.from_peer:
            live.client_slots.release()
        if item.step_id > live.last_step_id + 1 and not (item.replay and not item.from_peer):
            message = (f"step {item.step_id} is out of order: the session is at step {live.last_step_id}, "
                       f"the next must be {live.last_step_id + 1}")
            if item.from_peer:
                logger.warning("dropping a push: %s", message)
                self.metrics.error("invalid_argument")
                return None
            await self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, message)
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
        handoff_unknown = None
        try:
            hidden = item.hidden
            if not isinstance(hidden, torch.Tensor):
                hidden = self._decode_hidden(hidden, session.batch_size, session.max_length)
            kept = session.cache.length
            if item.keep_length is not None:
                if not 0 <= item.keep_length <= session.cache.length:
                    raise BadRequest(f"keep_length {item.keep_length} is outside 0..{session.cache.length}, "
                                     f"the positions the session's cache holds")
                kept = item.keep_length
            if kept + hidden.shape[1] > session.max_length:
                raise BadRequest(
                    f"the session holds {kept} of {session.max_length} tokens; "
                    f"{hidden.shape[1]} more do not fit"
                )
            if not item.from_peer:  # a push's next hops were checked when it arrived
                try:
                    await self._check_next(session, item.next)
                except TargetsUnknown as e:  # not the client's fault: it relays this step instead
                    handoff_unknown, item.next = f"hand-off not attempted: {e}", []
        except BadRequest as e:
            if item.from_peer:
                logger.warning("dropping a bad push: %s", e)
                self.metrics.error("invalid_argument")
                return None
            await self._abort(context, e.code, str(e))
        if item.from_peer:
            self.stats.steps_from_peers += 1
        else:
            self.stats.steps_from_client += 1
        span = live.view if live.view is not None else self._subspan(session.start, session.end, live.adapter)
        if item.keep_length is not None:
            session.cache.truncate(item.keep_length)  # this session has no other step queued or running
        try:
            output, seconds = await self._compute(span, hidden, session, inline_ok=len(self._live) == 1)
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
            task = asyncio.create_task(self._push(live, item.next, item.step_id, result.hidden, item.keep_length))
            live.pushes.add(task)
            task.add_done_callback(live.pushes.discard)
        if handoff_unknown is not None:
            live.inbox.put_nowait(node_pb2.HandoffFailed(step_id=item.step_id, error=handoff_unknown))
        response = node_pb2.InferenceResponse(result=result)
        live.last_step_id = item.step_id
        live.last_response = response
        return response

    async def _compute(self, span: BlockSpan, hidden: torch.Tensor, session: Session, *,
                       inline_ok: bool) -> tuple[torch.Tensor, float]:
        """The step's output and compute seconds. A long step (a prompt, a replayed history) runs in chunks of
        ``prefill_chunk_tokens`` positions, each its own executor step (batched with other sessions' steps):
        a session whose stream ends (its handler cancelled) stops within one chunk, and other sessions' short
        steps are not held behind a whole prefill. ``inline_ok``: a single session has nothing to batch with,
        so a short step may skip the compute thread."""
        chunk = self.prefill_chunk_tokens
        if hidden.shape[1] <= chunk:
            return await self.executor.timed_step(span, hidden, session.cache, inline_ok=inline_ok)
        outputs, seconds = [], 0.0
        for begin in range(0, hidden.shape[1], chunk):
            output, took = await self.executor.timed_step(span, hidden[:, begin : begin + chunk], session.cache)
            outputs.append(output)
            seconds += took
        return torch.cat(outputs, dim=1), seconds

    async def _push(
        self, live: _LiveSession, next_hops: list[node_pb2.NextHop], step_id: int, hidden: node_pb2.Tensor,
        keep_length: int | None = None,
    ) -> None:
        """Hand the output to the next node; on failure, tell the client (it relays instead)."""
        target = next_hops[0]
        request = node_pb2.PushRequest(
            protocol_version=PROTOCOL_VERSION,
            session_id=target.session_id,
            step=node_pb2.Step(step_id=step_id, hidden=hidden, next=next_hops[1:], keep_length=keep_length),
        )
        try:
            relays = (self.handoff_targets.relays_of(target.address, target.peer_id) if self.handoff_targets
                      else tuple(target.relays))  # without records (tests), the client's word
            tls_cert = (self.handoff_targets.tls_cert_of(target.address, target.peer_id) if self.handoff_targets
                        else "")
            stub = await self.peers.stub(target.address, target.peer_id, relays, tls_cert)
            await stub.Push(request, timeout=self.push_timeout)
        except grpc.aio.AioRpcError as e:
            error = f"hand-off to {target.address} failed: {e.code().name}: {e.details()}"
        except (ValueError, RuntimeError, OSError) as e:  # e.g. a malformed address, no relayed path
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
            self._check_adapter(request.adapter)
        except BadRequest as e:
            await self._abort(context, e.code, str(e))
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
                mirror=request.mirror,
            )
        except SessionRefused as e:
            await self._abort(context, _REFUSAL_CODES[e.reason], str(e))
        self.metrics.sessions_opened.inc()
        self.sessions_changed.set()
        return session
