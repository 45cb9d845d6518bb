"""Speculative decoding: a drafter guesses k tokens, the swarm checks them all in one pass.

One round feeds the last chosen token and k drafted ones (k + 1 positions) through every hop, with
``keep_length`` rolling the caches back past the drafts the previous round rejected, and gets the
logits of all k + 1 positions back. Greedy: the longest prefix of drafts that the model's argmax agrees
with is accepted, plus the model's own token after it, so the output is exactly plain greedy's. Sampling:
the standard speculative sampling rule (draft ``x`` drawn from ``q`` is accepted with probability
``min(1, p(x) / q(x))``; on rejection the token is drawn from ``max(0, p - q)`` renormalized; after k
accepted drafts one more from ``p``), so every token is distributed as plain sampling's. A deterministic
guess (prompt lookup) is a ``q`` that is a point mass.

Every accepted draft saves a round trip through the whole chain. The number of drafts adapts
(:class:`DraftLength`): it maximises expected tokens per second from the measured acceptance rate, the
round's time as a function of k (fit over recent rounds: fixed round trip plus a per-token cost) and the
drafter's time per token.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from homeswarm.client.drafters import Drafter
from homeswarm.client.sampling import SamplingParams, probabilities

MAX_DRAFT = 8  # drafts per round at most; a session needs this many positions of room beyond the output

# (input token ids, keep_length) -> logits [len(ids), vocab] of those positions, float32
VerifyFn = Callable[[list[int], int | None], torch.Tensor]
# the same, for greedy decoding: -> the token with the largest logit at each of those positions
GreedyVerifyFn = Callable[[list[int], int | None], list[int]]


@dataclass
class DraftLength:
    """Chooses k, the drafts of the next round, from what earlier rounds measured."""

    max_k: int = MAX_DRAFT
    acceptance: float = 0.6  # per-draft acceptance rate (moving average), prior
    smoothing: float = 0.2
    draft_seconds: float = 0.0  # drafter time per drafted token (moving average)
    rounds: deque = field(default_factory=lambda: deque(maxlen=32))  # (k, seconds of the swarm round)
    probe_every: int = 8  # while drafting does not pay, still draft one token every this many rounds
    _skipped: int = 0

    def update(self, k: int, accepted: int, round_seconds: float, draft_seconds: float) -> None:
        """A round with ``k`` drafts (0: none) took ``round_seconds`` in the swarm, ``draft_seconds`` here."""
        if k > 0:
            # acceptance of each draft given its predecessors were accepted: accepted of the tries
            tries = accepted + (1 if accepted < k else 0)
            rate = accepted / tries
            self.acceptance += self.smoothing * (rate - self.acceptance)
            self.draft_seconds += self.smoothing * (draft_seconds / k - self.draft_seconds)
        self.rounds.append((k, round_seconds))

    def _round_model(self) -> tuple[float, float]:
        """(fixed seconds, seconds per extra token) of a swarm round: least squares over recent rounds."""
        if not self.rounds:
            return 1.0, 0.0
        n = len(self.rounds)
        mean_k = sum(k for k, _ in self.rounds) / n
        mean_t = sum(t for _, t in self.rounds) / n
        var = sum((k - mean_k) ** 2 for k, _ in self.rounds)
        per_token = sum((k - mean_k) * (t - mean_t) for k, t in self.rounds) / var if var > 0 else 0.0
        per_token = max(per_token, 0.0)
        return max(mean_t - per_token * mean_k, 1e-6), per_token

    def choose(self, limit: int) -> int:
        """k in 0..min(max_k, limit), by expected tokens per second. 0 (no drafting) where drafts cost more
        than they save, though then one draft every ``probe_every`` rounds keeps the estimates current."""
        top = min(self.max_k, limit)
        if top < 1:
            return 0
        fixed, per_token = self._round_model()
        a = min(max(self.acceptance, 0.0), 0.99)
        best, best_rate = 0, 1 / fixed
        for k in range(1, top + 1):
            tokens = (1 - a ** (k + 1)) / (1 - a)  # expected accepted drafts + the model's own token
            rate = tokens / (fixed + k * (per_token + self.draft_seconds))
            if rate > best_rate * (1 + 1e-9):
                best, best_rate = k, rate
        if best == 0:
            self._skipped += 1
            if self._skipped >= self.probe_every:
                self._skipped = 0
                return 1
        return best


def verify(logits: torch.Tensor, drafts: list[int], q: torch.Tensor | None, params: SamplingParams,
           generator: torch.Generator | None) -> tuple[int, int]:
    """(accepted drafts, the token after them) for ``logits`` [len(drafts) + 1, vocab] of the target at the
    positions that predict each draft and the one after; ``q`` [len(drafts), vocab] the draft distributions
    (None: the drafts were deterministic)."""
    if params.greedy:
        return accept_greedy(logits.argmax(dim=-1).tolist(), drafts)
    p = probabilities(logits, params)
    for i, token in enumerate(drafts):
        p_x = float(p[i, token])
        q_x = float(q[i, token]) if q is not None else 1.0
        u = float(torch.rand((), generator=generator))
        if q_x > 0 and u * q_x < p_x:  # u < p(x) / q(x)
            continue
        if q is not None:
            residual = (p[i] - q[i]).clamp_min(0)
        else:
            residual = p[i].clone()
            residual[token] = 0
        total = float(residual.sum())
        if total <= 0:  # p == q up to rounding: any draw from p is right
            residual, total = p[i], 1.0
        return i, int(torch.multinomial(residual / total, 1, generator=generator))
    return len(drafts), int(torch.multinomial(p[len(drafts)], 1, generator=generator))


def accept_greedy(chosen: list[int], drafts: list[int]) -> tuple[int, int]:
    """(accepted drafts, the token after them) for the target's greedy tokens ``chosen`` [len(drafts) + 1]."""
    n = 0
    while n < len(drafts) and chosen[n] == drafts[n]:
        n += 1
    return n, chosen[n]


