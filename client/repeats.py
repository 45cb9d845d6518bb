"""Failures that repeat every step, logged once: the first occurrence in full, the repeats as one count.

A failure tied to a hop (a node that cannot hand its output to the next one, say, because it does not yet
know a replacement node) happens again at every step until it is cured; at a tiny model's hundred steps a
second, a line each would bury everything else in the log. ``RepeatedFailures`` logs a key's first failure,
counts the repeats, and logs the count in one line when the failure stops (``cleared``), when it has gone on
for ``every`` seconds, or at ``flush`` (the session's end). Time is passed in (``now``), so it is pure but for
the logger.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable
from dataclasses import dataclass


@dataclass
class _Repeat:
    first: str  # the message logged in full
    last: str  # the latest repeat's message
    since: float  # when the count started
    count: int = 0  # repeats not logged yet


class RepeatedFailures:
    """Logs each key's failure once, then one line per ``every`` seconds with how often it repeated."""

    def __init__(self, logger: logging.Logger, *, level: int = logging.INFO, every: float = 30.0) -> None:
        self.logger = logger
        self.level = level
        self.every = every
        self._open: dict[Hashable, _Repeat] = {}

    def failed(self, key: Hashable, message: str, now: float) -> None:
        """``message`` happened for ``key``: logged if it is the key's first failure, else counted."""
        repeat = self._open.get(key)
        if repeat is None:
            self._open[key] = _Repeat(message, message, now)
            self.logger.log(self.level, "%s", message)
            return
        repeat.count += 1
        repeat.last = message
        if now - repeat.since >= self.every:
            self._report(repeat, now, "still failing")
            repeat.count, repeat.since = 0, now

    def cleared(self, key: Hashable, now: float) -> None:
        """``key`` works again: its repeats, if any, are logged in one line."""
        repeat = self._open.pop(key, None)
        if repeat is not None and repeat.count:
            self._report(repeat, now, "then cleared")

    def flush(self, now: float) -> None:
        """Log every count not logged yet (the session ends)."""
        for repeat in self._open.values():
            if repeat.count:
                self._report(repeat, now, "until the end")
        self._open.clear()

    def _report(self, repeat: _Repeat, now: float, state: str) -> None:
        last = "" if repeat.last == repeat.first else f"; last: {repeat.last}"
        self.logger.log(self.level, "%s (again %d time(s) in %.1f s, %s%s)", repeat.first, repeat.count,
                        now - repeat.since, state, last)
