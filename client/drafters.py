"""Drafters for speculative decoding: cheap guesses of the next tokens, checked by the swarm in one pass.

A drafter proposes up to ``k`` tokens to follow the tokens so far, and for each the distribution it drew
it from (``None`` for a deterministic guess, which speculative sampling treats as a point mass). Two kinds:

- :class:`PromptLookupDrafter` (no model): finds the latest earlier occurrence of the last n tokens
  (n from ``max_ngram`` down to ``min_ngram``) in the prompt and the text so far, and proposes what
  followed it. Good on repetitive text (code, quoting, extraction), free to run.
- :class:`DraftModelDrafter`: a small local causal LM with the same tokenizer, run with the project's own
  model code and a KV cache that it rolls back to the tokens the swarm accepted.

Invariants: a drafter never changes what is generated, only how fast (the verifier accepts or replaces
every proposal); ``draft`` may return fewer than ``k`` tokens, or none.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from homeswarm.client.sampling import SamplingParams, probabilities
from homeswarm.model import LocalModel, ModelConfig, parse_dtype


class Drafter(Protocol):
    name: str

    def draft(self, tokens: list[int], k: int, params: SamplingParams,
              generator: torch.Generator | None) -> tuple[list[int], torch.Tensor | None]:
        """Up to ``k`` tokens to follow ``tokens``, and the distributions [n, vocab] they were drawn from
        (None: chosen deterministically)."""
        ...


class PromptLookupDrafter:
    """n-gram lookup in the prompt and the text so far."""

    name = "prompt-lookup"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def draft(self, tokens: list[int], k: int, params: SamplingParams | None = None,
              generator: torch.Generator | None = None) -> tuple[list[int], None]:
        if k <= 0:
            return [], None
        length = len(tokens)
        for n in range(min(self.max_ngram, length - 1), self.min_ngram - 1, -1):
            suffix = tokens[length - n:]
            # the latest earlier match: its continuation is the most recent, usually the best guess
            for start in range(length - n - 1, -1, -1):
                if tokens[start:start + n] == suffix:
                    follow = tokens[start + n:start + n + k]
                    if follow:
                        return follow, None
        return [], None


class DraftModelDrafter:
    """A small causal LM with the same tokenizer, run locally (greedy, or sampling with the same params)."""

    def __init__(self, model_dir: str | Path, *, vocab_size: int, tokenizer_file: Path | None = None,
                 dtype: str = "float32", max_length: int = 4096, threads: int = 1) -> None:
        """``threads``: torch threads while drafting. One by default: a draft model's operations are small, and
        more threads mostly wait on each other (measured on a loaded 2-core machine: 1.4-2.8 ms per drafted
        token of the demo model's first block with one thread, 36-59 ms with two)."""
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise ValueError(f"draft model {model_dir} is not a checkpoint folder (no config.json)")
        config = ModelConfig.from_dir(model_dir)
        if config.vocab_size != vocab_size:
            raise ValueError(f"draft model {model_dir} has a vocabulary of {config.vocab_size} tokens, the model "
                             f"{vocab_size}: they must share the tokenizer")
        own = model_dir / "tokenizer.json"
        if tokenizer_file is not None and tokenizer_file.is_file() and own.is_file() \
                and own.read_bytes() != tokenizer_file.read_bytes():
            raise ValueError(f"draft model {model_dir} has another tokenizer.json than the model")
        self.name = f"draft:{model_dir}"
        self.threads = threads
        self.model = LocalModel(model_dir, dtype=parse_dtype(dtype))
        self.max_length = max_length
        self._cache = self.model.spans[0].new_cache(1, max_length)
        self._fed: list[int] = []  # the tokens the cache holds, in order

    def _feed(self, tokens: list[int]) -> torch.Tensor:
        """Append ``tokens`` to the cache; logits of the last one [vocab] (float32)."""
        if self._cache.length + len(tokens) > self.max_length:
            raise ValueError(f"the draft model's cache holds at most {self.max_length} tokens")
        ids = torch.tensor([tokens], dtype=torch.long)
        hidden = self.model.forward(self.model.head.embed(ids), [self._cache])
        self._fed.extend(tokens)
        return self.model.head.logits(hidden[:, -1:])[0, -1].float()

    @torch.no_grad()
    def draft(self, tokens: list[int], k: int, params: SamplingParams,
              generator: torch.Generator | None) -> tuple[list[int], torch.Tensor | None]:
        if k <= 0 or not tokens:
            return [], None
        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return self._draft(tokens, k, params, generator)
        finally:
            torch.set_num_threads(previous)

    def _draft(self, tokens: list[int], k: int, params: SamplingParams,
               generator: torch.Generator | None) -> tuple[list[int], torch.Tensor | None]:
        k = min(k, self.max_length - len(tokens))
        if k <= 0:
            return [], None
        # roll back to what the cache and ``tokens`` share (rejected drafts go), keeping one token to feed
        common = 0
        limit = min(len(self._fed), len(tokens) - 1)
        while common < limit and self._fed[common] == tokens[common]:
            common += 1
        self._cache.truncate(common)
        del self._fed[common:]
        logits = self._feed(tokens[common:])
        drafts: list[int] = []
        dists: list[torch.Tensor] = []
        for i in range(k):
            if params.greedy:
                token = int(logits.argmax())
            else:
                probs = probabilities(logits, params)
                token = int(torch.multinomial(probs, 1, generator=generator))
                dists.append(probs)
            drafts.append(token)
            if i + 1 < k:
                logits = self._feed([token])
        return drafts, (torch.stack(dists) if dists else None)


def make_drafter(spec: str, *, vocab_size: int, model_dir: Path | None = None,
                 max_length: int = 4096) -> Drafter:
    """The drafter ``spec`` names: "prompt-lookup" or "draft:DIR"."""
    if spec == "prompt-lookup":
        return PromptLookupDrafter()
    if spec.startswith("draft:") and len(spec) > len("draft:"):
        tokenizer = model_dir / "tokenizer.json" if model_dir is not None else None
        return DraftModelDrafter(spec[len("draft:"):], vocab_size=vocab_size, tokenizer_file=tokenizer,
                                 max_length=max_length)
    raise ValueError(f"speculative must be 'prompt-lookup' or 'draft:DIR', got {spec!r}")
