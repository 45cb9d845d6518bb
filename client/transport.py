"""Synchronous gRPC plumbing of the client: channels, pings, and one session stream per hop.

The client is synchronous end to end (the node is the asyncio side): each hop's bidirectional
stream is fed from a queue, and every wait on it is bounded by a timeout that cancels the call, so
a dead or stalled node surfaces as ``HopFailed`` within that timeout instead of a hang.

``ChannelPool`` hides how a node is reached: a node whose record names relays is dialled through a
loopback forwarder that carries the connection over libp2p (``homeswarm.routing.relay``); every other
node at its address. Callers pass the peer id along with the address and never see the difference.
A node whose record carries a TLS certificate (``note_tls``) is dialled over TLS that trusts that
certificate alone (``homeswarm.routing.tls``), through a forwarder too; one without, in plaintext, unless
the pool requires TLS. A node presenting another certificate fails the handshake: ``HopFailed`` says so.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import torch

from homeswarm.protocol import (
    PROTOCOL_VERSION,
    CodecError,
    deserialize_tensor,
    node_pb2,
    node_pb2_grpc,
    serialize_tensor,
)
from homeswarm.protocol.limits import GRPC_OPTIONS
from homeswarm.routing.tls import channel_credentials, channel_options, explain, fingerprint

_CLOSE = object()


class HopFailed(Exception):
    """A node failed to serve a request: unreachable, timed out, or answered with an error status."""

    def __init__(self, peer_id: str, address: str, message: str, code: grpc.StatusCode | None = None):
        self.peer_id = peer_id
        self.address = address
        self.code = code
        super().__init__(f"node {address} ({peer_id[:16]}…): {message}")


class ChannelPool:
    def __init__(self, forwarder: Callable[[str, Sequence[str]], str] | None = None, *,
                 require_tls: bool = False) -> None:
        """``forwarder(peer_id, relays)``: a loopback HOST:PORT that reaches a relayed node (None: no relaying);
        ``require_tls``: refuse nodes with no TLS certificate noted instead of dialling them in plaintext."""
        self._channels: dict[str, grpc.Channel] = {}
        self._relays: dict[str, tuple[str, ...]] = {}
        self._certs: dict[str, str] = {}
        self.require_tls = require_tls
        self._forwarder = forwarder
        self._lock = threading.Lock()

    def note_relays(self, peer_id: str, relays: Sequence[str]) -> None:
        """Reach ``peer_id`` through ``relays`` from now on (empty: at its address). From its newest record."""
        with self._lock:
            if tuple(relays) != self._relays.get(peer_id, ()):
                for key in [k for k in self._channels if k.startswith(f"relayed:{peer_id}|")]:
                    old = self._channels.pop(key)
                    if not relays:
                        old.close()  # it became reachable directly; sessions already open keep their calls
                self._relays[peer_id] = tuple(relays)

    def note_tls(self, peer_id: str, tls_cert: str) -> None:
        """Dial ``peer_id`` over TLS pinned to ``tls_cert`` from now on ("": in plaintext). From its signed record."""
        with self._lock:
            self._certs[peer_id] = tls_cert

    def pinned(self, peer_id: str) -> str:
        """The fingerprint of the certificate ``peer_id`` is dialled over TLS with ("": in plaintext)."""
        with self._lock:
            cert = self._certs.get(peer_id, "")
        return fingerprint(cert) if cert else ""

    def relays(self, peer_id: str) -> tuple[str, ...]:
        with self._lock:
            return self._relays.get(peer_id, ())

    def get(self, address: str, peer_id: str = "") -> grpc.Channel:
        with self._lock:
            relays = self._relays.get(peer_id, ()) if peer_id else ()
            cert = self._certs.get(peer_id, "") if peer_id else ""
            if not cert and self.require_tls:
                raise HopFailed(peer_id, address, "the node's record pins no TLS certificate (it runs --insecure), "
                                "and this client requires TLS", grpc.StatusCode.FAILED_PRECONDITION)
            key = f"{f'relayed:{peer_id}' if relays else address}|{fingerprint(cert) if cert else ''}"
            if key not in self._channels:
                target = address
                if relays:
                    if self._forwarder is None:
                        raise HopFailed(peer_id, address, "the node is reached through relays, and this client "
                                        "has no libp2p peer to use them", grpc.StatusCode.UNAVAILABLE)
                    try:
                        target = self._forwarder(peer_id, relays)
                    except Exception as e:  # noqa: BLE001 - a malformed relay, or the DHT process gone
                        raise HopFailed(peer_id, address, f"no relayed path: {e}",
                                        grpc.StatusCode.UNAVAILABLE) from None
                if cert:
                    self._channels[key] = grpc.secure_channel(target, channel_credentials(cert),
                                                              options=channel_options(GRPC_OPTIONS))
                else:
                    self._channels[key] = grpc.insecure_channel(target, options=GRPC_OPTIONS)
            return self._channels[key]

    def stub(self, address: str, peer_id: str = "") -> node_pb2_grpc.NodeStub:
        return node_pb2_grpc.NodeStub(self.get(address, peer_id))

    def close(self) -> None:
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()


def ping(pool: ChannelPool, peer_id: str, address: str, timeout: float) -> tuple[float, node_pb2.InfoResponse]:
    """(round-trip seconds, node info), or HopFailed.

    The round trip is timed on a second call: the first may include opening the connection (TCP and
    HTTP/2 set-up, several round trips), which would make a near node look far.
    """
    stub = pool.stub(address, peer_id)
    request = node_pb2.InfoRequest(protocol_version=PROTOCOL_VERSION)
    try:
        stub.Info(request, timeout=timeout)
        t0 = time.perf_counter()
        info = stub.Info(request, timeout=timeout)
    except grpc.RpcError as e:
        raise HopFailed(peer_id, address, f"ping failed: {e.code().name}: "
                        f"{explain(e.details(), pool.pinned(peer_id))}", e.code()) from None
    return time.perf_counter() - t0, info


class HopStream:
    """One open inference session on one node, for blocks [start, end)."""

    def __init__(
        self,
        pool: ChannelPool,
        *,
        peer_id: str,
        address: str,
        model: str,
        start: int,
        end: int,
        batch_size: int,
        max_length: int,
        compression: int,
        connect_timeout: float,
        step_timeout: float,
        wakeups: queue.SimpleQueue | None = None,
        mirror: bool = False,
        adapter: str = "",
        lora: Sequence[node_pb2.LoraMatrices] = (),
    ):
        """``mirror``: open a mirror session (``OpenSession.mirror``: a node short of cache refuses it first);
        ``adapter``: the LoRA adapter the node runs the session's steps with ("": the base weights); ``lora``:
        the client's own LoRA matrices for the blocks (OpenSession.lora)."""
        self.peer_id = peer_id
        self._wakeups = wakeups
        self.address = address
        self.start = start
        self.end = end
        self.compression = compression
        self.step_timeout = step_timeout
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self.last_compute_seconds = 0.0  # the node's forward pass for the last result received
        self.last_cache_length = 0  # positions in the node's cache after the last result received
        self._pool = pool
        self._call = pool.stub(address, peer_id).Inference(iter(self._queue.get, _CLOSE))
        self._responses: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._read, name=f"hop-{address}", daemon=True).start()
        self._queue.put(
            node_pb2.InferenceRequest(
                protocol_version=PROTOCOL_VERSION,
                open=node_pb2.OpenSession(
                    model=model,
                    start_block=start,
                    end_block=end,
                    batch_size=batch_size,
                    max_length=max_length,
                    response_compression=compression,
                    mirror=mirror,
                    adapter=adapter,
                    lora=list(lora),
                ),
            )
        )
        response = self._receive(connect_timeout)
        if response is None or response.WhichOneof("kind") != "opened":
            self.close()
            raise HopFailed(peer_id, address, "the node did not open the session")
        self.session_id = response.opened.session_id

    def _read(self) -> None:
        """Reader thread: moves responses (or the stream's end or error) into a queue that the
        session waits on with a timeout (cheaper than a timer per wait), and wakes the session."""
        try:
            for response in self._call:
                self._responses.put(response)
                if self._wakeups is not None:
                    self._wakeups.put(self)
            self._responses.put(StopIteration())
        except grpc.RpcError as e:
            self._responses.put(e)
        if self._wakeups is not None:
            self._wakeups.put(self)

    def _fail(self, message: str, code: grpc.StatusCode | None = None) -> HopFailed:
        self.close()
        return HopFailed(self.peer_id, self.address, message, code)

    def _receive(self, timeout: float | None) -> node_pb2.InferenceResponse | None:
        """The next response, waiting up to ``timeout`` s (None: only what has arrived already)."""
        try:
            item = self._responses.get(timeout=timeout) if timeout is not None else self._responses.get_nowait()
        except queue.Empty:
            if timeout is None:
                return None
            raise self._fail(f"no answer within {timeout:g} s", grpc.StatusCode.DEADLINE_EXCEEDED) from None
        if isinstance(item, grpc.RpcError):
            raise self._fail(f"{item.code().name}: {explain(item.details(), self._pool.pinned(self.peer_id))}",
                             item.code())
        if isinstance(item, StopIteration):
            raise self._fail("the node closed the session")
        return item

    def send(self, step_id: int, hidden: torch.Tensor, next_hops: Sequence[tuple[str, str, str]] = (),
             keep_length: int | None = None, *, replay: bool = False) -> None:
        """Queue a step; with ``next_hops`` ((address, session_id, peer_id), ...) the node hands its output on;
        with ``keep_length`` the node first keeps only that many positions of its cache (rollback); ``replay``:
        a history merged into this step (``Step.replay``: its id may skip those merged)."""
        if self._closed:
            raise HopFailed(self.peer_id, self.address, "the session is closed")
        self._queue.put(
            node_pb2.InferenceRequest(
                protocol_version=PROTOCOL_VERSION,
                step=node_pb2.Step(
                    step_id=step_id,
                    hidden=serialize_tensor(hidden, self.compression),
                    next=[node_pb2.NextHop(address=a, session_id=s, peer_id=p, relays=self._pool.relays(p))
                          for a, s, p in next_hops],
                    keep_length=keep_length,
                    replay=replay,
                ),
            )
        )

    def poll(self, step_id: int, timeout: float | None = None) -> tuple[str, Any] | None:
        """The next event of step ``step_id``: ("result", hidden) or ("handoff_failed", error); None if
        nothing has arrived (waits up to ``timeout`` s when given). Messages of older steps are skipped
        (answers to a step that a peer's push and the client's relay both delivered)."""
        if self._closed:
            raise HopFailed(self.peer_id, self.address, "the session is closed")
        while True:
            response = self._receive(timeout)
            if response is None:
                return None
            kind = response.WhichOneof("kind")
            if kind == "result":
                current = response.result.step_id
            elif kind == "handoff_failed":
                current = response.handoff_failed.step_id
            else:
                raise self._fail(f"unexpected {kind!r} message in a running session")
            if current < step_id:
                continue
            if current > step_id:
                raise self._fail(f"the node answered step {current} while step {step_id} was expected")
            if kind == "handoff_failed":
                return "handoff_failed", response.handoff_failed.error
            self.last_compute_seconds = response.result.compute_seconds
            self.last_cache_length = response.result.cache_length
            try:
                return "result", deserialize_tensor(response.result.hidden)
            except CodecError as e:
                raise self._fail(f"malformed hidden states: {e}") from None

    def receive(self, step_id: int, timeout: float | None = None) -> torch.Tensor:
        """Wait for the output of step ``step_id`` (at most ``timeout``, default ``step_timeout``, s)."""
        timeout = self.step_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._fail(f"no answer to step {step_id} within {timeout:g} s", grpc.StatusCode.DEADLINE_EXCEEDED)
            event = self.poll(step_id, timeout=remaining)
            if event is not None and event[0] == "result":
                return event[1]

    def step(self, step_id: int, hidden: torch.Tensor, keep_length: int | None = None) -> torch.Tensor:
        """Send one step and wait for its output (client relay)."""
        self.send(step_id, hidden, keep_length=keep_length)
        return self.receive(step_id)

    def replay(self, step_id: int, hidden: torch.Tensor, timeout: float | None = None) -> torch.Tensor:
        """Send a replayed history (``client.replay``) as step ``step_id`` and wait for its output (client relay)."""
        self.send(step_id, hidden, replay=True)
        return self.receive(step_id, timeout)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(_CLOSE)
        self._call.cancel()
