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


_CHUNK_BYTES = 4 << 20  # float32 bytes of rows quantized at once: temporaries stay this size


def _check_weight(weight: Tensor) -> None:
    if weight.dim() != 2:
        raise ValueError(f"a weight to quantize must be 2-D [out, in], got shape {tuple(weight.shape)}")


def _float_rows(weight: Tensor, start: int, end: int) -> Tensor:
    w = weight[start:end].detach().float()
    if not bool(torch.isfinite(w).all()):
        raise ValueError("cannot quantize a weight holding NaN or infinite values")
    return w


def _row_chunks(weight: Tensor) -> range:
    """Start rows of the chunks a weight is quantized in (rows are independent: the result is the same
    as in one piece, while the float temporaries stay about ``_CHUNK_BYTES``)."""
    step = max(1, _CHUNK_BYTES // (4 * max(1, weight.shape[1])))
    return range(0, weight.shape[0], step)


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """``[N, K]`` -> (int8 ``[N, K]``, bfloat16 scales ``[N]``), symmetric per output channel."""
    _check_weight(weight)
    tiny = torch.finfo(torch.float32).tiny
    rows = weight.shape[0]
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(rows, dtype=SCALE_DTYPE, device=weight.device)
    chunks = _row_chunks(weight)
    for start in chunks:
        end = min(start + chunks.step, rows)
        w = _float_rows(weight, start, end)
        scales[start:end] = (w.abs().amax(dim=1) / 127).clamp(min=tiny).to(SCALE_DTYPE)
        q[start:end] = torch.round(w / scales[start:end].float()[:, None]).clamp_(-128, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: Tensor, scales: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return (q.float() * scales.float()[:, None]).to(dtype)


def quantize_int4(weight: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """``[N, K]`` -> (uint8 values ``[N, K']`` in 0..15, bfloat16 scales and zero points ``[N, K' / g]``).

    ``K'`` is ``K`` rounded up to a multiple of ``group_size`` (the padding quantizes zeros).
    """
    _check_weight(weight)
    rows, cols = weight.shape
    padded = -(-cols // group_size) * group_size
    q = torch.empty(rows, padded, dtype=torch.uint8, device=weight.device)
    scales = torch.empty(rows, padded // group_size, dtype=SCALE_DTYPE, device=weight.device)
    zeros = torch.empty_like(scales)
    chunks = _row_chunks(weight)
    for start in chunks:
        end = min(start + chunks.step, rows)
        w = _float_rows(weight, start, end)
        if padded != cols:
            w = F.pad(w, (0, padded - cols))
        groups = w.view(end - start, padded // group_size, group_size)
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)
        s = ((high - low) / 15).clamp(min=torch.finfo(torch.float32).tiny).to(SCALE_DTYPE)
        z = (low + 8 * s.float()).to(SCALE_DTYPE)
        values = torch.round((groups - z.float()[..., None]) / s.float()[..., None] + 8).clamp_(0, 15)
        q[start:end] = values.to(torch.uint8).view(end - start, padded)
        scales[start:end], zeros[start:end] = s, z
    return q, scales, zeros


def dequantize_int4(q: Tensor, scales: Tensor, zeros: Tensor, in_features: int | None = None,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """Values ``[N, K']``, scales and zero points ``[N, K' / g]`` -> ``[N, in_features]`` weights."""
    rows, padded = q.shape
    groups = q.float().view(rows, scales.shape[1], -1)
    w = ((groups - 8) * scales.float()[..., None] + zeros.float()[..., None]).view(rows, padded)
    return w[:, : in_features or padded].to(dtype)
