"""Block-scaled FP8 weights, as DeepSeek-V3 and Kimi K2 ship them on the hub.

Responsibility: turn a ``float8_e4m3fn`` weight [rows, cols] and its ``weight_scale_inv`` (one float32
scale per 128x128 block, [ceil(rows / 128), ceil(cols / 128)]) back into a full-precision weight.
Invariants: the product is taken in float32 (every e4m3 value and every scale is exact there, so the
dequantized weight is the exact product, rounded once to the target dtype); the last block of a
dimension may be partial; a scale grid that does not fit the weight is refused, never broadcast.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

FP8_DTYPE = torch.float8_e4m3fn
BLOCK = 128
SCALE_SUFFIX = "_scale_inv"


def is_fp8(tensor: Tensor) -> bool:
    return tensor.dtype == FP8_DTYPE


def dequantize_fp8(weight: Tensor, scale_inv: Tensor, dtype: torch.dtype = torch.float32,
                   block: int = BLOCK) -> Tensor:
    """``weight`` [rows, cols] float8_e4m3fn times its per-block ``scale_inv``, as ``dtype``."""
    if weight.dim() != 2 or scale_inv.dim() != 2:
        raise ValueError(f"FP8 weight and scales must be 2-D, got {tuple(weight.shape)} and {tuple(scale_inv.shape)}")
    rows, cols = weight.shape
    grid = (math.ceil(rows / block), math.ceil(cols / block))
    if tuple(scale_inv.shape) != grid:
        raise ValueError(f"FP8 weight {tuple(weight.shape)} needs a {grid[0]}x{grid[1]} grid of {block}x{block} "
                         f"block scales, got {tuple(scale_inv.shape)}")
    scale = scale_inv.to(device=weight.device, dtype=torch.float32)
    scale = scale.repeat_interleave(block, dim=0)[:rows].repeat_interleave(block, dim=1)[:, :cols]
    return (weight.to(torch.float32) * scale).to(dtype)