@dataclass
class SpeculationStats:
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


class SpeculativeDecoder:
    """Generates one sequence (batch 1) by drafting and verifying; see the module docstring."""

    def __init__(self, drafter: Drafter, verify_fn: VerifyFn, params: SamplingParams, *,
                 generator: torch.Generator | None = None, room: int, max_draft: int = MAX_DRAFT,
                 length: DraftLength | None = None, greedy_verify_fn: GreedyVerifyFn | None = None) -> None:
        """``room``: positions the verifier's caches hold at most (the session's max_length);
        ``greedy_verify_fn``: used instead of ``verify_fn`` for greedy decoding (the tokens, not the logits)."""
        self.drafter = drafter
        self.verify_fn = verify_fn
        self.greedy_verify_fn = greedy_verify_fn
        self.params = params
        self.generator = generator
        self.room = room
        self.length = length or DraftLength(max_k=max_draft)
        self.stats = SpeculationStats()

    def stream(self, prompt: list[int], first_logits: torch.Tensor, max_new_tokens: int,
               eos_token_ids: list[int]) -> Iterator[int]:
        """New tokens one by one, given the prompt's last logits [vocab] (the prefill already ran: the
        caches hold ``prompt``)."""
        tokens = list(prompt)
        eos = set(eos_token_ids)
        choose_first = verify(first_logits[None], [], None, self.params, self.generator)[1]
        produced = 0
        pending = choose_first  # chosen, not yet in the caches
        held = len(prompt)  # positions the caches hold that are still valid
        while True:
            tokens.append(pending)
            produced += 1
            yield pending
            if produced >= max_new_tokens or pending in eos:
                return
            # drafts beyond the last token we may emit are wasted; the caches need room for 1 + k
            k = self.length.choose(min(max_new_tokens - produced - 1, self.room - held - 1))
            t0 = time.perf_counter()
            drafts, q = self.drafter.draft(tokens, k, self.params, self.generator) if k > 0 else ([], None)
            drafts = drafts[:k]
            q = q[: len(drafts)] if q is not None else None
            t1 = time.perf_counter()
            if self.params.greedy and self.greedy_verify_fn is not None:
                chosen = self.greedy_verify_fn([pending, *drafts], held)
                t2 = time.perf_counter()
                accepted, bonus = accept_greedy(chosen, drafts)
            else:
                logits = self.verify_fn([pending, *drafts], held)
                t2 = time.perf_counter()
                accepted, bonus = verify(logits, drafts, q, self.params, self.generator)
            self.stats.rounds += 1
            self.stats.drafted += len(drafts)
            self.stats.accepted += accepted
            self.length.update(len(drafts), accepted, t2 - t1, t1 - t0)
            held += 1 + accepted
            for token in drafts[:accepted]:
                tokens.append(token)
                produced += 1
                yield token
                if produced >= max_new_tokens or token in eos:
                    return
            pending = bonus
