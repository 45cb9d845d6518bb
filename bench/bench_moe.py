"""A decoding step through one Mixture-of-Experts block against a dense block with the same active
parameters, at batch 1 on the CPU.

    python bench/bench_moe.py [--hidden 1024] [--experts 64] [--top-k 4] [--moe-intermediate 256] [--rounds 15]

The MoE block (Qwen3-MoE layout: 64 experts, top-4) and a dense Qwen3 block whose MLP has
``top_k x moe_intermediate`` units read the same number of weights per token; the MoE block adds the
router and the per-expert dispatch. Each round times a batch of decoding steps of both (alternating
which goes first), after a 128-token prefill; the table reports the median of the per-round ratios,
since this machine's speed drifts within minutes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import table  # noqa: E402
from homeswarm.model import BlockSpan, ModelConfig  # noqa: E402
from homeswarm.model.sizes import block_parameters  # noqa: E402


def make_span(config: dict, seed: int) -> BlockSpan:
    span = BlockSpan(ModelConfig.from_dict(config), 0, 1)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in span.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * (1.0 / param.shape[-1] ** 0.5))
    return span.eval().requires_grad_(False)


def step_seconds(span: BlockSpan, steps: int, prefix: int = 128) -> float:
    hidden = span.config.hidden_size
    cache = span.new_cache(1, prefix + steps)
    span(torch.randn(1, prefix, hidden), cache)
    x = torch.randn(1, 1, hidden)
    t0 = time.perf_counter()
    for _ in range(steps):
        span(x, cache)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--moe-intermediate", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base = dict(vocab_size=1000, hidden_size=args.hidden, num_hidden_layers=1, num_attention_heads=args.heads,
                num_key_value_heads=args.heads // 4, head_dim=args.hidden // args.heads, rms_norm_eps=1e-6,
                max_position_embeddings=4096)
    dense_cfg = dict(base, model_type="qwen3", intermediate_size=args.top_k * args.moe_intermediate)
    moe_cfg = dict(base, model_type="qwen3_moe", intermediate_size=args.top_k * args.moe_intermediate,
                   moe_intermediate_size=args.moe_intermediate, num_experts=args.experts,
                   num_experts_per_tok=args.top_k, norm_topk_prob=True)
    dense, moe = make_span(dense_cfg, 0), make_span(moe_cfg, 1)
    dense_total, dense_active = block_parameters(dense.config, 0)
    moe_total, moe_active = block_parameters(moe.config, 0)
    step_seconds(dense, 3)
    step_seconds(moe, 3)
    ratios, dense_times, moe_times = [], [], []
    for r in range(args.rounds):
        order = [("dense", dense), ("moe", moe)] if r % 2 == 0 else [("moe", moe), ("dense", dense)]
        got = {name: step_seconds(span, args.steps) for name, span in order}
        dense_times.append(got["dense"])
        moe_times.append(got["moe"])
        ratios.append(got["moe"] / got["dense"])
    print(f"threads: {torch.get_num_threads()}, rounds: {args.rounds} x {args.steps} steps, 128-token cache")
    print(table(
        ["block", "params", "active params/token", "step ms (median)"],
        [[f"dense (MLP {args.top_k * args.moe_intermediate})", dense_total, dense_active,
          statistics.median(dense_times) * 1e3],
         [f"MoE ({args.experts} experts, top-{args.top_k}, {args.moe_intermediate} each)", moe_total, moe_active,
          statistics.median(moe_times) * 1e3]],
    ))
    print(f"MoE / dense step time, median of per-round ratios: {statistics.median(ratios):.3f} "
          f"(range {min(ratios):.3f}-{max(ratios):.3f})")


if __name__ == "__main__":
    main()
