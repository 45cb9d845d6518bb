"""Mirror sessions: a second server of a hop's blocks that gets the same inputs and keeps its own cache.

The session sends every input of a mirrored hop to both servers, goes on with the hop's answer, and compares it
with the mirror's once the step has been through every hop (``MirroredHops._settle``: the mirror computes beside
the hops after its own, off the step's critical path; ``client.verify``'s tolerance and judge). A disagreement
is settled by asking again and, if needed, a third server; the liar is banned. When the hop was wrong, the hops
after it go again from the right answer (their caches rolled back to before the step), so no step returns an
unchecked output. A failed primary is replaced by its mirror at once, whose cache already holds the history
(no replay).
A mirror opened mid-session (after a promotion or a replacement) is built here, on a thread of its own, from
a snapshot of the hop's history (``client.replay``), while the session goes on stepping; the session then
catches it up with the steps taken meanwhile (``MirrorBuild.upto``) and adopts it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from homeswarm.client.config import ClientConfig
from homeswarm.client.hop import OpenHop, SessionError, step_time_limit
from homeswarm.client.replay import StepRecord, cache_segments, replay_steps
from homeswarm.client.route import RouteManager
from homeswarm.client.transport import HopFailed, HopStream
from homeswarm.client.verify import Culprit, Verifier, judge, rel_err, tolerance
from homeswarm.routing.planner import Hop
from homeswarm.routing.records import ServerRecord

logger = logging.getLogger(__name__)


class MirrorBuild:
    """Opens a mirror on the first of ``candidates`` that takes it and replays ``history`` to it, on a thread.

    ``open_stream(server)``: a mirror session on that server; ``time_limit(server, tokens)``: seconds one replayed
    message may take. Read ``stream``/``server`` once ``done`` is set (``stream`` None: no candidate took it)."""

    def __init__(self, candidates: Sequence[ServerRecord], history: Sequence[StepRecord],
                 open_stream: Callable[[ServerRecord], HopStream],
                 time_limit: Callable[[ServerRecord, int], float]) -> None:
        self.upto = len(history)
        self.stream: HopStream | None = None
        self.server: ServerRecord | None = None
        self.failures: list[HopFailed] = []
        self.done = threading.Event()
        self._cancelled = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, args=(list(candidates), list(history), open_stream,
                                                                 time_limit), name="mirror-build", daemon=True)
        self._thread.start()

    def _run(self, candidates: list[ServerRecord], history: list[StepRecord],
             open_stream: Callable[[ServerRecord], HopStream], time_limit: Callable[[ServerRecord, int], float]) -> None:
        messages = replay_steps(history)
        length = sum(hidden.shape[1] for _, hidden in messages)
        try:
            for server in candidates:
                if self._cancelled:
                    return
                stream = None
                try:
                    stream = open_stream(server)
                    for step_id, hidden in messages:
                        if self._cancelled:
                            break
                        stream.replay(step_id, hidden, timeout=time_limit(server, hidden.shape[1]))
                    if messages and stream.last_cache_length != length and not self._cancelled:
                        raise HopFailed(server.peer_id, server.address, f"its cache holds {stream.last_cache_length} "
                                        f"positions after the replay, {length} expected")
                except HopFailed as e:
                    self.failures.append(e)
                    if stream is not None:
                        stream.close()
                    continue
                with self._lock:
                    if self._cancelled:
                        stream.close()
                        return
                    self.stream, self.server = stream, server
                return
        finally:
            self.done.set()

    def cancel(self) -> None:
        """The session no longer wants the mirror: close it (now, or when its build ends)."""
        with self._lock:
            self._cancelled = True
            if self.stream is not None:
                self.stream.close()


class MirrorCheck(NamedTuple):
    """A mirrored hop's answer to a step, to compare with its mirror's once the step has gone through."""

    index: int  # the hop's place in the route
    step_id: int
    hidden: torch.Tensor  # the hop's input
    keep_length: int | None
    output: torch.Tensor  # the hop's answer


class MirroredHops:
    """The mirror side of an inference session (``client.session.InferenceSession`` inherits it): opening,
    building and adopting a hop's mirror, checking each answer against it, and promoting it when the hop fails
    or is caught. Holds no state of its own: it works on the session's hops and counters, declared here."""

    config: ClientConfig
    routes: RouteManager
    verifier: Verifier
    batch_size: int
    caught: list[str]
    mirror_checks: int
    promotions: int
    _hops: list[OpenHop]
    _closed: bool
    _unmirrored: set[tuple[int, int]]
    _open_stream: Callable[..., HopStream]

    def _mirror_candidates(self, hop: OpenHop, *exclude: str) -> list[ServerRecord]:
        if hop.server is None:
            return []
        return [r for r in self.verifier.replicas(hop.server, hop.start, hop.end, self.routes.records(),
                                                  banned=self.routes.is_banned) if r.peer_id not in exclude]

    def _start_mirror(self, index: int) -> None:
        """Give hop ``index`` a mirror where another server of its blocks takes one: opened at once while the hop
        has no history, else built in the background from its history (adopted by ``_adopt_mirrors``)."""
        hop = self._hops[index]
        if not self.config.mirrors or hop.server is None or hop.mirror is not None or hop.building is not None:
            return
        candidates = self._mirror_candidates(hop, hop.server.peer_id)
        if not candidates:
            if (hop.start, hop.end) not in self._unmirrored:
                self._unmirrored.add((hop.start, hop.end))
                logger.info("no second server of blocks %d:%d to mirror %s: its answers are unchecked%s",
                            hop.start, hop.end, hop.server.address,
                            "" if self.config.verify_fraction else " (--verify-fraction re-runs a share of steps)")
            return
        span = hop.end - hop.start

        def open_stream(server: ServerRecord) -> HopStream:
            return self._open_stream(Hop(server, hop.start, hop.end), mirror=True)

        def limit(server: ServerRecord, tokens: int) -> float:
            return step_time_limit(self.config, server, span, tokens * self.batch_size)

        build = MirrorBuild(candidates, hop.inputs, open_stream, limit)
        if hop.inputs:
            hop.building = build
            return
        build.done.wait()
        self._adopt(hop, build)

    def _adopt_mirrors(self) -> None:
        """Adopt the mirrors built in the background, catching them up with the steps taken meanwhile."""
        for hop in self._hops:
            if hop.building is not None and hop.building.done.is_set():
                build, hop.building = hop.building, None
                self._adopt(hop, build)

    def _adopt(self, hop: OpenHop, build: MirrorBuild) -> None:
        for e in build.failures:
            logger.info("no mirror on %s: %s", e.address, e)
        if build.stream is None or build.server is None:
            return
        stream, span = build.stream, hop.end - hop.start
        try:
            last = hop.inputs[build.upto - 1][0] if build.upto else 0
            for step_id, hidden, keep in hop.inputs[build.upto :]:
                limit = step_time_limit(self.config, build.server, span, hidden.shape[0] * hidden.shape[1])
                stream.send(step_id, hidden, (), keep, replay=step_id > last + 1)  # ids may skip (session.reruns)
                stream.receive(step_id, limit)
                last = step_id
        except HopFailed as e:
            logger.info("mirror %s failed while catching up: %s", stream.address, e)
            stream.close()
            return
        hop.mirror, hop.mirror_server = stream, build.server
        hop.mirror_step = hop.inputs[-1][0] if hop.inputs else 0
        logger.info("blocks %d:%d: %s mirrored by %s", hop.start, hop.end,
                    hop.stream.address if hop.stream else "?", stream.address)

    def _drop_mirror(self, index: int, e: HopFailed | None = None, *, ban: bool = True) -> None:
        """Hop ``index`` goes on without its mirror (which failed: ``e``), and starts building another."""
        hop = self._hops[index]
        if hop.mirror is None:
            return
        if e is not None:
            logger.warning("mirror of blocks %d:%d failed: %s", hop.start, hop.end, e)
            if ban:
                self.routes.ban(hop.mirror.peer_id)
        hop.mirror.close()
        hop.mirror, hop.mirror_server = None, None
        self._start_mirror(index)

    def _promote(self, index: int, why: str) -> None:
        """The mirror of hop ``index`` becomes its primary (same inputs, same cache): the failed or caught primary
        is closed, a new mirror built in the background."""
        hop = self._hops[index]
        assert hop.mirror is not None and hop.mirror_server is not None
        old = hop.stream
        if old is not None:
            old.close()
        hop.stream, hop.server = hop.mirror, hop.mirror_server
        hop.mirror, hop.mirror_server = None, None
        self.promotions += 1
        logger.info("blocks %d:%d now served by %s, their mirror (%s): no replay", hop.start, hop.end,
                    hop.stream.address, why)
        self._start_mirror(index)

    def _settle(self, checks: Sequence[MirrorCheck], expected_length: int) -> tuple[int, torch.Tensor] | None:
        """Compare each mirrored hop's answer to a step with its mirror's, in route order. None if every answer
        stands; else (the index after the first hop caught, its right output): the hops after it computed from
        a wrong input (their checks are moot) and go again."""
        for check in checks:
            right = self._mirror_check(check.index, check.step_id, check.hidden, check.keep_length, check.output,
                                       expected_length)
            if right is not check.output:
                return check.index + 1, right
        return None

    def _history(self, hop: OpenHop, step_id: int, hidden: torch.Tensor, keep_length: int | None) -> torch.Tensor:
        """Every position the hop's cache holds after step ``step_id``'s input, [batch, positions, hidden] (the
        hop's record of that step, if kept already, is the input given)."""
        before = [record for record in hop.inputs if record[0] < step_id]
        parts = [x.to(hidden.dtype) for _, x in cache_segments([*before, (step_id, hidden, keep_length)])]
        return torch.cat(parts, dim=1)

    def _mirror_check(self, index: int, step_id: int, hidden: torch.Tensor, keep_length: int | None,
                      output: torch.Tensor, expected_length: int) -> torch.Tensor:
        """The hop's output for this step once its mirror agrees (or the judge says whose answer is right)."""
        hop = self._hops[index]
        mirror, mirror_server, server = hop.mirror, hop.mirror_server, hop.server
        assert mirror is not None and mirror_server is not None and server is not None and hop.stream is not None
        tokens = hidden.shape[0] * hidden.shape[1]
        try:
            if hop.mirror_step != step_id:
                raise HopFailed(mirror.peer_id, mirror.address, f"step {step_id} never reached the mirror")
            limit = step_time_limit(self.config, mirror_server, hop.end - hop.start, tokens)
            answer = mirror.receive(step_id, limit)
            if mirror.last_cache_length != expected_length:
                raise HopFailed(mirror.peer_id, mirror.address, f"its cache holds {mirror.last_cache_length} "
                                f"positions after step {step_id}, {expected_length} expected")
        except HopFailed as e:
            if self._closed:
                raise SessionError(f"the session was closed during step {step_id}") from None
            self._drop_mirror(index, e)
            return output
        self.mirror_checks += 1
        tol = tolerance(server.dtype, server.quant, self.config.compression)
        error = rel_err(output, answer)
        if error <= tol:
            return output
        history = self._history(hop, step_id, hidden, keep_length)
        width = hidden.shape[1]
        start, end = hop.start, hop.end

        def again(record: ServerRecord) -> torch.Tensor:
            return self.verifier.forward(record, history, start, end)[:, -width:]

        def third() -> torch.Tensor | None:
            for other in self._mirror_candidates(hop, server.peer_id, mirror_server.peer_id):
                try:
                    return again(other)
                except HopFailed:
                    continue
            return None

        try:
            culprit = judge(output, answer, hop_again=lambda: again(server), replica_again=lambda: again(mirror_server),
                            third=third, tol=tol)
        except HopFailed as e:  # one of the two failed to answer the re-run: the other's answer stands
            culprit = Culprit.HOP if e.peer_id == server.peer_id else Culprit.REPLICA
        if culprit is Culprit.NONE:
            return output
        if culprit is Culprit.UNDECIDED:
            raise SessionError(
                f"nodes {server.address} and {mirror_server.address} disagree on blocks {start}:{end} "
                f"(relative error {error:.3g}) and no third server can tell which is right")
        wrong, right = (server, mirror_server) if culprit is Culprit.HOP else (mirror_server, server)
        logger.warning(
            "node %s (%s) returned wrong hidden states for blocks %d:%d (relative error %.3g against %s); "
            "banned for %.0f s%s", wrong.address, wrong.peer_id[:16], start, end, error, right.address,
            self.config.caught_ban_seconds, ", its mirror's answer used" if culprit is Culprit.HOP else "")
        self.routes.ban(wrong.peer_id, seconds=self.config.caught_ban_seconds)
        self.caught.append(wrong.peer_id)
        if culprit is Culprit.HOP:
            self._promote(index, f"{server.address} was caught")
            return answer
        self._drop_mirror(index, ban=False)
        return output
