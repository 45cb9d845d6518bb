"""How close a node's decoding step comes to the memory-bandwidth limit, and where the small model's
step goes instead.

    python bench/bench_bandwidth.py [--part limit|overhead|threads|compile|all] [--rounds 7] [--steps 30]
                                    [--threads 0] [--cases large-16x1024:0:8:float32:none ...] [--profile]

A decoding step at batch 1 reads every weight of the span once (of a MoE block's routed experts, only
the ``top_k`` a token picks), so its floor is (bytes read per step) / (read bandwidth).

Read bandwidth: the best of three sums over a 1 GiB float32 buffer (far past the 260 MiB L3), taken
again in every round, so that each step time is held against the bandwidth of the same moment; a
1 GiB float32 GEMV is shown beside it, once.

Limit table, per case (checkpoint shape, blocks, activation dtype, weight format): the median time of
a decoding step (one cached token after a 16-token prefill, through ``BlockSpan.forward_batch`` as the
node calls it), with the projections fused (what the loader builds) and separate (``fuse=False``),
each round timing both, in alternating order; the bytes one step reads (``span_active_bytes``); the
bandwidth that implies; and the efficiency: the median over rounds of (implied / measured read
bandwidth).

Overhead table (``--part overhead``): the 8-layer, hidden-256 model's span of 4 blocks, whose weights
(19 MiB) sit in the CPU cache, so reading them is not the bound: the step against the same blocks'
matrix products alone (``F.linear`` on the same weights, nothing else) and against the floor from
bandwidth, with the number of torch operations a step dispatches. ``--profile`` prints torch's
profiler table of that step.

Threads table (``--part threads``): the same decoding steps with 1 thread and with torch's default,
paired round by round (what the node's executor chooses between, see ``node/executor.py``).

Compile table (``--part compile``, not in ``all``: inductor compiles for a minute or more here): the
small span's step with each block's pure-tensor parts (norm, q/k/v product and rotation before the
cache; output projection, residuals, norm and MLP after attention) compiled by ``torch.compile``
against the eager step, paired; the cache append and attention stay eager.

Every table header says the load average when it was taken: this machine is shared.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import checkpoint, table  # noqa: E402
from homeswarm.model import BlockSpan, ModelConfig, load_span  # noqa: E402
from homeswarm.model.sizes import span_active_bytes  # noqa: E402

GIB = 1 << 30
PREFILL = 16
DEFAULT_CASES = [
    "large-16x1024:0:8:float32:none",
    "large-16x1024:0:8:bfloat16:none",
    "large-16x1024:0:8:float32:int8",
    "large-16x1024:0:8:float32:int4",
    "moe-8x512:0:8:float32:none",
    "moe-8x512:0:8:float32:int8",
]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def read_bandwidth(buffer: torch.Tensor, repeats: int = 3) -> float:
    """Bytes per second of the best of ``repeats`` sums over ``buffer``."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - t0)
    return buffer.nbytes / best


