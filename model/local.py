"""The whole model in one process: head plus every block, for tests and the single-machine demo.

Responsibility: run generation the way the swarm does it (embed, spans in order, logits; prefill the
prompt once, then one cached token per step), with no network, so swarm results can be compared to it.

Invariants: the spans cover blocks ``[0, num_hidden_layers)`` in order without gaps; one call to
:meth:`LocalModel.generate` owns its caches, sized exactly for prompt + new tokens.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .blocks import BlockSpan
from .config import ModelConfig
from .head import ClientHead
from .kv_cache import KVCache
from .loader import load_head, load_span

# Chooses the next token of every sequence from the last position's logits [B, V] (float32).
SampleFn = Callable[[Tensor], Tensor]


def greedy(logits: Tensor) -> Tensor:
    return logits.argmax(dim=-1)


class LocalModel:
    def __init__(self, model_dir: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", spans: Sequence[tuple[int, int]] | None = None) -> None:
        """``spans`` splits the blocks as a swarm would, e.g. ``[(0, 2), (2, 4)]``; default: one span."""
        self.config = ModelConfig.from_dir(model_dir)
        n = self.config.num_hidden_layers
        ranges = list(spans) if spans is not None else [(0, n)]
        expected_start = 0
        for start, end in ranges:
            if start != expected_start:
                raise ValueError(f"spans must cover blocks [0, {n}) in order without gaps or overlaps, got {ranges}")
            expected_start = end
        if expected_start != n:
            raise ValueError(f"spans must cover blocks [0, {n}) in order without gaps or overlaps, got {ranges}")
        self.head: ClientHead = load_head(model_dir, dtype=dtype, device=device)
        self.spans: list[BlockSpan] = [load_span(model_dir, s, e, dtype=dtype, device=device) for s, e in ranges]

    def forward(self, hidden: Tensor, caches: Sequence[KVCache] | None = None) -> Tensor:
        """Hidden states through every span in order."""
        for i, span in enumerate(self.spans):
            hidden = span(hidden, caches[i] if caches is not None else None)
        return hidden

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, sample_fn: SampleFn | None = None) -> Tensor:
        """Prompt [B, T] -> prompt plus ``max_new_tokens`` tokens [B, T + N] (no early stop on EOS)."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        hidden = self.head.embed(input_ids)  # validates shape and id range
        input_ids = input_ids.to(device=self.head.device, dtype=torch.long)
        if max_new_tokens == 0:
            return input_ids
        choose = sample_fn or greedy
        batch, prompt_length = input_ids.shape
        # The last new token is never fed back, so the caches need T + N - 1 positions.
        caches = [span.new_cache(batch, prompt_length + max_new_tokens - 1) for span in self.spans]
        tokens = [input_ids]
        for step in range(max_new_tokens):
            if step > 0:
                hidden = self.head.embed(tokens[-1])
            hidden = self.forward(hidden, caches)
            # Logits in float32, as transformers' generate compares them.
            logits = self.head.logits(hidden[:, -1:]).float()[:, -1]
            tokens.append(choose(logits).to(torch.long).view(batch, 1))
        return torch.cat(tokens, dim=1)

    def generate_greedy(self, input_ids: Tensor, max_new_tokens: int) -> Tensor:
        return self.generate(input_ids, max_new_tokens, greedy)
