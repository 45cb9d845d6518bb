"""What a served LoRA adapter costs a node's step, against the same block without it.

    python bench/bench_lora.py [--rounds 9] [--steps 20] [--rank 16] [--threads 1]

One Llama block of TinyLlama's shape (hidden 2048, MLP 5632, 32 heads, 4 key/value heads; 176 MB in
float32, projections fused as the loader fuses them), random weights, run as a node runs a session's
steps: a decoding step at batch 1 after a 128-token prefill, and a 512-token prefill. Three forms: the base
span (what a request without an adapter runs: the same object, untouched by the adapters beside it), an
adapted view with rank-``--rank`` LoRA on q_proj and v_proj (PEFT's most common targets), and one on all
seven projections. Every round times each form once, the order rotating from round to round; the table
gives the median time and the median of the per-round ratios to the base (this machine's speed drifts,
other work shares its cores).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_quant import block_config, random_span  # noqa: E402
from bench.common import paired_rounds, table  # noqa: E402
from homeswarm.model import BlockSpan  # noqa: E402
from homeswarm.model.blocks import fuse_projections  # noqa: E402
from homeswarm.model.lora import LoraPart, adapted_span, place  # noqa: E402

ATTENTION = ("self_attn.q_proj", "self_attn.v_proj")
ALL = (*ATTENTION, "self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def lora_view(span: BlockSpan, paths: tuple[str, ...], rank: int) -> BlockSpan:
    """``span`` with random rank-``rank`` LoRA matrices (scale 2) on ``paths`` of its one block."""
    c = span.config
    kv = c.num_key_value_heads * c.hidden_size // c.num_attention_heads
    shapes = {"self_attn.q_proj": (c.hidden_size, c.hidden_size), "self_attn.k_proj": (c.hidden_size, kv),
              "self_attn.v_proj": (c.hidden_size, kv), "self_attn.o_proj": (c.hidden_size, c.hidden_size),
              "mlp.gate_proj": (c.hidden_size, c.intermediate_size), "mlp.up_proj": (c.hidden_size, c.intermediate_size),
              "mlp.down_proj": (c.intermediate_size, c.hidden_size)}
    gen = torch.Generator().manual_seed(1)
    parts: dict[str, list[LoraPart]] = {}
    for path in paths:
        fan_in, fan_out = shapes[path]
        a = torch.randn(rank, fan_in, generator=gen) / fan_in**0.5
        b = torch.randn(fan_out, rank, generator=gen) / rank**0.5
        where, part = place(span.layers[0], path, a.to(span.dtype), b.to(span.dtype), 2.0)
        parts.setdefault(where, []).append(part)
    return adapted_span(span, {0: parts})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base = random_span(block_config(2048, 5632, 32, 4), torch.float32)
    fuse_projections(base.layers[0])
    spans = {"base": base, f"LoRA r{args.rank} q,v": lora_view(base, ATTENTION, args.rank),
             f"LoRA r{args.rank} all 7": lora_view(base, ALL, args.rank)}
    hidden = base.config.hidden_size

    def decode(span: BlockSpan) -> Callable[[], float]:
        cache = span.new_cache(1, 128 + args.steps * (args.rounds + 2))
        span(torch.randn(1, 128, hidden), cache)
        x = torch.randn(1, 1, hidden)

        def run() -> float:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                span(x, cache)
            return (time.perf_counter() - t0) / args.steps

        return run

    def prefill(span: BlockSpan) -> Callable[[], float]:
        x = torch.randn(1, 512, hidden)

        def run() -> float:
            t0 = time.perf_counter()
            span(x)
            return time.perf_counter() - t0

        return run

    names = list(spans)
    for title, make in (("decoding step, batch 1", decode), ("prefill, 512 tokens", prefill)):
        times = paired_rounds({name: make(spans[name]) for name in names}, args.rounds)
        rows = []
        for name in names:
            ratios = [t / b for t, b in zip(times[name], times["base"], strict=True)]
            rows.append([name, f"{statistics.median(times[name]) * 1e3:.2f}", f"{statistics.median(ratios):.3f}x"])
        print(f"\n{title}: one Llama block, hidden 2048, MLP 5632, float32 ({args.rounds} rounds, torch threads "
              f"{torch.get_num_threads()})")
        print(table(["form", "median ms", "time vs base (median of ratios)"], rows))


if __name__ == "__main__":
    main()
