"""RMSNorm, computed the way transformers computes it.

Invariant: the input is normalized in float32 and cast back to its dtype before the weight is
applied; bit-level agreement in half precision depends on this order. float32 inputs with a float32
weight take torch's fused ``rms_norm`` (one operation instead of seven; the same order of operations,
equal to the bit on the checkpoints tried, in half the time on a decoding step's row).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_FUSED = hasattr(F, "rms_norm")  # torch >= 2.4


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        if _FUSED and dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)
