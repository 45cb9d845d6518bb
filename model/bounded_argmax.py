"""Greedy token choice from a float32 LM head at a fraction of its memory traffic, with the same token.

Responsibility: ``argmax_r (W x)_r`` as the float32 product computes it, for a float32 weight ``W``
[V, H]. A decoding step's LM head product reads all of ``W``, and on a CPU that read is the whole
cost (131 MB per token for a 32,000 x 1,024 head). :class:`BoundedArgmax` reads a low-precision copy
instead, int8 with a scale per row (a quarter of the bytes, torch's int8 kernel) or bfloat16 (half),
bounds for every row how far that approximate logit can lie from the float32 one, and recomputes in
float32 only the rows that could still hold the largest logit: a few dozen at most on random heads,
a handful on trained ones.

Invariant: a row is left out only if its float32 logit is provably below another row's, so the
token is the full product's argmax (ties: the lowest index, as ``torch.argmax``). For a row r and an
input x (``||.||`` the Euclidean norm, ``Ŵ_r`` the copy's row as a real vector (s_r q_r for int8),
``x̂`` the bfloat16 rounding of x that the kernels take, ``y`` the computed bfloat16 product,
γ = 1.02 (H + 1) 2^-24):

    |(W x)_r - y_r| <= ||W_r - Ŵ_r|| ||x|| + ||Ŵ_r|| ||x - x̂||        (the roundings of W and x)
                     + γ (||Ŵ_r|| ||x̂|| + ||W_r|| ||x||)               (float32 accumulation, both products)
                     + 2^-8 |y_r|                                       (y rounded to bfloat16)

The row norms are computed once (1% up for the float32 norm's own rounding), the sum is doubled as a
margin for the float32 arithmetic of the bound. Rows whose y_r + bound_r is below the largest
y_s - bound_s cannot win; the rest are recomputed best-first, and once a float32 logit f is known a
row with y_r + bound_r < f is dropped. Where more than ``max_candidates`` rows are left, or anything
is not finite, the full float32 product decides. The kernels must accumulate in float32 (torch's do);
the tests check the bound against the float32 and the float64 products.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_CHUNK_ROWS = 4096  # rows per chunk when the norms are computed (bounds the temporary memory)
_FIRST_ROWS = 16  # candidates recomputed first, to narrow the rest


def _rounded_up(values: Tensor) -> Tensor:
    """float64 -> the smallest float32 values not below them."""
    single = values.float()
    return torch.where(single.double() < values, torch.nextafter(single, torch.tensor(float("inf"))), single)


def _int8_kernel_works() -> bool:
    """Whether torch's int8 weight kernel runs here, with bfloat16 activations (its vectorised path)."""
    try:
        out = torch._weight_int8pack_mm(torch.ones(1, 32, dtype=torch.bfloat16), torch.ones(8, 32, dtype=torch.int8),
                                        torch.ones(8, dtype=torch.bfloat16))
    except (RuntimeError, NotImplementedError, AttributeError):
        return False
    return bool((out.float() == 32).all())


