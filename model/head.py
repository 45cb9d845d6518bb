"""The client-side ends of the model: token embedding, and final norm + LM head.

Responsibility: turn token ids into the hidden states that enter block 0, and the hidden states
leaving the last block into logits.

Invariants: with ``tie_word_embeddings`` the LM head *is* the embedding matrix (one tensor, never a
copy); ids outside ``[0, vocab_size)`` are refused with ``ValueError`` instead of reading out of bounds
or wrapping around.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import RMSNorm
from .bounded_argmax import BoundedArgmax
from .config import ModelConfig


class ClientHead(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head: nn.Linear | None = None
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # what greedy() reads, with its counters: set by prepare_greedy() (None: the full product)
        self.bounded_argmax: BoundedArgmax | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @torch.no_grad()
    def embed(self, input_ids: Tensor) -> Tensor:
        """[B, T] integer ids -> [B, T, H] hidden states in the head's dtype."""
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a 2-D tensor [batch, length], got {shape}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if input_ids.numel() == 0:
            raise ValueError(f"input_ids must be non-empty, got shape {tuple(input_ids.shape)}")
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= self.config.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}), got values in [{low}, {high}]")
        return self.embed_tokens(input_ids.to(device=self.device, dtype=torch.long))

    @property
    def _head_weight(self) -> Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def _check_hidden(self, hidden: Tensor) -> None:
        if not isinstance(hidden, Tensor) or hidden.dim() != 3 or hidden.shape[-1] != self.config.hidden_size:
            shape = tuple(hidden.shape) if isinstance(hidden, Tensor) else type(hidden).__name__
            raise ValueError(f"hidden states must be [batch, length, {self.config.hidden_size}], got {shape}")
        if hidden.dtype != self.dtype:
            raise ValueError(f"hidden states dtype {hidden.dtype} does not match the head's dtype {self.dtype}")

    @torch.no_grad()
    def logits(self, hidden: Tensor) -> Tensor:
        """[B, T, H] hidden states after the last block -> [B, T, V] logits (final norm, then LM head)."""
        self._check_hidden(hidden)
        return F.linear(self.norm(hidden.to(self.device)), self._head_weight)

    def prepare_greedy(self, *, min_entries: int = 4 * 2**20) -> bool:
        """Let :meth:`greedy` read an int8 copy of a float32 LM head on the CPU (a quarter of the head's
        memory again; see ``bounded_argmax``) when the head has at least ``min_entries`` weights: below
        about 4M (16 MiB) the full product costs no more than the bound's fixed work (measured in
        docs/BENCHMARKS.md). Returns whether it will; other heads are read as they are."""
        weight = self._head_weight
        if (self.bounded_argmax is None and self.dtype == torch.float32 and self.device.type == "cpu"
                and weight.numel() >= min_entries):
            argmax = BoundedArgmax(weight.detach())
            self.bounded_argmax = argmax if argmax.usable else None
        return self.bounded_argmax is not None

    @torch.no_grad()
    def greedy(self, hidden: Tensor, *, every_position: bool = False) -> Tensor:
        """[B, T, H] hidden states after the last block -> [B] the token with the largest logit at the last
        position (``every_position``: [B, T], at each): the argmax of ``logits(hidden).float()``, cheaper
        after :meth:`prepare_greedy`."""
        self._check_hidden(hidden)
        rows = self.norm((hidden if every_position else hidden[:, -1:]).to(self.device)).reshape(-1, hidden.shape[-1])
        if self.bounded_argmax is not None:
            tokens = self.bounded_argmax(rows)
        else:
            tokens = F.linear(rows, self._head_weight).float().argmax(dim=-1)
        return tokens.view(hidden.shape[0], -1) if every_position else tokens
