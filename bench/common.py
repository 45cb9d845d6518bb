"""Shared pieces of the benchmarks: random Llama-shaped checkpoints, timing, table printing.

Benchmarks print tables; they assert nothing. Checkpoints are written with transformers (a dev
dependency) into a cache folder, once per shape.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

SHAPES = {
    # name: (layers, hidden, intermediate, heads, kv_heads, vocab)
    "tiny": (2, 64, 128, 4, 2, 256),
    "small-8x256": (8, 256, 704, 8, 8, 8192),
    "large-16x1024": (16, 1024, 2816, 16, 16, 32000),
}
# Mixture-of-Experts shapes (Qwen3-MoE layout): name -> (layers, hidden, experts, top_k, moe intermediate, vocab)
MOE_SHAPES = {
    "moe-8x512": (8, 512, 32, 4, 256, 8192),
}
CACHE = Path(os.environ.get("HOMESWARM_BENCH_CACHE", Path(tempfile.gettempdir()) / "homeswarm-bench"))


def checkpoint(shape: str) -> Path:
    """A random float32 checkpoint of the given shape (written once, then reused): Llama for SHAPES,
    Qwen3-MoE for MOE_SHAPES."""
    import transformers

    path = CACHE / shape
    if (path / "config.json").exists():
        return path
    if shape in MOE_SHAPES:
        layers, hidden, experts, top_k, moe_inter, vocab = MOE_SHAPES[shape]
        moe = transformers.Qwen3MoeConfig(
            num_hidden_layers=layers, hidden_size=hidden, intermediate_size=top_k * moe_inter,
            moe_intermediate_size=moe_inter, num_experts=experts, num_experts_per_tok=top_k, norm_topk_prob=True,
            num_attention_heads=8, num_key_value_heads=2, head_dim=hidden // 8, vocab_size=vocab,
            max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
            pad_token_id=None,
        )
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(moe).eval().save_pretrained(path)
        return path
    layers, hidden, inter, heads, kv, vocab = SHAPES[shape]
    config = transformers.LlamaConfig(
        num_hidden_layers=layers, hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
        num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=4096, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    return path


def params(shape: str) -> int:
    layers, hidden, inter, heads, kv, vocab = SHAPES[shape]
    head_dim = hidden // heads
    per_layer = hidden * head_dim * (2 * heads + 2 * kv) + 3 * hidden * inter + 2 * hidden
    return layers * per_layer + 2 * vocab * hidden + hidden


def timed(fn: Callable[[], object], repeats: int = 3) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def paired_rounds(runs: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Each run's seconds per round, after one warm-up each: every round runs them all, its order rotated by one
    from the last round's, so drift falls on every run alike (compare them by the median of per-round ratios)."""
    names = list(runs)
    for run in runs.values():
        run()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name].append(runs[name]())
    return times


def table(headers: list[str], rows: list[list[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def swarm_step_ms(model, steps: int, tokens: int = 1) -> tuple[float, bool]:  # noqa: ANN001
    """(median ms of a session's steps of ``tokens`` tokens through the swarm, whether the session used
    hand-off), after warm-up steps (connections, thread pools)."""
    with model.inference_session(max_length=(steps + 3) * tokens) as session:
        hidden = model.head.embed(torch.ones(1, tokens, dtype=torch.long))
        for _ in range(3 if tokens == 1 else 1):
            session.step(hidden)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            session.step(hidden)
            times.append(time.perf_counter() - t0)
        used_handoff = session.uses_handoff
    return statistics.median(times) * 1000, used_handoff


def info_ms(model, node: dict, count: int) -> float:  # noqa: ANN001
    """Median ms of ``count`` Info round trips from the client's channel pool to a node (its ready-file info)."""
    from homeswarm.client.transport import ping

    return statistics.median(ping(model.pool, node["peer_id"], node["address"], 10)[0] for _ in range(count)) * 1000
