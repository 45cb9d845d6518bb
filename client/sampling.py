"""Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p.

Matches Hugging Face ``generate`` semantics: temperature divides the logits, then top-k keeps the k
largest, then top-p keeps the smallest set whose probability reaches p (always at least one token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def validate(self) -> SamplingParams:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        return self

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [..., vocab] -> the distribution that sampling with ``params`` draws from [..., vocab] (float32):
    temperature, then top-k, then top-p. Speculative sampling compares these for target and draft."""
    scores = logits.float() / params.temperature
    if params.top_k is not None and params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if params.top_p is not None and params.top_p < 1.0:
        # HF's exact procedure (ascending sort, cumulative mass <= 1 - p is dropped, the top token always
        # kept), so that float rounding and ties select the same set as TopPLogitsWarper
        sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - params.top_p)
        remove_sorted[..., -1:] = False
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        scores = scores.masked_fill(remove, -float("inf"))
    return scores.softmax(dim=-1)


def next_tokens(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> torch.Tensor:
    """logits [batch, vocab] (float) -> token ids [batch]."""
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = probabilities(logits, params)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
