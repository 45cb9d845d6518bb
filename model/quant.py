"""Weight-only quantization of a block's linear layers and experts: int8 and int4, on torch's CPU kernels.

Responsibility: turn a loaded block's ``nn.Linear`` layers into :class:`QuantizedLinearInt8` or
:class:`QuantizedLinearInt4` (drop-in modules: same ``forward`` contract, same bias in the model dtype)
and its stacked :class:`~.moe.Experts` into :class:`QuantizedExperts`, in place (:func:`quantize_block`,
called by the loader on one block at a time, so the float copy of one block only ever exists).
- int8: symmetric, one scale per output channel: ``w = q * scale``, ``q`` in -128..127.
- int4: asymmetric, one scale and zero point per group of ``group_size`` inputs:
  ``w = (q - 8) * scale + zero``, ``q`` in 0..15 (the form torch's int4 kernel computes).
Scales and zero points are stored in bfloat16 (rounded before the weights are quantized against them,
so every path multiplies by the same numbers), which keeps int4 at 32-weight groups under 0.16x of
float32.

What runs: on the CPU, up to a few rows (decoding steps, small batches, speculative verify steps), our
own kernels where their library is built (:mod:`.kernels`: activations quantized to int8 in blocks of
32, integer multiply-adds), up to ``OURS_MAX_ROWS`` rows; int4 weights are then held in the ``rows``
layout (plain 4-bit rows, scales and zero points ``[N, K' / g, 2]``), which torch's kernel does not
read. Past those rows (up to ``kernel_max_rows``), and everywhere without our library, torch's kernels
(``aten._weight_int8pack_mm``, ``aten._weight_int4pack_mm_for_cpu``) with bfloat16 activations, the
only ones their x86 code vectorises. float32 and float16 activations are cast to bfloat16 for the
kernel and the result cast back: on a 2048x5632 weight at batch 1 that ran 3x (int8) to 5x (int4)
faster than the kernels' scalar float32 code and over 10x faster than dequantizing the weight on
every call, and on the demo model it moved the KL divergence from float32 by less than a bfloat16
model's own (bench/bench_quant.py). More rows (prefill), other devices, and shapes the kernels reject
dequantize a cache-sized chunk of rows at a time into the activations' dtype and multiply densely; on a
CPU that multiplies bfloat16 fast (:func:`dense_bfloat16`, measured at first use), prefill rows are cast
to bfloat16 for that product too (a 512-token prefill of a 2048/5632 block: 3-4x faster than float32's,
where a float32 dense product after dequantizing was 0.8-0.95x).
Rejected shapes: int8 inputs not a multiple of 16 (torch's bfloat16 kernel reads 16 at a time with
aligned loads and no tail: it returns garbage or crashes on them), int4 outputs not a multiple of 16
or inputs not a multiple of the group size.

Not quantized: embeddings, norms, routers and gates (``gate``, ``router``, ``shared_expert_gate``), and
expert classes other than :class:`~.moe.Experts` (GPT-OSS's interleaved, biased experts keep the model
dtype). This module knows nothing of checkpoints or the network.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import int4_pack, kernels
from .moe import Experts, by_expert
from .quant_values import SCALE_DTYPE, dequantize_int4, dequantize_int8, quantize_int4, quantize_int8

__all__ = ["DEFAULT_INT4_GROUP_SIZE", "INT4_GROUP_SIZES", "QUANT_FORMATS", "UNQUANTIZED_NAMES", "QuantizedExperts",
           "QuantizedLinearInt4", "QuantizedLinearInt8", "check_quant", "dequantize_int4", "dequantize_int8",
           "dense_bfloat16", "is_quantizable", "matrix_bytes", "quantize_block", "quantize_int4", "quantize_int8", "quantize_linear"]

QUANT_FORMATS = ("none", "int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128)
# groups of 32: on the demo model a third less KL divergence from float32 than 64, at 0.156x of float32's
# bytes (bench/bench_quant.py)
DEFAULT_INT4_GROUP_SIZE = 32
# Modules named so are routers or gates: they stay in the model dtype.
UNQUANTIZED_NAMES = ("gate", "router", "shared_expert_gate")

_SCALE_DTYPE = SCALE_DTYPE
_KERNEL_DTYPE = torch.bfloat16
_INT8_K_MULTIPLE = 16  # torch's bfloat16 int8 kernel reads 16 inputs at a time, with no tail
_INT4_N_MULTIPLE = 16
# Rows dequantized at once: about 16 MiB of float32. Every chunk costs a few parallel operations, and on
# a machine whose other work keeps a core busy each of those waits for its threads to be scheduled: a
# 512-token prefill through a 2048/5632 block took 2.3x float32's time with 4 MiB chunks and 1.5x with
# 16 MiB (2 threads, one core busy), while on a free core 4 and 16 MiB were within 3% of each other.
_DEQUANT_CHUNK_BYTES = 16 << 20
_HAS_INT8_KERNEL = hasattr(torch.ops.aten, "_weight_int8pack_mm")
# Our kernels up to this many rows (decoding steps, small batches, speculative verify steps). Past it the
# int8 activations' rounding would reach prefill rows too: on the random test checkpoints (peaked
# attention) a 24-row prefill through them differed from the float block by up to 11% in a row, where
# bfloat16 activations give 2.5% (tests/unit/test_model_quant.py).
OURS_MAX_ROWS = 8
_dense_bfloat16: bool | None = None  # see dense_bfloat16(); None until measured


def dense_bfloat16() -> bool:
    """Whether dense products of quantized weights on the CPU (prefill: past ``kernel_max_rows`` rows) run
    in bfloat16: where the CPU multiplies bfloat16 much faster than float32 (oneDNN on AVX-512 BF16 or
    AMX: a 512x2048 by 2048x5632 product took 17.8 ms against 85 ms in float32, one thread, medians of alternating rounds), so a
    quantized prefill is not slower than float32's. Measured once per process, at first use; the
    activations are rounded to bfloat16 as the kernels already round them for decoding steps."""
    global _dense_bfloat16
    if _dense_bfloat16 is None:
        _dense_bfloat16 = _bfloat16_products_are_faster()
    return _dense_bfloat16


def _bfloat16_products_are_faster(margin: float = 1.5) -> bool:
    """Time a prefill-shaped product (128 rows through a 1024x2048 weight) in float32 and in bfloat16,
    alternating, best of 3 each; bfloat16 is chosen only when ``margin`` times faster (CPUs without
    bfloat16 arithmetic emulate it, several times slower than float32)."""
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(128, 1024, generator=gen), torch.randn(2048, 1024, generator=gen)
    xb, wb = x.to(_KERNEL_DTYPE), w.to(_KERNEL_DTYPE)
    best = {torch.float32: float("inf"), _KERNEL_DTYPE: float("inf")}
    with torch.no_grad():
        for _ in range(3):
            for dtype, (a, b) in ((torch.float32, (x, w)), (_KERNEL_DTYPE, (xb, wb))):
                start = time.perf_counter()
                F.linear(a, b)
                best[dtype] = min(best[dtype], time.perf_counter() - start)
    return best[_KERNEL_DTYPE] * margin < best[torch.float32]


def check_quant(quant: str, group_size: int = DEFAULT_INT4_GROUP_SIZE) -> None:
    """Raise ValueError unless ``quant`` is a known format and ``group_size`` a supported int4 group."""
    if quant not in QUANT_FORMATS:
        raise ValueError(f"unknown quantization {quant!r}; use one of {', '.join(QUANT_FORMATS)}")
    if quant == "int4" and group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group size must be one of {INT4_GROUP_SIZES}, got {group_size!r}")


def matrix_bytes(out_features: int, in_features: int, quant: str, group_size: int = DEFAULT_INT4_GROUP_SIZE,
                 element_size: int = 4) -> int:
    """Bytes an ``[out, in]`` weight takes in ``quant`` (with its scales and zero points), biases aside."""
    check_quant(quant, group_size)
    scale = _SCALE_DTYPE.itemsize
    if quant == "int8":
        return out_features * (in_features + scale)
    if quant == "int4":
        groups = -(-in_features // group_size)
        return out_features * groups * (group_size // 2 + 2 * scale)
    return out_features * in_features * element_size


def _rounded(w: Tensor, cast: Tensor | None) -> Tensor:
    """``w``, or ``w`` rounded once into the front of the flat buffer ``cast`` (same shape)."""
    return w if cast is None else cast[: w.numel()].view(w.shape).copy_(w)


def _kernel_input(x: Tensor) -> Tensor:
    """``x`` [M, K] as the kernels read it: bfloat16, contiguous, 64-byte aligned (torch's bfloat16
    int8 kernel uses aligned loads: a view at an odd offset crashes it)."""
    x = x.to(_KERNEL_DTYPE).contiguous()
    return x if x.data_ptr() % 64 == 0 else x.clone()


class _QuantizedLinear(nn.Module):
    """What both linears share: shapes, bias, and the choice between kernel and dense product."""

    in_features: int
    out_features: int
    bias: nn.Parameter | None
    # Up to this many rows the kernel beats dequantize-then-multiply (measured on a 2048x5632 weight,
    # bench/bench_quant.py); past it the dense product wins.
    kernel_max_rows: int

    def _init_bias(self, bias: Tensor | None) -> None:
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, the layer takes {self.in_features}")
        y = self.matmul(x.reshape(-1, self.in_features))
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def matmul(self, rows: Tensor) -> Tensor:
        """``rows @ W.T`` in ``rows``' dtype (``rows`` [M, in_features]): our kernel, torch's or the dense
        product (past ``kernel_max_rows`` rows on a CPU that multiplies bfloat16 fast, in bfloat16 like
        torch's kernels)."""
        if rows.device.type == "cpu":
            if rows.shape[0] <= self.ours_max_rows() and self.uses_ours:
                return self.ours_matmul(rows).to(rows.dtype)
            if self.uses_torch_kernel and rows.shape[0] <= self.kernel_max_rows:
                return self.kernel_matmul(rows).to(rows.dtype)
            if rows.shape[0] > self.kernel_rows() and rows.dtype != _KERNEL_DTYPE and dense_bfloat16():
                return self.dense_matmul(rows.to(_KERNEL_DTYPE)).to(rows.dtype)
        return self.dense_matmul(rows)

    @property
    def uses_kernel(self) -> bool:
        """Whether small batches go through a kernel, ours or torch's (else every batch takes the dense path)."""
        return self.uses_ours or self.uses_torch_kernel

    @property
    def uses_torch_kernel(self) -> bool:
        """Whether torch's kernel reads this weight."""
        raise NotImplementedError

    @property
    def uses_ours(self) -> bool:
        """Whether our kernel (:mod:`.kernels`) reads this weight here."""
        raise NotImplementedError

    def ours_max_rows(self) -> int:
        """Up to how many rows our kernel runs."""
        return min(OURS_MAX_ROWS, self.kernel_max_rows)

    def kernel_rows(self) -> int:
        """Up to how many rows a kernel (ours or torch's) runs here; past them, prefill rows (the dense
        product, in bfloat16 where :func:`dense_bfloat16`). Where no kernel reads the weight, batches up to
        ``kernel_max_rows`` take the dense product in their own dtype, as decoding steps."""
        if not self.uses_ours:
            return self.kernel_max_rows
        return max(self.ours_max_rows(), self.kernel_max_rows if self.uses_torch_kernel else 0)

    def ours_matmul(self, x: Tensor) -> Tensor:
        """``x @ W.T`` by our kernel, in float32."""
        raise NotImplementedError

    def ours_operands(self) -> tuple[Tensor, Tensor, int]:
        """(weight, scales, group: 0 for int8) as our kernel reads them."""
        raise NotImplementedError

    def kernel_matmul(self, x: Tensor, dtype: torch.dtype = _KERNEL_DTYPE) -> Tensor:
        """``x @ W.T`` by torch's kernel, activations in ``dtype`` (bfloat16: the vectorised code;
        float32: the exact, scalar code, for tests). The result is in ``dtype``."""
        raise NotImplementedError

    def _chunk_rows(self) -> int:
        """Output channels dequantized at once: a multiple of the weight's row block."""
        return max(1, _DEQUANT_CHUNK_BYTES // (4 * self.in_features))

    def _dense_scales(self, dtype: torch.dtype) -> tuple[Tensor, ...]:
        """What dequantizing takes besides the packed weight, in ``dtype``, for every row at once (converting
        chunk by chunk costs many tiny operations)."""
        raise NotImplementedError

    def _dense_chunk(self, x: Tensor, scales: tuple[Tensor, ...], buffer: Tensor, start: int, end: int,
                     out: Tensor, cast: Tensor | None) -> None:
        """``out[:, start:end] = x @ W[start:end].T``, dequantizing those rows into ``buffer`` (flat, in
        ``_dequant_dtype``), then, where ``cast`` is given, rounding them once into it (``x``'s dtype)."""
        raise NotImplementedError

    def _dequant_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype weights are dequantized in for a product in ``dtype``."""
        return dtype

    def dense_matmul(self, x: Tensor) -> Tensor:
        """``x @ W.T`` in ``x``'s dtype, dequantizing a cache-sized chunk of rows at a time into one buffer."""
        step = min(self._chunk_rows(), self.out_features)
        work = self._dequant_dtype(x.dtype)
        scales = self._dense_scales(work)
        size = step * self._padded_features()
        buffer = torch.empty(size, dtype=work, device=x.device)
        cast = None if work == x.dtype else torch.empty(size, dtype=x.dtype, device=x.device)
        out = torch.empty(x.shape[0], self.out_features, dtype=x.dtype, device=x.device)
        for start in range(0, self.out_features, step):
            self._dense_chunk(x, scales, buffer, start, min(start + step, self.out_features), out, cast)
        return out

    def _padded_features(self) -> int:
        return self.in_features

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight ``[out_features, in_features]`` as the dense path multiplies by it."""
        eye = torch.eye(self.in_features, dtype=dtype, device=self.weight.device)
        return self.dense_matmul(eye).T.contiguous()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class QuantizedLinearInt8(_QuantizedLinear):
    """int8 weights, one bfloat16 scale per output channel; a drop-in for ``nn.Linear``."""

    kernel_max_rows = 48

    def __init__(self, q: Tensor, scales: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("weight", q)
        self.register_buffer("scales", scales)
        self._init_bias(bias)

    @classmethod
    def from_weight(cls, weight: Tensor, bias: Tensor | None = None) -> QuantizedLinearInt8:
        return cls(*quantize_int8(weight), bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> QuantizedLinearInt8:
        return cls.from_weight(linear.weight, linear.bias)

    @property
    def uses_torch_kernel(self) -> bool:
        return _HAS_INT8_KERNEL and self.weight.device.type == "cpu" and self.in_features % _INT8_K_MULTIPLE == 0

    @property
    def uses_ours(self) -> bool:
        return self.weight.device.type == "cpu" and kernels.available()

    def ours_operands(self) -> tuple[Tensor, Tensor, int]:
        return self.weight, self.scales, 0

    def ours_matmul(self, x: Tensor) -> Tensor:
        return kernels.qmm(x, [self.weight], [self.scales], 0)

    def kernel_matmul(self, x: Tensor, dtype: torch.dtype = _KERNEL_DTYPE) -> Tensor:
        if not self.uses_torch_kernel:  # ours, with activations rounded to int8 (float32: none, exact)
            return self.dense_matmul(x.float()) if dtype == torch.float32 else self.ours_matmul(x).to(dtype)
        x = _kernel_input(x) if dtype == _KERNEL_DTYPE else x.to(dtype).contiguous()
        return torch.ops.aten._weight_int8pack_mm(x, self.weight, self.scales.to(dtype))

    def _dense_scales(self, dtype: torch.dtype) -> tuple[Tensor, ...]:
        # converted first: int8 times bfloat16 scales would multiply in bfloat16
        return (self.scales.to(dtype)[:, None],)

    def _dense_chunk(self, x: Tensor, scales: tuple[Tensor, ...], buffer: Tensor, start: int, end: int,
                     out: Tensor, cast: Tensor | None) -> None:
        w = buffer[: (end - start) * self.in_features].view(end - start, self.in_features)
        # a conversion, then a multiplication: each vectorised (torch.mul of int8 by float is not, 6x slower)
        w.copy_(self.weight[start:end]).mul_(scales[0][start:end])
        torch.mm(x, _rounded(w, cast).T, out=out[:, start:end])


class QuantizedLinearInt4(_QuantizedLinear):
    """4-bit weights with a bfloat16 scale and zero point per group of inputs; a drop-in for ``nn.Linear``.

    ``weight`` is in our kernel's layout where its library is built (``layout == "rows"``: the plain
    layout, with ``scales_and_zeros`` ``[N, K' / g, Z]``, ``Z`` 2, or 1 where every zero point is 0),
    else packed for torch's CPU kernel where that kernel takes the shape (``layout`` names the kernel's
    layout, or is None when it is not one :mod:`.int4_pack` can read), else in the plain layout
    (``layout == "plain"``, inputs padded to whole groups); in both of these ``scales_and_zeros`` is
    ``[K' / g, N, 2]``, torch's kernel's form.
    """

    # unpacking 4-bit weights costs more than converting int8 ones: the kernel wins longer
    kernel_max_rows = 128

    def __init__(self, packed: Tensor, scales_and_zeros: Tensor, *, in_features: int, group_size: int,
                 layout: str | None, bias: Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features, self.group_size = packed.shape[0], in_features, group_size
        self.layout = layout
        self.register_buffer("weight", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        self._init_bias(bias)

    @classmethod
    def from_weight(cls, weight: Tensor, group_size: int, bias: Tensor | None = None) -> QuantizedLinearInt4:
        if group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"int4 group size must be one of {INT4_GROUP_SIZES}, got {group_size!r}")
        rows, cols = weight.shape
        q, scales, zeros = quantize_int4(weight, group_size)
        if weight.device.type == "cpu" and kernels.available():
            return cls(int4_pack.pack_plain(q), torch.stack((scales, zeros), dim=-1), in_features=cols,
                       group_size=group_size, layout="rows", bias=bias)
        scales_and_zeros = torch.stack((scales, zeros), dim=-1).transpose(0, 1).contiguous()
        if (weight.device.type == "cpu" and int4_pack.kernel_available() and rows % _INT4_N_MULTIPLE == 0
                and cols % group_size == 0):
            packed, layout = int4_pack.pack_for_kernel(q), int4_pack.kernel_layout()
        else:
            packed, layout = int4_pack.pack_plain(q), "plain"
        return cls(packed, scales_and_zeros, in_features=cols, group_size=group_size, layout=layout, bias=bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int) -> QuantizedLinearInt4:
        return cls.from_weight(linear.weight, group_size, linear.bias)

    @property
    def uses_torch_kernel(self) -> bool:
        return self.layout not in ("plain", "rows")

    @property
    def uses_ours(self) -> bool:
        return self.layout == "rows" and self.weight.device.type == "cpu" and kernels.available()

    def ours_operands(self) -> tuple[Tensor, Tensor, int]:
        return self.weight, self.scales_and_zeros, self.group_size

    def ours_matmul(self, x: Tensor) -> Tensor:
        padded = self._padded_features()
        if padded != self.in_features:
            x = F.pad(x, (0, padded - self.in_features))
        return kernels.qmm(x, [self.weight], [self.scales_and_zeros], self.group_size)

    def kernel_matmul(self, x: Tensor, dtype: torch.dtype = _KERNEL_DTYPE) -> Tensor:
        if self.layout == "rows":  # ours, with activations rounded to int8 (float32: none, exact)
            return self.dense_matmul(x.float()) if dtype == torch.float32 else self.ours_matmul(x).to(dtype)
        x = x.to(dtype).contiguous()
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.weight, self.group_size,
                                                         self.scales_and_zeros.to(dtype))

    def _padded_features(self) -> int:
        return self.weight.shape[1] * 2

    def _chunk_rows(self) -> int:
        if self.layout in (None, "plain", "rows"):
            return super()._chunk_rows()
        block = int4_pack.BLOCK_ROWS[self.layout]
        return max(block, super()._chunk_rows() // block * block)

    def dense_matmul(self, x: Tensor) -> Tensor:
        if self.layout is None:  # packed in a layout that only the kernel reads
            return self.kernel_matmul(x).to(x.dtype)
        return super().dense_matmul(x)

    def _dequant_dtype(self, dtype: torch.dtype) -> torch.dtype:
        # q * scale + shift in half precision rounds twice, and the sum cancels: a weight was off by up to
        # 1% (8e-3 of a product's largest output at bfloat16); in float32, then rounded once, 2^-9
        return torch.float32

    def _dense_scales(self, dtype: torch.dtype) -> tuple[Tensor, ...]:
        scales_and_zeros = self.scales_and_zeros.float()  # [G, N, 2]; "rows": [N, G, Z]
        scales = scales_and_zeros[..., 0]
        # w = q * scale + (zero - 8 * scale): two passes over the chunk, where (q - 8) * scale + zero takes three
        shifts = (scales_and_zeros[..., 1] if scales_and_zeros.shape[-1] == 2 else 0) - 8 * scales
        if self.layout == "rows":  # [N, G, 1], for rows of inputs
            return scales.to(dtype)[..., None], shifts.to(dtype)[..., None]
        if self.layout == "plain":  # [N, G, 1], for rows of inputs
            return scales.T.to(dtype)[..., None], shifts.T.to(dtype)[..., None]
        return scales.to(dtype)[:, None], shifts.to(dtype)[:, None]  # [G, 1, N], for columns of inputs

    def _dense_chunk(self, x: Tensor, scales: tuple[Tensor, ...], buffer: Tensor, start: int, end: int,
                     out: Tensor, cast: Tensor | None) -> None:
        rows, padded = end - start, self._padded_features()
        scale, shift = scales
        if self.layout in ("plain", "rows"):  # rows of inputs: [rows, K']
            w = int4_pack.unpack_plain(self.weight[start:end], buffer[: rows * padded].view(rows, padded))
            w.view(rows, -1, self.group_size).mul_(scale[start:end]).add_(shift[start:end])
            torch.mm(x, _rounded(w, cast)[:, : self.in_features].T, out=out[:, start:end])
            return
        # the kernel's layouts store columns of inputs: [K, rows]
        wt = int4_pack.unpack_columns(self.weight, self.layout, start, end, self.in_features,  # type: ignore[arg-type]
                                      out=buffer[: rows * padded].view(padded, rows))
        wt.view(-1, self.group_size, rows).mul_(scale[..., start:end]).add_(shift[..., start:end])
        torch.mm(x, _rounded(wt, cast), out=out[:, start:end])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}, layout={self.layout}"


def quantize_linear(linear: nn.Linear, quant: str, group_size: int = DEFAULT_INT4_GROUP_SIZE) -> nn.Module:
    """``linear`` in ``quant`` ("none" returns it as it is)."""
    check_quant(quant, group_size)
    if quant == "int8":
        return QuantizedLinearInt8.from_linear(linear)
    if quant == "int4":
        return QuantizedLinearInt4.from_linear(linear, group_size)
    return linear


class QuantizedExperts(nn.Module):
    """:class:`~.moe.Experts` with each expert's two projections quantized; the same ``forward``."""

    def __init__(self, gate_up: list[nn.Module], down: list[nn.Module]) -> None:
        super().__init__()
        if len(gate_up) != len(down):
            raise ValueError(f"{len(gate_up)} gate/up projections but {len(down)} down projections")
        self.num_experts = len(gate_up)
        self.gate_up = nn.ModuleList(gate_up)
        self.down = nn.ModuleList(down)

    @classmethod
    def from_experts(cls, experts: Experts, quant: str, group_size: int = DEFAULT_INT4_GROUP_SIZE) -> QuantizedExperts:
        check_quant(quant, group_size)
        if quant == "none":
            raise ValueError("QuantizedExperts needs int8 or int4")

        def one(weight: Tensor) -> nn.Module:
            if quant == "int8":
                return QuantizedLinearInt8.from_weight(weight)
            return QuantizedLinearInt4.from_weight(weight, group_size)

        return cls([one(w) for w in experts.gate_up_proj], [one(w) for w in experts.down_proj])

    def forward(self, x: Tensor, weights: Tensor, indices: Tensor) -> Tensor:
        if x.shape[0] <= OURS_MAX_ROWS and x.device.type == "cpu" and kernels.available():
            out = experts_by_our_kernel(x, weights, indices, self.num_experts,
                                        lambda e: (self.gate_up[e],), lambda e: self.down[e])
            if out is not None:
                return out
        out = torch.zeros_like(x)
        for expert, rows, slots in by_expert(indices, self.num_experts):
            gate, up = self.gate_up[expert](x[rows]).chunk(2, dim=-1)
            y = self.down[expert](F.silu(gate) * up)
            y = y * weights[rows, slots, None]
            out.index_add_(0, rows, y.to(out.dtype))
        return out


def _ours_operands(modules: list[nn.Module], rows: int) -> tuple[list[Tensor], list[Tensor], int] | None:
    """Weights, scales and group of quantized linears our kernel can read in one call for up to ``rows``
    rows each, else None."""
    operands = []
    for module in modules:
        if (not isinstance(module, _QuantizedLinear) or not module.uses_ours or module.bias is not None
                or rows > module.ours_max_rows()):
            return None
        operands.append(module.ours_operands())
    groups = {group for _, _, group in operands}
    dtypes = {(w.dtype, s.dtype, s.shape[1:]) for w, s, _ in operands}
    if len(groups) != 1 or len(dtypes) != 1:
        return None
    return [w for w, _, _ in operands], [s for _, s, _ in operands], groups.pop()


def _pad_inputs(x: Tensor, weight: Tensor, group: int) -> Tensor:
    """``x`` padded with zeros to the inputs of a weight (4-bit weights hold whole groups)."""
    padded = weight.shape[1] * 2 if group else weight.shape[1]
    return F.pad(x, (0, padded - x.shape[1])) if padded != x.shape[1] else x


def experts_by_our_kernel(x: Tensor, weights: Tensor, indices: Tensor, num_experts: int,
                          first: Callable[[int], tuple[nn.Module, ...]],
                          down: Callable[[int], nn.Module]) -> Tensor | None:
    """The chosen experts' gated SiLU MLPs through our kernel: every expert's first projections in one
    call (``first(e)``: a fused gate/up linear, or the gate and the up linears), then every down
    projection in one; each row's experts summed in ascending order as :class:`~.moe.Experts` sums them.
    None where a chosen expert's weights are not all ones our kernel reads alike."""
    groups = by_expert(indices, num_experts)
    firsts = [first(e) for e, _, _ in groups]
    parts = len(firsts[0])
    most = max(len(r) for _, r, _ in groups)
    first_ops = _ours_operands([m[i] for i in range(parts) for m in firsts], most)
    down_ops = _ours_operands([down(e) for e, _, _ in groups], most)
    if first_ops is None or down_ops is None:
        return None
    rows = torch.cat([r for _, r, _ in groups])
    slots = torch.cat([s for _, _, s in groups])
    offsets = torch.tensor([0] + [len(r) for _, r, _ in groups]).cumsum(0)
    total = len(rows)
    ws, ss, group = first_ops
    h = kernels.qmm(_pad_inputs(x.float(), ws[0], group), ws, ss, group, rows.repeat(parts), torch.cat([offsets[:1], *(offsets[1:] + i * total
                                                                                      for i in range(parts))]))
    gate, up = h.chunk(2, dim=-1) if parts == 1 else h.split(total)
    ws, ss, group = down_ops
    y = kernels.qmm(_pad_inputs(F.silu(gate) * up, ws[0], group), ws, ss, group, torch.arange(total), offsets)
    y = y * weights[rows, slots, None]
    out = torch.zeros(x.shape, dtype=y.dtype)
    out.index_add_(0, rows, y)  # in each row, its experts in ascending order
    return out.to(x.dtype)


def is_quantizable(name: str, module: nn.Module) -> bool:
    """Whether :func:`quantize_block` replaces the submodule ``name`` (a dotted path) of a block."""
    if name.rsplit(".", 1)[-1] in UNQUANTIZED_NAMES:
        return False
    return type(module) is Experts or isinstance(module, nn.Linear)


def quantize_block(block: nn.Module, quant: str, group_size: int = DEFAULT_INT4_GROUP_SIZE) -> nn.Module:
    """Replace, in place, the linear layers and experts of a loaded block by quantized ones; return it."""
    check_quant(quant, group_size)
    if quant == "none":
        return block
    targets = [(name, module) for name, module in block.named_modules() if name and is_quantizable(name, module)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = block.get_submodule(parent_name) if parent_name else block
        if isinstance(module, Experts):
            new: nn.Module = QuantizedExperts.from_experts(module, quant, group_size)
        else:
            new = quantize_linear(module, quant, group_size)  # type: ignore[arg-type]
        setattr(parent, child, new)
    _own_tensors(block)
    block.requires_grad_(False)
    return block


def _own_tensors(block: nn.Module) -> None:
    """Copy the tensors that stay unquantized. Tensors read from a checkpoint may be views of the file's
    memory map, which stays mapped, with every page read through it counted in the process's memory,
    while any view lives: a kept norm would keep the whole block's float weights counted."""
    for module in block.modules():
        if isinstance(module, (_QuantizedLinear, QuantizedExperts)):
            continue
        for param in module.parameters(recurse=False):
            param.data = param.data.clone()
        for name, buffer in module.named_buffers(recurse=False):
            module._buffers[name] = buffer.clone()
