"""How many bytes a block's weights take, in all and per token, computed from the config alone.

Responsibility: the real size of blocks of every family (a MoE block counts all its experts), so that
a node can say what a span costs before loading it, and benchmarks can state what one decoding step
must read: every dense weight, but of the routed experts only the ``top_k`` that a token uses.
Invariant: counts come from the very modules ``BlockSpan`` builds (on the meta device, no memory),
so they cannot drift from the code.
"""

from __future__ import annotations

import torch

from .blocks import build_block
from .config import ModelConfig


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def block_parameters(config: ModelConfig, layer: int) -> tuple[int, int]:
    """(all parameters, parameters one token uses) of block ``layer``."""
    with torch.device("meta"):
        block = build_block(config, layer)
    total = sum(p.numel() for p in block.parameters())
    routed = 0
    if config.is_sparse(layer) and config.moe is not None:
        experts = block.get_submodule("mlp.experts")
        routed = sum(p.numel() for p in experts.parameters())
        routed -= routed * config.moe.top_k // config.moe.num_experts
    return total, total - routed


def span_weight_bytes(config: ModelConfig, start: int, end: int, dtype: torch.dtype) -> int:
    """Bytes of the weights of blocks ``[start, end)`` in ``dtype``."""
    return sum(block_parameters(config, layer)[0] for layer in range(start, end)) * _element_size(dtype)


def span_active_bytes(config: ModelConfig, start: int, end: int, dtype: torch.dtype) -> int:
    """Bytes of weights that one token's decoding step reads in blocks ``[start, end)`` (the chosen
    experts only)."""
    return sum(block_parameters(config, layer)[1] for layer in range(start, end)) * _element_size(dtype)
