"""The gated feed-forward network of Llama-family blocks: down(silu(gate(x)) * up(x)).

Once loaded, the gate and up projections may be fused into one (:meth:`GatedMLP.fuse`): a single
matrix product with the two weights stacked, gate rows first, so a decoding step reads both in one
pass instead of two. Each output element is still one dot product over the same inputs; only the
kernel's blocking, and so possibly the last bit of a sum, may differ from two separate products.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def fuse_linears(*linears: nn.Module) -> nn.Linear | None:
    """One ``nn.Linear`` computing ``cat([l(x) for l in linears], -1)``, or None when they cannot be
    fused: only plain ``nn.Linear`` layers (not subclasses or quantized layers) on one device and dtype,
    with the same inputs, all with biases or none."""
    if not linears or any(type(m) is not nn.Linear for m in linears):
        return None
    first = linears[0]
    weights = [m.weight for m in linears]  # type: ignore[union-attr]
    if any(w.device != first.weight.device or w.dtype != first.weight.dtype or w.device.type == "meta"
           or w.shape[1] != first.in_features for w in weights):
        return None
    has_bias = [m.bias is not None for m in linears]  # type: ignore[union-attr]
    if any(has_bias) and not all(has_bias):
        return None
    out = sum(m.out_features for m in linears)  # type: ignore[union-attr]
    fused = nn.Linear(first.in_features, out, bias=has_bias[0], device="meta")
    fused.weight = nn.Parameter(torch.cat([w.detach() for w in weights]), requires_grad=False)
    if has_bias[0]:
        fused.bias = nn.Parameter(torch.cat([m.bias.detach() for m in linears]),  # type: ignore[union-attr]
                                  requires_grad=False)
    return fused


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.gate_up_proj: nn.Module | None = None  # set by fuse()

    def fuse(self) -> bool:
        """Replace gate_proj and up_proj by one ``gate_up_proj`` [2 * I, H] (gate rows first) when both
        are plain ``nn.Linear``; return whether it did (idempotent)."""
        if self.gate_up_proj is not None:
            return True
        fused = fuse_linears(self.gate_proj, self.up_proj)
        if fused is None:
            return False
        self.gate_up_proj = fused
        del self.gate_proj, self.up_proj
        return True

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
