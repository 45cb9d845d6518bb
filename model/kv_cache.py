"""Preallocated key/value cache for the blocks of one span.

Responsibility: own the attention keys and values of one inference session on one span, and say
exactly how many bytes such a cache takes (:func:`cache_bytes`), so that a node can admit sessions
against a memory budget before allocating anything.

Invariants: the per-block tensors are allocated once, at full ``max_length``, and never grow, so
``nbytes == cache_bytes(...)`` for the whole life of the cache; positions ``[0, length)`` hold valid
entries for every block, and ``0 <= length <= max_length``.  Only :class:`BlockSpan` writes keys and
values and advances ``length`` (once per forward call, after every block has written).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import ModelConfig


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def cache_bytes(config: ModelConfig, num_blocks: int, batch_size: int, max_length: int,
                dtype: torch.dtype) -> int:
    """Bytes of a :class:`KVCache` for ``num_blocks`` blocks (keys and values together)."""
    for name, value in (("num_blocks", num_blocks), ("batch_size", batch_size), ("max_length", max_length)):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    per_tensor = batch_size * config.num_key_value_heads * max_length * config.head_dim
    return 2 * num_blocks * per_tensor * _element_size(dtype)


class KVCache:
    """Keys and values of one session for each block of a span, shaped [B, kv_heads, max_length, head_dim]."""

    def __init__(self, config: ModelConfig, num_blocks: int, batch_size: int, max_length: int, *,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> None:
        for name, value in (("num_blocks", num_blocks), ("batch_size", batch_size), ("max_length", max_length)):
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        self.num_blocks = num_blocks
        self.batch_size = batch_size
        self.max_length = max_length
        self.dtype = dtype
        self.device = torch.device(device)
        self.length = 0
        shape = (batch_size, config.num_key_value_heads, max_length, config.head_dim)
        # torch.empty: positions >= length are never read, so zero-filling would only cost time.
        self.keys: list[Tensor] = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_blocks)]
        self.values: list[Tensor] = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_blocks)]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.keys) + sum(t.nbytes for t in self.values)

    @property
    def remaining(self) -> int:
        """How many more positions fit."""
        return self.max_length - self.length

    def reset(self) -> None:
        """Forget every stored position (the memory stays allocated)."""
        self.length = 0

    def truncate(self, length: int) -> None:
        """Keep only the first ``length`` positions, e.g. to roll back a step that is replayed."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of length {self.length} to {length}")
        self.length = length

    def __repr__(self) -> str:
        return (f"KVCache(num_blocks={self.num_blocks}, batch_size={self.batch_size}, length={self.length}, "
                f"max_length={self.max_length}, dtype={self.dtype}, device={self.device})")
