"""Preallocated attention cache for the blocks of one span.

Responsibility: own what attention keeps per position for one inference session on one span, and
say exactly how many bytes such a cache takes (:func:`cache_bytes`), so that a node can admit
sessions against a memory budget before allocating anything. What a block keeps depends on its
attention (:func:`layer_shapes`): keys and values per key/value head, or for Multi-head Latent
Attention the compressed latent and the rotated key part, shared by all heads.

Invariants: the per-block tensors are allocated once, at full ``max_length``, and never grow, so
``nbytes == cache_bytes(...)`` for the whole life of the cache; positions ``[0, length)`` hold valid
entries for every block, and ``0 <= length <= max_length``.  Only :class:`BlockSpan` writes entries
and advances ``length`` (once per forward call, after every block has written).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .config import ModelConfig


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def layer_shapes(config: ModelConfig, batch_size: int, max_length: int) -> tuple[tuple[int, ...], ...]:
    """Shapes of the tensors one block keeps: keys and values [B, kv_heads, max_length, head_dim], or
    with MLA the latent [B, max_length, kv_lora_rank] and the rotated key part [B, max_length, rope_dim]."""
    if config.mla is not None:
        return ((batch_size, max_length, config.mla.kv_lora_rank),
                (batch_size, max_length, config.mla.qk_rope_head_dim))
    shape = (batch_size, config.num_key_value_heads, max_length, config.head_dim)
    return shape, shape


def values_per_token(config: ModelConfig) -> int:
    """How many numbers one block's cache holds per token (576 for DeepSeek-V3's MLA)."""
    return sum(math.prod(shape) for shape in layer_shapes(config, 1, 1))


def cache_bytes(config: ModelConfig, num_blocks: int, batch_size: int, max_length: int,
                dtype: torch.dtype) -> int:
    """Bytes of a :class:`KVCache` for ``num_blocks`` blocks."""
    for name, value in (("num_blocks", num_blocks), ("batch_size", batch_size), ("max_length", max_length)):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    return num_blocks * batch_size * max_length * values_per_token(config) * _element_size(dtype)


class KVCache:
    """What attention keeps of one session for each block of a span: ``tensors[i]`` for block i, shaped
    as :func:`layer_shapes` says (keys and values [B, kv_heads, max_length, head_dim] for most families)."""

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
        shapes = layer_shapes(config, batch_size, max_length)
        # torch.empty: positions >= length are never read, so zero-filling would only cost time.
        self.tensors: list[tuple[Tensor, ...]] = [
            tuple(torch.empty(shape, dtype=dtype, device=device) for shape in shapes) for _ in range(num_blocks)
        ]

    @property
    def keys(self) -> list[Tensor]:
        """Each block's first cache tensor (the keys, for attention that keeps keys and values)."""
        return [t[0] for t in self.tensors]

    @property
    def values(self) -> list[Tensor]:
        """Each block's second cache tensor (the values, for attention that keeps keys and values)."""
        return [t[1] for t in self.tensors]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for block in self.tensors for t in block)

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
