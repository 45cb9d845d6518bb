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

    @torch.no_grad()
    def logits(self, hidden: Tensor) -> Tensor:
        """[B, T, H] hidden states after the last block -> [B, T, V] logits (final norm, then LM head)."""
        if not isinstance(hidden, Tensor) or hidden.dim() != 3 or hidden.shape[-1] != self.config.hidden_size:
            shape = tuple(hidden.shape) if isinstance(hidden, Tensor) else type(hidden).__name__
            raise ValueError(f"hidden states must be [batch, length, {self.config.hidden_size}], got {shape}")
        if hidden.dtype != self.dtype:
            raise ValueError(f"hidden states dtype {hidden.dtype} does not match the head's dtype {self.dtype}")
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(self.norm(hidden.to(self.device)), weight)
