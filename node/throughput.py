"""Throughput self-test: how many decoding steps per second one block of this span sustains.

Measured at start-up on the real span with a short cache, batch 1: the median of a few steps,
after a warm-up step. The result is announced so that clients can plan routes.
"""

from __future__ import annotations

import statistics
import time

import torch

from homeswarm.model import BlockSpan


@torch.no_grad()
def measure_block_throughput(span: BlockSpan, *, steps: int = 5, prefix: int = 16) -> float:
    cache = span.new_cache(1, prefix + steps + 1)
    hidden = torch.randn(1, prefix, span.config.hidden_size, dtype=span.dtype, device=span.device)
    span.forward(hidden, cache)
    times = []
    step = torch.randn(1, 1, span.config.hidden_size, dtype=span.dtype, device=span.device)
    for _ in range(steps):
        t0 = time.perf_counter()
        span.forward(step, cache)
        if span.device.type == "cuda":
            torch.cuda.synchronize(span.device)
        times.append(time.perf_counter() - t0)
    per_block = statistics.median(times) / span.num_blocks
    return 1.0 / max(per_block, 1e-6)
