"""How many blocks a node can hold, and how much memory its KV cache gets: pure arithmetic over sizes.

A node's memory budget (``--max-memory``, else a fraction of the memory available at start) holds its
runtime (the process tree's fixed cost and working memory: see ``node.volunteer.runtime_cost``), its
blocks' weights and the KV cache of its sessions; what the runtime leaves goes to weights and cache.
Either the cache is given in tokens (``--max-cache-tokens``), and every block costs its weights plus that
many tokens of cache, or the cache gets its share of the budget (``--cache-share``) and the weights at most
the rest: fewer blocks than fit leave memory unused rather than grow the cache past its share. The cache
budget is a limit, not an allocation: sessions take cache as they open, up to it. Blocks differ in size (a
MoE model's first blocks may be dense), and the span is chosen after the count, so the count is one that
fits wherever the span lands.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

# share of the memory available at start that a node takes when --max-memory is not given: on a PC the
# owner keeps the other half; a GPU is there for this work, less a margin for the allocator
DEFAULT_MEMORY_FRACTION = {"cpu": 0.5, "cuda": 0.9}
DEFAULT_CACHE_SHARE = 0.25
# Beside weights and KV cache, a node's memory holds its runtime: what the process tree takes once the
# DHT runs (measured at start; this when it cannot be read), and the working memory of its largest step
# (activations, the allocator's slack), which the measurement at start cannot see yet.
DEFAULT_FIXED_COST = 768 * 2**20
WORKING_MEMORY = 64 * 2**20

_UNITS = {
    "b": 1,
    "k": 2**10, "kib": 2**10, "kb": 10**3,
    "m": 2**20, "mib": 2**20, "mb": 10**6,
    "g": 2**30, "gib": 2**30, "gb": 10**9,
    "t": 2**40, "tib": 2**40, "tb": 10**12,
}  # fmt: skip
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*")


SIZE_UNITS = "B, KiB, MiB, GiB, TiB, KB, MB, GB, TB (K, M, G, T alone are binary)"


def parse_size(text: str) -> int:
    """Bytes in a size such as "4GiB", "500MB", "1.5G" (K, M, G, T alone are binary), "123B". A number
    without a unit is refused: tools read it as bytes, kilobytes or gigabytes, and "4" meant as 4 GiB
    would otherwise give a node 4 bytes."""
    match = _SIZE_RE.fullmatch(text)
    if match is not None and not match.group(2):
        raise ValueError(f"a size needs a unit, one of {SIZE_UNITS}: got {text!r} (a number without a unit is "
                         f"bytes in some tools, gigabytes in others)")
    if match is None or match.group(2).lower() not in _UNITS:
        raise ValueError(f"a size is a number and a unit, one of {SIZE_UNITS}: got {text!r}")
    size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if size <= 0:
        raise ValueError(f"a size must be positive, got {text!r}")
    return size


def format_size(size: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def default_budget(available: int, device_type: str) -> int:
    """The memory budget when none is given: a fraction of what the device has available."""
    return int(available * DEFAULT_MEMORY_FRACTION.get(device_type, DEFAULT_MEMORY_FRACTION["cpu"]))


def blocks_that_fit(block_bytes: Sequence[int], extra_per_block: int, budget: int) -> int:
    """The largest ``n`` such that any ``n`` consecutive blocks, each costing its weights plus
    ``extra_per_block`` (cache), fit in ``budget``; 0 when not even one does."""
    total = len(block_bytes)
    prefix = [0]
    for size in block_bytes:
        prefix.append(prefix[-1] + size)
    best = 0
    for n in range(1, total + 1):
        widest = max(prefix[s + n] - prefix[s] for s in range(total - n + 1))
        if widest + n * extra_per_block > budget:
            break
        best = n
    return best


@dataclass(frozen=True)
class WeightBudget:
    """What the blocks may use, and what each costs beside its weights."""

    weights: int  # bytes the blocks' weights (plus ``per_block_cache`` each) may take
    per_block_cache: int  # cache bytes reserved per block (a token budget given), else 0


def weight_budget(budget: int, *, cache_share: float, cache_tokens: int | None, token_bytes_per_block: int
                  ) -> WeightBudget:
    """Split a memory budget between weights and cache, as the module docstring says."""
    if cache_tokens is not None:
        return WeightBudget(budget, cache_tokens * token_bytes_per_block)
    return WeightBudget(int(budget * (1 - cache_share)), 0)


def cache_budget(budget: int, weight_bytes: int, *, cache_share: float, cache_tokens: int | None,
                 token_bytes: int) -> int:
    """Bytes of KV cache a node with ``weight_bytes`` of weights may use: the given tokens, else its share of
    the budget, or less where the weights leave less (the caller decides whether that is an error)."""
    if cache_tokens is not None:
        return cache_tokens * token_bytes
    return max(0, min(int(budget * cache_share), budget - weight_bytes))
