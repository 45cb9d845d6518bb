"""int8 and int4 values, scales and zero points of a float weight, and the weight they stand for.

- int8: symmetric, one scale per output channel: ``w = q * scale``, ``q`` in -128..127.
- int4: asymmetric, one scale and zero point per group of ``group_size`` inputs:
  ``w = (q - 8) * scale + zero``, ``q`` in 0..15 (the form torch's int4 kernel computes).
Scales and zero points are bfloat16, rounded before the weights are quantized against them, so every
path that multiplies by them multiplies by the same numbers. Where these values are stored and how they
are multiplied is :mod:`.quant`'s business.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

SCALE_DTYPE = torch.bfloat16


def _float_weight(weight: Tensor) -> Tensor:
    if weight.dim() != 2:
        raise ValueError(f"a weight to quantize must be 2-D [out, in], got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    if not bool(torch.isfinite(w).all()):
        raise ValueError("cannot quantize a weight holding NaN or infinite values")
    return w


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """``[N, K]`` -> (int8 ``[N, K]``, bfloat16 scales ``[N]``), symmetric per output channel."""
    w = _float_weight(weight)
    tiny = torch.finfo(torch.float32).tiny
    scales = (w.abs().amax(dim=1) / 127).clamp(min=tiny).to(SCALE_DTYPE)
    q = torch.round(w / scales.float()[:, None]).clamp_(-128, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: Tensor, scales: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return (q.float() * scales.float()[:, None]).to(dtype)


def quantize_int4(weight: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """``[N, K]`` -> (uint8 values ``[N, K']`` in 0..15, bfloat16 scales and zero points ``[N, K' / g]``).

    ``K'`` is ``K`` rounded up to a multiple of ``group_size`` (the padding quantizes zeros).
    """
    w = _float_weight(weight)
    rows, cols = w.shape
    padded = -(-cols // group_size) * group_size
    if padded != cols:
        w = F.pad(w, (0, padded - cols))
    groups = w.view(rows, padded // group_size, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = ((high - low) / 15).clamp(min=torch.finfo(torch.float32).tiny).to(SCALE_DTYPE)
    zeros = (low + 8 * scales.float()).to(SCALE_DTYPE)
    q = torch.round((groups - zeros.float()[..., None]) / scales.float()[..., None] + 8).clamp_(0, 15)
    return q.to(torch.uint8).view(rows, padded), scales, zeros


def dequantize_int4(q: Tensor, scales: Tensor, zeros: Tensor, in_features: int | None = None,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """Values ``[N, K']``, scales and zero points ``[N, K' / g]`` -> ``[N, in_features]`` weights."""
    rows, padded = q.shape
    groups = q.float().view(rows, scales.shape[1], -1)
    w = ((groups - 8) * scales.float()[..., None] + zeros.float()[..., None]).view(rows, padded)
    return w[:, : in_features or padded].to(dtype)
