"""MXFP4 expert weights as GPT-OSS checkpoints store them, dequantized at load.

Responsibility: turn a ``<name>_blocks`` / ``<name>_scales`` pair into the dense tensor ``<name>``, with
the same values and layout that transformers' ``convert_moe_packed_tensors`` gives.
Layout: ``blocks`` [E, R, G, 16] uint8 hold 32 FP4 (e2m1) values per group, two per byte, the low nibble
first; ``scales`` [E, R, G] uint8 are one power-of-two exponent per group (e8m0, bias 127). Row r of
expert e unpacks to G * 32 values; the result is transposed to [E, G * 32, R], which is how the dense
checkpoint stores the same tensor (``gate_up_proj`` [E, H, 2I] from blocks [E, 2I, H / 32, 16]).
Invariant: every value is an FP4 value times a power of two, computed in the target dtype with
``torch.ldexp`` as the reference does, so the result equals transformers' bit for bit.
"""

from __future__ import annotations

import torch
from torch import Tensor

# e2m1 code -> value; bit 3 is the sign
FP4_VALUES = (+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
SCALE_BIAS = 127
GROUP_SIZE = 32  # values per scale; 16 bytes per group


def dequantize_mxfp4(blocks: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    """``blocks`` [E, R, G, 16] uint8 and ``scales`` [E, R, G] uint8 -> [E, G * 32, R] in ``dtype``, on
    the blocks' device."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.dim() != 4 or blocks.shape[-1] != GROUP_SIZE // 2 or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not fit scales {tuple(scales.shape)}")
    experts, rows, groups, width = blocks.shape
    lut = torch.tensor(FP4_VALUES, dtype=dtype, device=blocks.device)
    out = torch.empty(experts, rows * groups, width * 2, dtype=dtype, device=blocks.device)
    # One expert at a time: the index tensors are 8 bytes per value, so doing every expert at once
    # would briefly take several times the memory of the dense result.
    for e in range(experts):
        packed = blocks[e].reshape(rows * groups, width)
        exponents = scales[e].reshape(rows * groups, 1).to(torch.int32) - SCALE_BIAS
        sub = out[e]
        sub[:, 0::2] = lut[(packed & 0x0F).to(torch.int)]
        sub[:, 1::2] = lut[(packed >> 4).to(torch.int)]
        torch.ldexp(sub, exponents, out=sub)
    return out.view(experts, rows, groups * width * 2).transpose(1, 2).contiguous()
