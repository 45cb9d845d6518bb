"""Our quantized matrix products for a few rows (decoding steps, small batches, speculative verifies).

Responsibility: load the library that :mod:`.build` compiles (``make`` runs it) and expose
:func:`qmm`: ``x @ W.T`` for int8 weights (symmetric per output channel) and 4-bit weights (groups of
32, 64 or 128, symmetric or with zero points) read row-major as :mod:`..quant` stores them, one weight
or several experts' in one call. Activations are quantized once per row to int8 in blocks of 32; the
products are integer multiply-adds (AVX-512 VNNI, AVX2, or the scalar reference), the instruction set
chosen once from the CPU's features.

``HOMESWARM_KERNELS`` overrides the choice: ``off`` (torch's kernels, as without the library),
``scalar``, ``avx2`` or ``avx512`` (tests use it to run every path this CPU has). Where the library is
absent (no compiler at install, a non-editable install, another architecture) or cannot load,
:func:`available` is False, one log line says why, and callers keep torch's kernels.
"""

from __future__ import annotations

import functools
import logging
import os

import torch
from torch import Tensor

__all__ = ["ISAS", "available", "best_isa", "isa", "qmm"]

log = logging.getLogger(__name__)

ISAS = ("scalar", "avx2", "avx512")
ENV = "HOMESWARM_KERNELS"
_ABI_VERSION = 1


@functools.cache
def _load() -> bool:
    # imported here, not at the top: `python -m homeswarm.model.kernels.build` imports this package first
    from .build import library_path

    path = library_path()
    if not path.exists():
        log.info("quantized kernels not built (%s missing: run `make` or `python -m homeswarm.model.kernels.build`); "
                 "torch's kernels in use", path.name)
        return False
    try:
        torch.ops.load_library(str(path))
        version = torch.ops.homeswarm.abi_version()
    except (OSError, RuntimeError) as exc:
        log.warning("quantized kernels failed to load (%s); torch's kernels in use", exc)
        return False
    if version != _ABI_VERSION:
        log.warning("quantized kernels of version %s, expected %s; torch's kernels in use", version, _ABI_VERSION)
        return False
    return True


@functools.cache
def best_isa() -> int:
    """The best instruction set of this CPU that the library has: an index into :data:`ISAS`, -1 without it."""
    return int(torch.ops.homeswarm.best_isa()) if _load() else -1


def isa() -> int:
    """The instruction set products run with (:data:`ISAS` index), -1 for none (torch's kernels)."""
    choice = os.environ.get(ENV, "").strip().lower()
    best = best_isa()
    if choice in ("", "auto"):
        return best
    if choice == "off":
        return -1
    if choice not in ISAS:
        raise ValueError(f"{ENV}={choice!r}: use off, auto or one of {', '.join(ISAS)}")
    return min(ISAS.index(choice), best)


def available() -> bool:
    """Whether :func:`qmm` runs here (the library loaded and not turned off)."""
    return isa() >= 0


def qmm(x: Tensor, weights: list[Tensor], scales: list[Tensor], group: int = 0, row_index: Tensor | None = None,
        offsets: Tensor | None = None, isa_index: int | None = None) -> Tensor:
    """float32 ``[T, N]``: row ``t`` is ``x[row_index[t]] @ W_e.T`` for ``t`` in ``offsets[e]:offsets[e + 1]``.

    ``group == 0``: int8 weights ``[N, K]`` with scales ``[N]``; else 4-bit weights in the plain layout
    (uint8 ``[N, K / 2]``) with scales ``[N, K / group, Z]`` (``Z == 2``: a zero point after each scale),
    ``w = (v - 8) * s + z``. Scales in float32, bfloat16 or float16, read as stored. Without
    ``row_index`` and ``offsets``: one weight, every row of ``x``.
    """
    x = x.float().contiguous()
    if row_index is None:
        row_index = torch.arange(x.shape[0])
        offsets = torch.tensor([0, x.shape[0]])
    assert offsets is not None
    chosen = isa() if isa_index is None else isa_index
    return torch.ops.homeswarm.qmm(x, weights, scales, row_index, offsets, group, chosen)