def gemv_bandwidth(repeats: int = 3) -> float:
    """Bytes per second of the best of ``repeats`` float32 GEMVs over a 1 GiB weight."""
    weight = torch.full((GIB // 4 // 8192, 8192), 0.5)
    x = torch.randn(1, 8192)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        F.linear(x, weight)
        best = min(best, time.perf_counter() - t0)
    return weight.nbytes / best


def decode_steps(span: BlockSpan, steps: int) -> Callable[[], float]:
    """A callable that runs ``steps`` decoding steps after a prefill and returns the median step time."""
    hidden = span.config.hidden_size
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randn(1, PREFILL, hidden, generator=gen).to(span.dtype)
    token = torch.randn(1, 1, hidden, generator=gen).to(span.dtype)
    cache = span.new_cache(1, PREFILL + steps)
    span.forward_batch([(prompt, cache)])

    def run() -> float:
        cache.truncate(PREFILL)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            span.check(token, cache)  # as the node's executor does
            span.forward_batch([(token, cache)])
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    run()  # warm-up
    return run


def limit_part(args: argparse.Namespace, buffer: torch.Tensor) -> None:
    rows = []
    for case in args.cases:
        shape, start, end, dtype_name, quant = case.split(":")
        start, end, dtype = int(start), int(end), DTYPES[dtype_name]
        path = checkpoint(shape)
        config = ModelConfig.from_dir(path)
        active = span_active_bytes(config, start, end, dtype, quant)
        runs = {fuse: decode_steps(load_span(path, start, end, dtype=dtype, quant=quant, fuse=fuse), args.steps)
                for fuse in (True, False)}
        times: dict[bool, list[float]] = {True: [], False: []}
        effs: dict[bool, list[float]] = {True: [], False: []}
        bws, ratios = [], []
        for r in range(args.rounds):
            bw = read_bandwidth(buffer)
            bws.append(bw)
            for fuse in ((True, False) if r % 2 == 0 else (False, True)):
                t = runs[fuse]()
                times[fuse].append(t)
                effs[fuse].append(active / t / bw)
            ratios.append(times[False][-1] / times[True][-1])
        del runs
        fused_t, sep_t = statistics.median(times[True]), statistics.median(times[False])
        rows.append([shape, f"{start}:{end}", dtype_name, quant, f"{active / 2**20:.0f}",
                     f"{statistics.median(bws) / 1e9:.1f}", fused_t * 1000, sep_t * 1000,
                     statistics.median(ratios), f"{active / fused_t / 1e9:.1f}",
                     f"{statistics.median(effs[True]):.0%}", f"{statistics.median(effs[False]):.0%}"])
        print(f"  done {case}", file=sys.stderr, flush=True)
    print(f"decoding step at batch 1 after a {PREFILL}-token prefill, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds of {args.steps} steps (medians; efficiency = bytes/step / step time / read "
          f"bandwidth of the same round; load average {_load()})")
    print(table(["shape", "blocks", "act. dtype", "weights", "MiB/step", "read GB/s", "fused ms", "separate ms",
                 "separate/fused", "fused GB/s", "fused eff.", "separate eff."], rows))


def matmuls_only(span: BlockSpan) -> Callable[[], None]:
    """The span's matrix products alone, in order, on one row: what reading its weights costs here."""
    weights = [m.weight for m in span.modules() if isinstance(m, torch.nn.Linear)]
    x = {w.shape[1]: torch.randn(1, w.shape[1], dtype=w.dtype) for w in weights}

    def run() -> None:
        for w in weights:
            F.linear(x[w.shape[1]], w)

    return run


def count_ops(fn: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::")
               and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


def overhead_part(args: argparse.Namespace, buffer: torch.Tensor) -> None:
    path = checkpoint("small-8x256")
    config = ModelConfig.from_dir(path)
    start, end = 0, 4
    active = span_active_bytes(config, start, end, torch.float32)
    spans = {fuse: load_span(path, start, end, fuse=fuse) for fuse in (True, False)}
    runs = {fuse: decode_steps(span, args.steps) for fuse, span in spans.items()}
    mm = {fuse: matmuls_only(span) for fuse, span in spans.items()}
    results: dict[str, list[float]] = {k: [] for k in ("fused", "separate", "mm fused", "mm separate", "floor")}
    for r in range(args.rounds):
        results["floor"].append(active / read_bandwidth(buffer))
        for fuse in ((True, False) if r % 2 == 0 else (False, True)):
            name = "fused" if fuse else "separate"
            results[name].append(runs[fuse]())
            times = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                mm[fuse]()
                times.append(time.perf_counter() - t0)
            results["mm " + name].append(statistics.median(times))
    rows = []
    for fuse in (True, False):
        name = "fused" if fuse else "separate"
        span = spans[fuse]
        token = torch.randn(1, 1, config.hidden_size)
        cache = span.new_cache(1, 4)
        ops = count_ops(lambda span=span, token=token, cache=cache: span.forward_batch([(token, cache)]))
        step, mms = statistics.median(results[name]), statistics.median(results["mm " + name])
        rows.append(["small-8x256", f"{start}:{end}", name, f"{active / 2**20:.1f}", step * 1000, mms * 1000,
                     statistics.median(results["floor"]) * 1000, ops, (step - mms) / ops * 1e6])
    print(f"the overhead-bound case: float32, {torch.get_num_threads()} threads, {args.rounds} rounds of "
          f"{args.steps} steps (medians; load average {_load()})")
    print(table(["shape", "blocks", "projections", "MiB/step", "step ms", "matmuls alone ms",
                 "bytes/read bw ms", "aten ops/step", "us/op beyond matmuls"], rows))
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        span = spans[True]
        token = torch.randn(1, 1, config.hidden_size)
        cache = span.new_cache(1, 300)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(200):
                span.check(token, cache)
                span.forward_batch([(token, cache)])
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def threads_part(args: argparse.Namespace) -> None:
    most = torch.get_num_threads()
    rows = []
    for shape, start, end in (("small-8x256", 0, 4), ("large-16x1024", 0, 8)):
        path = checkpoint(shape)
        span = load_span(path, start, end)
        run = decode_steps(span, args.steps)
        times: dict[int, list[float]] = {1: [], most: []}
        for r in range(args.rounds):
            for threads in ((1, most) if r % 2 == 0 else (most, 1)):
                torch.set_num_threads(threads)
                times[threads].append(run())
        torch.set_num_threads(most)
        ratios = [a / b for a, b in zip(times[most], times[1], strict=True)]
        rows.append([shape, f"{start}:{end}", statistics.median(times[1]) * 1000,
                     statistics.median(times[most]) * 1000, statistics.median(ratios)])
    print(f"decoding step, 1 thread against {most}, float32, {args.rounds} rounds of {args.steps} steps "
          f"(load average {_load()})")
    print(table(["shape", "blocks", "1 thread ms", f"{most} threads ms", f"{most}/1 (median of rounds)"], rows))


def _pre(norm_w: torch.Tensor, qkv_w: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         eps: float, q_size: int, kv_size: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    h = F.rms_norm(x, norm_w.shape, norm_w, eps)
    qk, v = F.linear(h, qkv_w).split((q_size + kv_size, kv_size), dim=-1)
    qk = qk.view(x.shape[0], -1, head_dim)
    half = head_dim // 2
    return qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), dim=-1) * sin, v


def _post(x: torch.Tensor, attn: torch.Tensor, o_w: torch.Tensor, norm_w: torch.Tensor, gate_up_w: torch.Tensor,
          down_w: torch.Tensor, eps: float, inter: int) -> torch.Tensor:
    x = x + F.linear(attn, o_w)
    gate, up = F.linear(F.rms_norm(x, norm_w.shape, norm_w, eps), gate_up_w).split(inter, dim=-1)
    return x + F.linear(F.silu(gate) * up, down_w)


def compile_part(args: argparse.Namespace) -> None:
    from homeswarm.model.attention import append_to_cache
    from homeswarm.model.blocks import DecoderBlock

    pre, post = torch.compile(_pre, dynamic=False), torch.compile(_post, dynamic=False)
    eager_forward = DecoderBlock.forward

    def compiled_forward(self, x, cos, sin, segments, index):  # a fused, dense Llama block, one row
        if x.shape[0] != 1 or len(segments) != 1:
            return eager_forward(self, x, cos, sin, segments, index)
        a, m, seg = self.self_attn, self.mlp, segments[0]
        qk, v = pre(self.input_layernorm.weight, a.qkv_proj.weight, x, cos, sin, self.input_layernorm.eps,
                    a._qkv_sizes[0], a._qkv_sizes[1], a.head_dim)
        q, k = qk.split((a.num_heads, a.num_kv_heads), dim=1)
        keys, values = append_to_cache(seg, index, seg.heads(k), seg.heads(v.view(1, a.num_kv_heads, a.head_dim)))
        mask, is_causal = seg.mask(a.window, x.device)
        out = a.attend(seg.heads(q), keys, values, mask, is_causal).transpose(1, 2).reshape(1, -1)
        return post(x, out, a.o_proj.weight, self.post_attention_layernorm.weight, m.gate_up_proj.weight,
                    m.down_proj.weight, self.post_attention_layernorm.eps, m.intermediate_size)

    span = load_span(checkpoint("small-8x256"), 0, 4)
    run = decode_steps(span, args.steps)  # the eager warm-up
    t0 = time.perf_counter()
    DecoderBlock.forward = compiled_forward
    try:
        run()  # compiles
        compile_seconds = time.perf_counter() - t0
        times: dict[str, list[float]] = {"eager": [], "compiled": []}
        for r in range(args.rounds):
            for name in (("compiled", "eager") if r % 2 == 0 else ("eager", "compiled")):
                DecoderBlock.forward = compiled_forward if name == "compiled" else eager_forward
                times[name].append(run())
    finally:
        DecoderBlock.forward = eager_forward
    ratios = [a / b for a, b in zip(times["eager"], times["compiled"], strict=True)]
    print(f"torch.compile (inductor) of each block's pure-tensor parts, small-8x256 0:4, float32, "
          f"{torch.get_num_threads()} threads (load average {_load()})")
    print(table(["compile s", "eager ms", "compiled ms", "eager/compiled"],
                [[compile_seconds, statistics.median(times["eager"]) * 1000,
                  statistics.median(times["compiled"]) * 1000, statistics.median(ratios)]]))


def _load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["limit", "overhead", "threads", "compile", "all"], default="all")
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES,
                        help="shape:start:end:dtype:weights (weights: none, int8, int4)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--profile", action="store_true", help="print the profiler table of the small step")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    buffer = torch.ones(GIB // 4)
    print(f"read bandwidth: sum over 1 GiB {read_bandwidth(buffer) / 1e9:.1f} GB/s, float32 GEMV over 1 GiB "
          f"{gemv_bandwidth() / 1e9:.1f} GB/s ({torch.get_num_threads()} threads, load average {_load()})")
    if args.part in ("limit", "all"):
        limit_part(args, buffer)
    if args.part in ("overhead", "all"):
        overhead_part(args, buffer)
    if args.part in ("threads", "all"):
        threads_part(args)
    if args.part == "compile":
        compile_part(args)


if __name__ == "__main__":
    main()
