"""The text of a completion as it grows token by token: what may be shown so far, and where it stops.

Pure: a decode function in, strings out. Invariants: what ``add`` has returned is never taken back,
so streamed deltas concatenate to the final text; the text never contains a stop string (it ends
just before the first one, and generation ends there); a tail that may still turn into a stop string
is held back until it cannot; so is a character whose bytes have not all arrived yet (byte-level
tokenizers split characters across tokens, and a partial character decodes to U+FFFD).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"


def _held_tail(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of some stop string."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if stop.startswith(text[-k:]):
                longest = k
                break
    return longest


class CompletionText:
    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = ()):
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        self._decode = decode
        self._stops = tuple(stops)
        self.text = ""  # shown so far
        self.stopped = False  # a stop string was found: the text is final

    def add(self, ids: list[int]) -> str:
        """The text that the new ids (all ids so far) add to what is shown; sets ``stopped`` when the
        text reached a stop string."""
        if self.stopped:
            return ""
        full = self._decode(ids)
        cut = min((i for i in (full.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._extend(full[:cut])
        shown = full.rstrip(REPLACEMENT)
        return self._extend(shown[: len(shown) - _held_tail(shown, self._stops)])

    def finish(self, ids: list[int]) -> str:
        """The rest of the text once generation has ended without a stop string: nothing is held back."""
        if self.stopped:
            return ""
        return self._extend(self._decode(ids))

    def _extend(self, candidate: str) -> str:
        # a decoder may rewrite earlier text; what is shown stays, and shows more once the text extends it
        if not candidate.startswith(self.text):
            return ""
        delta = candidate[len(self.text):]
        self.text = candidate
        return delta
