"""Where 4-bit weights live in memory: torch's CPU kernel layout and a plain one, and unpacking either.

Responsibility: pack ``[N, K]`` values in 0..15 two to a byte, and read rows of them back, so that a
quantized linear can hand its one copy of the weight to ``aten._weight_int4pack_mm_for_cpu`` for small
batches and dequantize a few rows at a time into a dense matrix product for large ones (prefill).

Layouts:
- ``plain``: uint8 ``[N, K / 2]``; byte ``j`` of row ``n`` holds ``k = 2j`` in its low nibble and
  ``k = 2j + 1`` in its high one. Used where the kernel cannot run (shapes it rejects, other devices).
- the kernel's, made by ``aten._convert_weight_to_int4pack_for_cpu``: uint8 ``[N, K / 2]`` too, but rows
  go in blocks (64 rows on AVX-512 builds, 32 on AVX2 and the scalar code), each block stored column
  ``k`` after column ``k``, two of the block's rows to a byte: ``halves64`` (AVX-512) puts rows ``d``
  (low nibble) and ``d + 32`` (high) in byte ``d``; ``halves32`` (AVX2) rows ``d`` and ``d + 16``;
  ``pairs32`` (scalar code) rows ``2j`` and ``2j + 1`` in byte ``j``. A last, partial block (16, 32 or
  48 rows) is always stored in pairs.

Invariant: the kernel layout depends on how torch was built and on the CPU it runs on, so it is never
assumed: :func:`kernel_layout` packs a probe with torch and returns the known layout that reads it back
exactly, or None; with None, kernel-packed weights are never unpacked here (the kernel does all).
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
from torch import Tensor

KernelLayout = Literal["halves64", "halves32", "pairs32"]

BLOCK_ROWS: dict[str, int] = {"halves64": 64, "halves32": 32, "pairs32": 32}
# torch's CPU packing ignores it; gpt-fast's value, should a build ever look at it
INNER_K_TILES = 8


def kernel_available() -> bool:
    """Whether this torch has the int4 CPU kernel and its packing."""
    ops = torch.ops.aten
    return hasattr(ops, "_convert_weight_to_int4pack_for_cpu") and hasattr(ops, "_weight_int4pack_mm_for_cpu")


def pack_plain(values: Tensor) -> Tensor:
    """``[N, K]`` integers in 0..15 (K even) -> uint8 ``[N, K / 2]``, the plain layout."""
    v = values.to(torch.uint8)
    return v[:, 0::2] | (v[:, 1::2] << 4)


def unpack_plain(packed: Tensor, out: Tensor | None = None) -> Tensor:
    """uint8 ``[n, K / 2]`` in the plain layout -> ``[n, K]`` values in 0..15 (into ``out`` if given,
    in its dtype)."""
    rows, half = packed.shape
    if out is None:
        out = torch.empty(rows, 2 * half, dtype=torch.uint8, device=packed.device)
    pairs = out.view(rows, half, 2)
    pairs[..., 0] = packed & 15
    pairs[..., 1] = packed >> 4
    return out


def pack_for_kernel(values: Tensor) -> Tensor:
    """``[N, K]`` integers in 0..15 -> what ``_weight_int4pack_mm_for_cpu`` takes, in this CPU's layout."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(values.to(torch.int32).contiguous(), INNER_K_TILES)


def _split(src: Tensor, dst: Tensor, halves: bool) -> None:
    """Bytes ``src`` [K, blocks, b] -> values ``dst`` [K, blocks, 2b] of the same blocks' rows."""
    b = src.shape[-1]
    if halves:
        dst[..., :b] = src & 15
        dst[..., b:] = src >> 4
    else:
        pairs = dst.unflatten(-1, (b, 2))
        pairs[..., 0] = src & 15
        pairs[..., 1] = src >> 4


def unpack_columns(packed: Tensor, layout: KernelLayout, start: int, end: int, in_features: int,
                   out: Tensor | None = None) -> Tensor:
    """Rows ``[start, end)`` of a kernel-packed weight, transposed as the layout stores them:
    ``[K, end - start]`` values (into ``out`` if given, in its dtype; else uint8).

    ``start`` must be a multiple of the layout's row block; ``end`` too, or the weight's last row.
    """
    rows, k, block = packed.shape[0], in_features, BLOCK_ROWS[layout]
    if start % block or (end % block and end != rows) or not 0 <= start < end <= rows:
        raise ValueError(f"rows [{start}, {end}) do not fall on {block}-row blocks of a {rows}-row weight")
    n = end - start
    if out is None:
        out = torch.empty(k, n, dtype=torch.uint8, device=packed.device)
    data = packed.reshape(-1)[start * k // 2 : end * k // 2]
    full = n // block
    if full:
        src = data[: full * block * k // 2].view(full, k, block // 2).transpose(0, 1)
        _split(src, out[:, : full * block].view(k, full, block), halves=layout != "pairs32")
    tail = n - full * block
    if tail:
        src = data[full * block * k // 2 :].view(1, k, tail // 2).transpose(0, 1)
        _split(src, out[:, full * block :].view(k, 1, tail), halves=False)
    return out


@functools.cache
def kernel_layout() -> KernelLayout | None:
    """The known layout in which this process's torch packs int4 weights for the CPU kernel, or None."""
    if not kernel_available():
        return None
    # 112 rows: full blocks and a partial one under every layout; random values tell the layouts apart
    probe = torch.randint(0, 16, (112, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    try:
        packed = pack_for_kernel(probe)
    except RuntimeError:
        return None
    if packed.dtype != torch.uint8 or tuple(packed.shape) != (112, 32):
        return None
    for layout in ("halves64", "halves32", "pairs32"):
        if torch.equal(unpack_columns(packed, layout, 0, 112, 64).T, probe.to(torch.uint8)):  # type: ignore[arg-type]
            return layout  # type: ignore[return-value]
    return None
