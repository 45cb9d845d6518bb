"""An inference session over a chain of nodes, with failover.

The session keeps, for every hop, the hidden states it sent in this session. When a node fails
(connection lost, timeout, error status) the session bans it, plans a replacement for exactly the
blocks that node served (possibly over several nodes), opens sessions there, replays the stored
inputs to rebuild their caches, and carries on, so the output is the same as without the failure. A
replay is a prefill of what the cache held (``client.replay``: few messages, each computed by the node
in chunks), not one step per recorded step.
A step may first roll every hop's cache back (``keep_length``, e.g. for rejected draft tokens); the
stored inputs record it, so a replay rebuilds the same cache. Each result's reported cache length is
checked against the session's: a node that disagrees (one that ignored a rollback) counts as failed.
With ``ClientConfig.mirrors``, every hop that has a second server of its blocks keeps a mirror session
there (``client.mirror``): it gets the hop's inputs too, each answer is compared with the hop's once the step
has been through every hop (a liar is caught and banned, the right answer used, the hops after it run again),
and a failed hop's mirror takes over with no replay. A hop with
no mirror may be checked as before: with ``ClientConfig.verify_fraction``, a random share of steps is
re-run on a second server of the same span (``client.verify``); a node caught returning wrong hidden
states is replaced the same way, and the step recomputed. A step is late after ``step_time_limit``; a late
node that still answers Info is waited for (busy), not taken for dead. ``close()`` from another thread
abandons the step in flight (SessionError), and the nodes stop its work.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import time
from collections.abc import Callable

import torch

from homeswarm.client.config import ClientConfig
from homeswarm.client.hop import OpenHop, SessionError, step_time_limit
from homeswarm.client.mirror import MirrorCheck, MirroredHops
from homeswarm.client.repeats import RepeatedFailures
from homeswarm.client.replay import replay_steps
from homeswarm.client.route import RouteManager
from homeswarm.client.transport import ChannelPool, HopFailed, HopStream, ping
from homeswarm.client.verify import Culprit, Verifier
from homeswarm.protocol import node_pb2, parse_compression
from homeswarm.routing.planner import Hop, MissingBlocksError

logger = logging.getLogger(__name__)


def use_handoff(config: ClientConfig, rtts: list[float | None]) -> bool:
    """Whether a route whose hops have these round trips (None: unknown) should use hand-off.

    Hand-off saves a network leg per hop but costs each node a push and the client an extra answer
    to read; it pays where legs are slow. On one machine or a LAN, relaying is cheaper (measured in
    docs/BENCHMARKS.md). A hop whose round trip is unknown counts as slow.
    """
    if not config.handoff or len(rtts) < 2:
        return False
    known = [rtt for rtt in rtts if rtt is not None]
    if len(known) < len(rtts):
        return True
    return sum(known) / len(known) >= config.handoff_min_rtt


class InferenceSession(MirroredHops):
    """Step hidden states [batch, tokens, hidden] through every block of the model, keeping caches."""

    def __init__(
        self,
        routes: RouteManager,
        pool: ChannelPool,
        config: ClientConfig,
        *,
        batch_size: int,
        max_length: int,
        lora: Callable[[int, int], list[node_pb2.LoraMatrices]] | None = None,
    ):
        """``lora``: blocks [start, end) -> the client's own LoRA matrices for them (``ClientLora.entries``),
        sent to every node of the session when its stream opens (None: none)."""
        self.routes = routes
        self.pool = pool
        self.config = config
        self.lora = lora
        self.batch_size = batch_size
        self.max_length = max_length
        self.length = 0
        self.failovers = 0
        self.replayed_tokens = 0  # positions replayed to replacement nodes (failover without a mirror)
        self.busy_waits = 0  # late answers waited for because the node still answered Info
        self.caught: list[str] = []  # peer ids of nodes caught returning wrong hidden states
        self.verifier = Verifier(pool, fraction=config.verify_fraction, compression=config.compression,
                                 timeout=config.forward_timeout, adapter=config.adapter, lora=lora)
        self._step_id = 0
        self._wakeups: queue.SimpleQueue = queue.SimpleQueue()  # hop streams signal arrivals here
        self._hops: list[OpenHop] = []
        self._closed = False
        self.mirror_checks = 0  # hop answers compared with a mirror's
        self.promotions = 0  # failed or caught primaries replaced by their mirror (no replay)
        self.reruns = 0  # steps sent again to the hops after one caught by its mirror (they had its wrong answer)
        self.mirror_wait = 0.0  # seconds steps spent on their mirrors' answers after the last hop's (the check)
        self._unmirrored: set[tuple[int, int]] = set()  # spans said to have no mirror (once each)
        self._repeats = RepeatedFailures(logger)  # a hand-off failing at every step is logged once
        try:
            for hop in self._plan(0, routes.num_blocks):
                self._hops.append(hop)
            for index in range(len(self._hops)):
                self._start_mirror(index)
        except BaseException:
            self.close()
            raise

    # --- opening -------------------------------------------------------------------------------

    def _open_stream(self, hop: Hop, *, mirror: bool = False) -> HopStream:
        return HopStream(
            self.pool,
            peer_id=hop.peer_id,
            address=hop.address,
            model=self.routes.model,
            start=hop.start,
            end=hop.end,
            batch_size=self.batch_size,
            max_length=self.max_length,
            compression=self._compression_for(hop),
            connect_timeout=self.config.connect_timeout,
            step_timeout=self.config.step_timeout,
            wakeups=self._wakeups,
            mirror=mirror,
            adapter=self.config.adapter,
            lora=self.lora(hop.start, hop.end) if self.lora is not None else (),
        )

    def _compression_for(self, hop: Hop) -> int:
        """The wire compression for one hop: fixed by the config, or with "auto" lossless on fast
        links (round trip under ``auto_compression_rtt``) and float16 where bandwidth matters."""
        if self.config.compression != "auto":
            return parse_compression(self.config.compression)
        rtt = self.routes.rtts.get(hop.peer_id)
        slow = rtt is None or rtt >= self.config.auto_compression_rtt
        return parse_compression("float16" if slow else "none")

    def _plan(self, start: int, end: int) -> list[OpenHop]:
        """Open streams covering [start, end); retries with a new plan when a node refuses."""
        while True:
            route = self.routes.plan(start, end, cache_tokens_needed=self.batch_size * self.max_length,
                                     adapter=self.config.adapter)
            opened: list[OpenHop] = []
            try:
                for hop in route:
                    opened.append(OpenHop(hop.start, hop.end, self._open_stream(hop), server=hop.server))
                return opened
            except HopFailed as e:
                for h in opened:
                    assert h.stream is not None
                    h.stream.close()
                self._count_failure(e)

    def _count_failure(self, e: HopFailed) -> None:
        self.failovers += 1
        logger.warning("%s; routing around it", e)
        self.routes.ban(e.peer_id)
        if self.failovers > self.config.max_failovers:
            raise SessionError(f"gave up after {self.failovers} node failures; last: {e}") from e

    # --- stepping ------------------------------------------------------------------------------

    def step(self, hidden: torch.Tensor, keep_length: int | None = None) -> torch.Tensor:
        """Run ``hidden`` [batch, tokens, hidden] through every block; with ``keep_length``, every hop first
        keeps only that many positions of its cache (the tokens after them are forgotten)."""
        if self._closed:
            raise SessionError("the session is closed")
        if hidden.dim() != 3 or hidden.shape[0] != self.batch_size:
            raise ValueError(f"expected hidden states [{self.batch_size}, tokens, hidden], got {list(hidden.shape)}")
        if keep_length is not None and not 0 <= keep_length <= self.length:
            raise ValueError(f"keep_length must be in 0..{self.length} (the session's length), got {keep_length}")
        kept = self.length if keep_length is None else keep_length
        if kept + hidden.shape[1] > self.max_length:
            raise ValueError(
                f"the session holds {kept} of {self.max_length} tokens; {hidden.shape[1]} more do not fit"
            )
        expected_length = kept + hidden.shape[1]
        verify = self.verifier.pick_step()
        self._adopt_mirrors()
        # a checked step (by a re-run or by mirrors) is relayed: the client sees every output, and none is returned
        # before it is checked
        handoff = (self._use_handoff() and not verify and not any(h.mirror for h in self._hops)
                   and not any(self._skips(k, self._step_id + 1) for k in range(1, len(self._hops))))
        first, keep = 0, keep_length
        while True:
            self._step_id += 1
            output, checks = self._through(first, self._step_id, hidden, keep, expected_length, verify, handoff)
            # mirrors' answers are compared once the last hop has answered: each mirror computed beside the hops
            # after its own, off the step's critical path
            t0 = time.perf_counter()
            redo = self._settle(checks, expected_length)
            self.mirror_wait += time.perf_counter() - t0
            if redo is None:
                break
            first, right = redo  # hop first - 1 was caught: the hops after it computed from its wrong answer
            if first >= len(self._hops):
                output = right.to(hidden.dtype)
                break
            hidden, keep = right.to(hidden.dtype), kept  # they go again from the right answer, rolled back first
            self.reruns += 1
        self.length = expected_length
        return output

    def _through(self, first: int, step_id: int, hidden: torch.Tensor, keep_length: int | None, expected_length: int,
                 verify: bool, handoff: bool) -> tuple[torch.Tensor, list[MirrorCheck]]:
        """Step ``hidden`` through hops ``first``.. as step ``step_id``: (the last hop's output, the mirrored hops'
        answers still to compare with their mirrors')."""
        dtype = hidden.dtype
        checks: list[MirrorCheck] = []
        self._drain_wakeups()
        i = first
        need_send = True  # False while hop i gets its input pushed by the previous node
        relayed = False  # whether the client already sent hop i its input after a failed hand-off
        tokens = hidden.shape[0] * hidden.shape[1]
        waited_since, deadline = self._clock_for(first, tokens)
        while i < len(self._hops):
            hop = self._hops[i]
            assert hop.stream is not None
            try:
                if need_send:
                    self._send(i, step_id, hidden, handoff, keep_length)
                    need_send = False
                event = hop.stream.poll(step_id)
                if (event is None and i > 0 and handoff and not relayed
                        and self._handoff_failed(i - 1, step_id)):
                    need_send = relayed = True  # relay what the previous node could not push
                    continue
                if event is None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        deadline = self._wait_longer(hop, step_id, waited_since)
                        continue
                    with contextlib.suppress(queue.Empty):
                        self._wakeups.get(timeout=remaining)
                    continue
                if event[0] == "result" and hop.stream.last_cache_length != expected_length:
                    raise HopFailed(hop.stream.peer_id, hop.stream.address,
                                    f"its cache holds {hop.stream.last_cache_length} positions after step "
                                    f"{step_id}, {expected_length} expected")
                output = event[1]
                if hop.mirror is not None:
                    checks.append(MirrorCheck(i, step_id, hidden, keep_length, output))
                elif verify and self._caught(i, hidden, keep_length, output):
                    self._replace(i)
                    need_send = True
                    waited_since, deadline = self._clock_for(i, tokens)
                    continue
            except HopFailed as e:
                if self._closed:  # closed from another thread (the caller gave up): nobody failed
                    raise SessionError(f"the session was closed during step {step_id}") from None
                self._count_failure(e)
                if hop.mirror is not None and e.peer_id == hop.stream.peer_id:
                    sent = hop.mirror_step == step_id
                    self._promote(i, f"{e}")  # its mirror holds the same cache: no replay
                    need_send = not sent  # else its answer to this step is on the way
                else:
                    self._replace(i, cause=e)  # the replacement hops start at index i and have replayed the history
                    need_send = True
                waited_since, deadline = self._clock_for(i, tokens)
                continue
            if i > 0 and handoff and not relayed:  # hop i got its input pushed: that hand-off works
                self._repeats.cleared(self._handoff_key(i - 1), time.monotonic())
            hop.inputs.append((step_id, hidden, keep_length))
            hidden = output.to(dtype)
            i += 1
            need_send = not handoff
            relayed = False
            waited_since, deadline = self._clock_for(i, tokens)
        return hidden, checks

    def _clock_for(self, index: int, tokens: int) -> tuple[float, float]:
        """(now, when to check on hop ``index`` if its answer to a step of ``tokens`` positions has not come)."""
        now = time.monotonic()
        if index >= len(self._hops):
            return now, now
        hop = self._hops[index]
        return now, now + step_time_limit(self.config, hop.server, hop.end - hop.start, tokens)

    def _wait_longer(self, hop: OpenHop, step_id: int, waited_since: float) -> float:
        """A new deadline for a hop whose answer is late, if the node still answers Info (it is busy, e.g.
        behind another session's prefill) and ``max_step_wait`` is not spent; else HopFailed saying which."""
        stream = hop.stream
        assert stream is not None
        waited = time.monotonic() - waited_since
        try:
            _, info = ping(self.pool, stream.peer_id, stream.address, self.config.connect_timeout)
        except HopFailed as e:
            raise HopFailed(stream.peer_id, stream.address, f"no answer to step {step_id} after {waited:.0f} s, "
                            f"and no answer to Info either ({e.code.name if e.code else e})", e.code) from None
        state = (f"{info.active_sessions} session(s) open, {info.forward_passes} forward passes since start, "
                 f"{info.cache_tokens_left} cache tokens free")
        if waited >= self.config.max_step_wait:
            raise HopFailed(stream.peer_id, stream.address, f"no answer to step {step_id} after {waited:.0f} s "
                            f"though it answers Info ({state}): stuck or overloaded")
        logger.info("node %s (%s) has not answered step %d after %.0f s but answers Info (%s): busy, waiting",
                    stream.address, stream.peer_id[:16], step_id, waited, state)
        self.busy_waits += 1
        return time.monotonic() + min(self.config.step_timeout, self.config.max_step_wait - waited)

    @property
    def uses_handoff(self) -> bool:
        """Whether the next step goes by hand-off (else the client relays each hop's output)."""
        return self._use_handoff()

    def _use_handoff(self) -> bool:
        return use_handoff(self.config, [self.routes.rtts.get(h.stream.peer_id) if h.stream else None
                                         for h in self._hops])

    def _send(self, index: int, step_id: int, hidden: torch.Tensor, handoff: bool,
              keep_length: int | None = None) -> None:
        """Send hop ``index`` its input; with hand-off, it passes its output down the rest of the chain."""
        hop = self._hops[index]
        stream = hop.stream
        assert stream is not None
        skips = self._skips(index, step_id)
        rest = self._hops[index + 1 :] if handoff else []
        try:
            stream.send(step_id, hidden, [(h.stream.address, h.stream.session_id, h.stream.peer_id) for h in rest
                                          if h.stream], keep_length, replay=skips)
        finally:  # the hop first (the step waits for its answer), then its mirror (checked after the last hop)
            if hop.mirror is not None:
                try:
                    hop.mirror.send(step_id, hidden, (), keep_length, replay=skips)
                    hop.mirror_step = step_id
                except HopFailed as e:
                    self._drop_mirror(index, e)

    def _skips(self, index: int, step_id: int) -> bool:
        """Whether step ``step_id`` skips ids hop ``index`` never got: steps sent again to the hops after a hop
        caught by its mirror (``reruns``) have ids of their own. Sent as ``Step.replay``, which lets an id skip
        (a push cannot: such a step is relayed)."""
        hop = self._hops[index]
        return step_id > (hop.inputs[-1][0] if hop.inputs else 0) + 1

    def _handoff_failed(self, index: int, step_id: int) -> bool:
        """Whether hop ``index`` reports (after its result) that it could not push to the next hop.
        A hop that died after answering counts too: its push may be lost, so the client relays."""
        stream = self._hops[index].stream
        assert stream is not None
        try:
            event = stream.poll(step_id)
        except HopFailed as e:
            self._repeats.failed(self._handoff_key(index), f"{e} after answering; relaying its output",
                                 time.monotonic())
            return True
        if event is not None and event[0] == "handoff_failed":
            self._repeats.failed(self._handoff_key(index), f"{event[1]}; relaying through the client",
                                 time.monotonic())
            return True
        return False

    def _handoff_key(self, index: int) -> tuple[str, str]:
        """Which hand-off a failure is of (the pushing node, the next hop's address): logged once each."""
        pusher, target = self._hops[index].stream, self._hops[index + 1].stream
        return (pusher.peer_id if pusher else "?", target.address if target else "?")

    def _caught(self, index: int, hidden: torch.Tensor, keep_length: int | None, output: torch.Tensor) -> bool:
        """Check hop ``index``'s ``output`` for input ``hidden`` against a replica; True if the hop was caught
        (it is then banned); a replica caught instead is banned and the output kept."""
        hop = self._hops[index]
        if hop.server is None:
            return False
        history = hidden[:, :0]  # what the hop's cache holds, rollbacks applied, then this step's input
        for _, x, keep in [*hop.inputs, (0, hidden, keep_length)]:
            history = torch.cat([history if keep is None else history[:, :keep], x.to(hidden.dtype)], dim=1)
        replicas = self.verifier.replicas(hop.server, hop.start, hop.end, self.routes.records(),
                                          banned=self.routes.is_banned)
        verdict = self.verifier.check(hop.server, hop.start, hop.end, history, output, replicas)
        if verdict.culprit is Culprit.NONE:
            return False
        assert verdict.replica is not None
        if verdict.culprit is Culprit.UNDECIDED:
            raise SessionError(
                f"nodes {hop.server.address} and {verdict.replica.address} disagree on blocks {hop.start}:"
                f"{hop.end} (relative error {verdict.error:.3g}) and no third server can tell which is right")
        wrong = hop.server if verdict.culprit is Culprit.HOP else verdict.replica
        right = verdict.replica if verdict.culprit is Culprit.HOP else hop.server
        logger.warning(
            "node %s (%s) returned wrong hidden states for blocks %d:%d (relative error %.3g against %s); "
            "banned for %.0f s%s", wrong.address, wrong.peer_id[:16], hop.start, hop.end, verdict.error,
            right.address, self.config.caught_ban_seconds,
            ", recomputing the step" if verdict.culprit is Culprit.HOP else "")
        self.routes.ban(wrong.peer_id, seconds=self.config.caught_ban_seconds)
        self.caught.append(wrong.peer_id)
        return verdict.culprit is Culprit.HOP

    def _drain_wakeups(self) -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                self._wakeups.get_nowait()

    def _replace(self, index: int, cause: HopFailed | None = None) -> None:
        """Replace hop ``index`` by new hops over the same blocks, replaying its inputs on them. With no
        server left for its blocks, SessionError names the failure (``cause``) and the blocks."""
        failed = self._hops[index]
        if failed.stream is not None:
            failed.stream.close()
        replay = replay_steps(failed.inputs)  # the cache's contents, rollbacks applied, in few messages
        length = sum(hidden.shape[1] for _, hidden in replay)
        while True:
            try:
                new_hops = self._plan(failed.start, failed.end)
            except MissingBlocksError as e:
                why = f"{cause}; " if cause is not None else ""
                raise SessionError(f"{why}no other server can take over: {e}") from e
            try:
                for step_id, step_inputs in replay:
                    hidden = step_inputs
                    for hop in new_hops:
                        assert hop.stream is not None
                        hop.inputs.append((step_id, hidden, None))
                        limit = step_time_limit(self.config, hop.server, hop.end - hop.start, hidden.shape[1])
                        hidden = hop.stream.replay(step_id, hidden, timeout=limit).to(step_inputs.dtype)
                for hop in new_hops:
                    assert hop.stream is not None
                    if replay and hop.stream.last_cache_length != length:
                        raise HopFailed(hop.stream.peer_id, hop.stream.address,
                                        f"its cache holds {hop.stream.last_cache_length} positions after the "
                                        f"replay, {length} expected")
                break
            except HopFailed as e:
                for hop in new_hops:
                    assert hop.stream is not None
                    hop.stream.close()
                self._count_failure(e)
        if failed.mirror is not None:
            failed.mirror.close()
        if failed.building is not None:
            failed.building.cancel()
        self._hops[index : index + 1] = new_hops
        for k in range(index, index + len(new_hops)):
            self._start_mirror(k)
        self.replayed_tokens += length
        logger.info(
            "blocks %d:%d now served by %s (replayed %d position(s) in %d step(s))",
            failed.start, failed.end, ", ".join(h.stream.address for h in new_hops if h.stream), length,
            len(replay),
        )

    @property
    def route(self) -> list[tuple[str, int, int]]:
        """(address, start, end) of every hop, in order."""
        return [(h.stream.address if h.stream else "?", h.start, h.end) for h in self._hops]

    @property
    def hops(self) -> list[Hop]:
        """Every hop of the current route, in order, with the server record it was planned from."""
        return [Hop(h.server, h.start, h.end) for h in self._hops if h.server is not None]

    @property
    def mirrors(self) -> list[tuple[str, int, int]]:
        """(address, start, end) of every hop's mirror, in route order (hops without one left out)."""
        return [(h.mirror.address, h.start, h.end) for h in self._hops if h.mirror is not None]

    def close(self) -> None:
        """End the session on every node. From another thread while a step is in flight, it cancels the nodes'
        work (a node stops a prefill within one chunk) and the step raises SessionError."""
        self._closed = True
        self._repeats.flush(time.monotonic())
        for hop in self._hops:
            if hop.stream is not None:
                hop.stream.close()
            if hop.mirror is not None:
                hop.mirror.close()
            if hop.building is not None:
                hop.building.cancel()

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
