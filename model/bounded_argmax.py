"""Greedy token choice from a float32 LM head at about half its memory traffic, with the same token.

Responsibility: ``argmax_r (W x)_r`` as the float32 product computes it, for a float32 weight ``W``
[V, H]. A decoding step's LM head product reads all of ``W``, and on a CPU that read is the whole
cost (131 MB per token for a 32,000 x 1,024 head). :class:`BoundedArgmax` reads a bfloat16 copy
instead (half the bytes), bounds for every row how far that approximate logit can lie from the
float32 one, and recomputes in float32 only the rows that could still hold the largest logit;
usually a handful.

Invariant: a row is left out only if its float32 logit is provably below another row's, so the
token is the full product's argmax (ties: the lowest index, as ``torch.argmax``). For a row r and an
input x (``||.||`` the Euclidean norm, ``Ŵ`` and ``x̂`` the bfloat16 roundings, ``y`` the computed
bfloat16 product, γ = 1.01 H 2^-24):

    |(W x)_r - y_r| <= ||W_r - Ŵ_r|| ||x|| + ||Ŵ_r|| ||x - x̂||        (the roundings of W and x)
                     + γ (||Ŵ_r|| ||x̂|| + ||W_r|| ||x||)               (float32 accumulation, both products)
                     + 2^-8 |y_r|                                       (y rounded to bfloat16)

One bound B serves every row: each norm of W replaced by its largest over the rows (computed once,
1% up for the float32 norm's own rounding), |y_r| by max |y|, and the sum doubled as a margin for
the float32 arithmetic of the bound. Rows below ``max y - 2B`` cannot win. Where more than
``max_candidates`` rows are left, or anything is not finite, the full float32 product decides.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

_CHUNK_ROWS = 4096  # rows per chunk when the norms are computed (bounds the temporary memory)


def _rounded_up(values: Tensor) -> Tensor:
    """float64 -> the smallest float32 values not below them."""
    single = values.float()
    return torch.where(single.double() < values, torch.nextafter(single, torch.tensor(float("inf"))), single)


class BoundedArgmax:
    def __init__(self, weight: Tensor, *, max_candidates: int = 1024) -> None:
        if weight.dim() != 2 or weight.dtype != torch.float32:
            raise ValueError(f"expected a float32 weight [vocab, hidden], got {weight.dtype} {list(weight.shape)}")
        if max_candidates < 1:
            raise ValueError(f"max_candidates must be positive, got {max_candidates}")
        self.weight = weight
        self.max_candidates = max_candidates
        self.low = weight.to(torch.bfloat16)
        # float32 norms, each within H 2^-24 of its value (W_r - Ŵ_r is exact in float32): 1% up covers that
        error = norm = low_norm = 0.0
        finite = True
        for start in range(0, weight.shape[0], _CHUNK_ROWS):
            exact = weight[start : start + _CHUNK_ROWS]
            low = self.low[start : start + _CHUNK_ROWS].float()
            error = max(error, float((exact - low).norm(dim=1).max()))
            norm = max(norm, float(exact.norm(dim=1).max()))
            low_norm = max(low_norm, float(low.norm(dim=1).max()))
            finite = finite and bool(torch.isfinite(exact).all())
        self._gamma = 1.01 * weight.shape[1] * 2.0**-24
        # the largest over rows of what multiplies ||x||, and of what multiplies ||x - x̂|| + γ ||x̂||
        self._x_coefficient = 1.01 * (error + self._gamma * norm)
        self._low_norm = 1.01 * low_norm
        self.usable = finite and math.isfinite(self._x_coefficient) and math.isfinite(self._low_norm)
        self.fallbacks = 0  # rows decided by the full float32 product
        self.candidates = 0  # rows recomputed in float32, over all calls

    def bounds(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(approximate logits y [N, V] float32, bound [N, 1]): every float32 logit of row i lies within
        bound[i] of y[i] (one bound for all of a row's logits: the largest of the per-row bounds)."""
        xd = x.double()
        low_x = x.to(torch.bfloat16)
        x_norm = xd.norm(dim=1, keepdim=True)
        x_terms = (xd - low_x.double()).norm(dim=1, keepdim=True) + self._gamma * low_x.double().norm(dim=1, keepdim=True)
        y = F.linear(low_x, self.low).float()
        largest = torch.maximum(y.max(dim=1, keepdim=True).values, -y.min(dim=1, keepdim=True).values).double()
        bound = self._x_coefficient * x_norm + self._low_norm * x_terms + largest * 2.0**-8
        return y, _rounded_up(bound * 2)

    def __call__(self, x: Tensor) -> Tensor:
        """x [N, H] float32 -> [N] the index of the largest float32 logit of each row."""
        if x.dim() != 2 or x.shape[1] != self.weight.shape[1] or x.dtype != torch.float32:
            raise ValueError(f"expected float32 [rows, {self.weight.shape[1]}], got {x.dtype} {list(x.shape)}")
        if not self.usable or not bool(torch.isfinite(x).all()):
            self.fallbacks += x.shape[0]
            return F.linear(x, self.weight).argmax(dim=-1)
        y, bound = self.bounds(x)
        # a row below the best approximate logit by more than twice the bound is below the best float32 one
        floor = y.max(dim=1, keepdim=True).values - 2 * bound
        keep = y >= floor
        tokens = torch.empty(x.shape[0], dtype=torch.long)
        for i in range(x.shape[0]):
            rows = keep[i].nonzero().squeeze(1)
            if len(rows) > self.max_candidates or not bool(torch.isfinite(floor[i])):
                self.fallbacks += 1
                tokens[i] = F.linear(x[i : i + 1], self.weight).argmax(dim=-1)[0]
                continue
            self.candidates += len(rows)
            logits = F.linear(x[i : i + 1], self.weight.index_select(0, rows))
            tokens[i] = rows[logits.argmax(dim=-1)[0]]
        return tokens
