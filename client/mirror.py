"""Mirror sessions: a second server of a hop's blocks that gets the same inputs and keeps its own cache.

The session sends every input of a mirrored hop to both servers and compares their answers (``client.verify``'s
tolerance and judge): a disagreement is settled by asking again and, if needed, a third server; the liar is
banned. A failed primary is replaced by its mirror at once, whose cache already holds the history (no replay).
A mirror opened mid-session (after a promotion or a replacement) is built here, on a thread of its own, from
a snapshot of the hop's history (``client.replay``), while the session goes on stepping; the session then
catches it up with the steps taken meanwhile (``MirrorBuild.upto``) and adopts it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from homeswarm.client.replay import StepRecord, replay_steps
from homeswarm.client.transport import HopFailed, HopStream
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