class BoundedArgmax:
    def __init__(self, weight: Tensor, *, precision: str = "int8", max_candidates: int | None = None) -> None:
        """``precision``: the copy read for every row, "int8" (a scale per row; torch's int8 kernel, a quarter
        of the bytes) or "bfloat16" (half); int8 falls back to bfloat16 where torch's kernel is missing.
        ``max_candidates``: beyond this many rows left in (default an eighth of the vocabulary), the full
        float32 product decides instead."""
        if weight.dim() != 2 or weight.dtype != torch.float32:
            raise ValueError(f"expected a float32 weight [vocab, hidden], got {weight.dtype} {list(weight.shape)}")
        if precision not in ("int8", "bfloat16"):
            raise ValueError(f"precision must be int8 or bfloat16, got {precision!r}")
        if max_candidates is not None and max_candidates < 1:
            raise ValueError(f"max_candidates must be positive, got {max_candidates}")
        self.weight = weight
        self.max_candidates = max_candidates if max_candidates is not None else max(64, weight.shape[0] // 8)
        self.precision = precision if precision == "bfloat16" or _int8_kernel_works() else "bfloat16"
        int8 = self.precision == "int8"
        self.low = torch.empty(weight.shape, dtype=torch.int8 if int8 else torch.bfloat16)
        # Ŵ_r = s_r q_r exactly for int8 (a bfloat16 scale times an int8 value fits float32): the norms hold
        self._scale = torch.empty(weight.shape[0], dtype=torch.bfloat16)
        # float32 norms, each within H 2^-24 of its value (W_r - Ŵ_r is exact in float32): 1% up covers that
        errors, norms, low_norms = [], [], []
        finite = True
        for start in range(0, weight.shape[0], _CHUNK_ROWS):  # by chunks: no full-size temporaries
            exact = weight[start : start + _CHUNK_ROWS]
            if int8:
                scale = (exact.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny).to(torch.bfloat16)
                self._scale[start : start + _CHUNK_ROWS] = scale
                low = (exact / scale.float()[:, None]).round_().clamp_(-127, 127)
                self.low[start : start + _CHUNK_ROWS] = low
                low *= scale.float()[:, None]
            else:
                self.low[start : start + _CHUNK_ROWS] = exact
                low = self.low[start : start + _CHUNK_ROWS].float()
            errors.append((exact - low).norm(dim=1))
            norms.append(exact.norm(dim=1))
            low_norms.append(low.norm(dim=1))
            finite = finite and bool(torch.isfinite(exact).all())
        # float32 accumulation over H products, and for int8 the scale's multiplication after it
        self._gamma = 1.02 * (weight.shape[1] + 1) * 2.0**-24
        # per row: what multiplies ||x||, and what multiplies ||x - x̂|| + γ ||x̂||
        self._x_coefficient = (torch.cat(errors) + self._gamma * torch.cat(norms)) * 1.01
        self._low_norm = torch.cat(low_norms) * 1.01
        self.usable = finite and bool(torch.isfinite(self._x_coefficient).all() and torch.isfinite(self._low_norm).all())
        self.fallbacks = 0  # rows decided by the full float32 product
        self.candidates = 0  # rows recomputed in float32, over all calls

    def _product(self, low_x: Tensor) -> Tensor:
        if self.precision == "int8":
            return torch._weight_int8pack_mm(low_x, self.low, self._scale)
        return F.linear(low_x, self.low)

    def bounds(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(approximate logits y [N, V] float32, bounds [N, V]): each float32 logit lies within its bound of y."""
        xd = x.double()
        low_x = x.to(torch.bfloat16)
        x_norm = _rounded_up(xd.norm(dim=1, keepdim=True))
        x_terms = _rounded_up((xd - low_x.double()).norm(dim=1, keepdim=True)
                              + self._gamma * low_x.double().norm(dim=1, keepdim=True))
        y = self._product(low_x).float()
        bound = torch.addcmul(y.abs() * 2.0**-8, self._x_coefficient, x_norm)
        bound.addcmul_(self._low_norm, x_terms)
        return y, bound.mul_(2)

    def __call__(self, x: Tensor) -> Tensor:
        """x [N, H] float32 -> [N] the index of the largest float32 logit of each row."""
        if x.dim() != 2 or x.shape[1] != self.weight.shape[1] or x.dtype != torch.float32:
            raise ValueError(f"expected float32 [rows, {self.weight.shape[1]}], got {x.dtype} {list(x.shape)}")
        if not self.usable or not bool(torch.isfinite(x).all()):
            self.fallbacks += x.shape[0]
            return F.linear(x, self.weight).argmax(dim=-1)
        y, bound = self.bounds(x)
        # a row whose best case is below another row's worst case cannot win
        floor = (y - bound).max(dim=1, keepdim=True).values
        keep = y + bound >= floor
        tokens = torch.empty(x.shape[0], dtype=torch.long)
        for i in range(x.shape[0]):
            rows = keep[i].nonzero().squeeze(1)
            if len(rows) > self.max_candidates or not bool(torch.isfinite(floor[i])):
                self.fallbacks += 1
                tokens[i] = F.linear(x[i : i + 1], self.weight).argmax(dim=-1)[0]
                continue
            tokens[i] = self._rescore(x[i : i + 1], rows, y[i, rows], bound[i, rows])
        return tokens

    def _rescore(self, x: Tensor, rows: Tensor, approximate: Tensor, bound: Tensor) -> int:
        """The winner among ``rows`` by their float32 logits. The rows of the best approximate logits go
        first: once one of them has its float32 logit f, a row whose y_r + bound_r < f cannot win, which
        usually leaves few of the rest to compute."""
        if len(rows) > _FIRST_ROWS:
            order = approximate.argsort(descending=True)
            rows, approximate, bound = rows[order], approximate[order], bound[order]
            first = F.linear(x, self.weight.index_select(0, rows[:_FIRST_ROWS]))[0]
            rest = rows[_FIRST_ROWS:][approximate[_FIRST_ROWS:] + bound[_FIRST_ROWS:] >= first.max()]
            logits = torch.cat([first, F.linear(x, self.weight.index_select(0, rest))[0]])
            rows = torch.cat([rows[:_FIRST_ROWS], rest])
        else:
            logits = F.linear(x, self.weight.index_select(0, rows))[0]
        self.candidates += len(rows)
        winners = rows[logits == logits.max()]
        return int(winners.min())  # ties: the lowest index, as torch.argmax
