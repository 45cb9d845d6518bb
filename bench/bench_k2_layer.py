"""One Kimi K2 MoE layer at its real sizes, decoding on this machine, against its read bandwidth.

    python bench/bench_k2_layer.py [--experts 16] [--rounds 5] [--steps 5] [--threads 0] [--quant int8|int4]

The layer: hidden 7168; MLA with q_lora_rank 1536, kv_lora_rank 512, 64 heads, qk_nope 128, qk_rope 64,
v_head 128; ``--experts`` routed experts of moe_intermediate 2048 (K2 has 384; 16 fit a 24 GiB machine
and a step reads the same bytes: the top 8 of them and everything else), top-8, one shared expert; the
routed experts in the hub's compressed-tensors pack-quantized int4 form (symmetric groups of 32, as
Kimi K2 Thinking ships them), the rest bfloat16. It is written as a checkpoint into a temporary folder
(removed at the end) and loaded by ``load_span(..., dtype=torch.bfloat16)``, as ``join-swarm --dtype
bfloat16`` loads it.

Cases: decoding steps (one new token per sequence) at 128 and 4,096 tokens of context, batch 1 and 4,
and a 5-token verify step (batch 1); the cache is filled with random latents rather than by a prefill
(a 4,096-token prefill of this layer takes minutes on 2 cores; a step's cost does not depend on what the
cache holds). MLA's attention form is chosen as the node chooses it (absorbed for all these steps);
decoding at batch 1 is also timed in the expanded form (``MultiHeadLatentAttention.attention_form``),
paired with the absorbed step round by round, and so is the layer's attention alone (one row, batch 1),
where the experts' much larger and noisier time does not hide the difference.

Bytes read per step: the layer's dense weights, the experts the router picked in that step (distinct
over the batch's rows; sizes from ``model/sizes.py``), and the cache once (latents and rotated key
parts). Every round measures the read bandwidth (best of three sums over a 1 GiB float32 buffer) and
then every case, in an order reversed every other round; efficiency is the median over rounds of
(bytes read / step time / that round's bandwidth), and ratios are medians of per-round ratios (this
VM's speed drifts by up to 1.5x over minutes).

``--quant int8|int4`` loads the layer as ``join-swarm --quant`` would: what the checkpoint ships in
bfloat16 (attention, shared expert) quantized at load beside the 4-bit experts; every case runs so, and
the batch-1 decoding step at 128 tokens is also timed against the same layer loaded without ``--quant``,
alternating round by round (median of per-round ratios).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_bandwidth import GIB, read_bandwidth  # noqa: E402
from bench.common import table  # noqa: E402
from homeswarm.model import BlockSpan, ModelConfig, load_span  # noqa: E402
from homeswarm.model.attention import Segment  # noqa: E402
from homeswarm.model.sizes import block_bytes, span_active_bytes, span_weight_bytes  # noqa: E402

# Kimi K2's config.json (moonshotai/Kimi-K2-Instruct), with Kimi K2 Thinking's quantization_config:
# only the routed experts are 4-bit.
K2_CONFIG = {
    "model_type": "kimi_k2", "architectures": ["DeepseekV3ForCausalLM"], "hidden_size": 7168,
    "num_hidden_layers": 61, "num_attention_heads": 64, "num_key_value_heads": 64, "vocab_size": 163840,
    "intermediate_size": 18432, "moe_intermediate_size": 2048, "n_routed_experts": 384, "num_experts_per_tok": 8,
    "n_shared_experts": 1, "first_k_dense_replace": 1, "moe_layer_freq": 1, "n_group": 1, "topk_group": 1,
    "norm_topk_prob": True, "routed_scaling_factor": 2.827, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
    "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "rms_norm_eps": 1e-6, "max_position_embeddings": 131072, "rope_theta": 50000.0,
    "rope_scaling": {"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096, "beta_fast": 1.0,
                     "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
    "attention_bias": False, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "quantization_config": {
        "quant_method": "compressed-tensors", "format": "pack-quantized",
        "ignore": ["lm_head", r"re:.*self_attn.*", r"re:.*shared_experts.*", r"re:.*mlp\.(gate|up|down)_proj.*"],
        "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None, "weights": {
            "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32,
            "dynamic": False, "actorder": None}}},
    },
}
LAYER = 1  # the first MoE layer (layer 0 is dense)
CONTEXTS = (128, 4096)
# Home PCs for the projection: (memory GB, read bandwidth GB/s). Dual-channel DDR4-3200 reads about
# 40 GB/s, dual-channel DDR5 about 60 GB/s.
PCS = ((32, 40.0), (64, 60.0))
RESERVED_GB = 4  # per PC: the OS, the node's fixed cost (about 0.7 GiB), its KV cache share
LINKS_MS = (1, 10, 25, 50)
TARGET_EFFICIENCY = 0.6


def write_layer(path: Path, experts: int) -> ModelConfig:
    """Write block ``LAYER`` of a K2 with ``experts`` routed experts (random weights) into ``path``."""
    data = dict(K2_CONFIG, n_routed_experts=experts, num_hidden_layers=LAYER + 1)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(data, indent=2))
    config = ModelConfig.from_dir(path)
    with torch.device("meta"):
        block = BlockSpan(config, LAYER, LAYER + 1).layers[0]
    gen = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}
    for key, meta in block.state_dict().items():
        name = f"model.layers.{LAYER}.{key.replace('mlp.shared_expert.', 'mlp.shared_experts.')}"
        shape = tuple(meta.shape)
        if key.endswith("weight_packed"):  # eight 4-bit values per int32, any bits
            tensors[name] = torch.randint(-2**31, 2**31 - 1, shape, dtype=torch.int32, generator=gen)
        elif key.endswith("weight_shape"):
            tensors[name] = torch.tensor([shape_of(block, key)[0], shape_of(block, key)[1]], dtype=torch.int64)
        elif key.endswith("weight_scale"):  # |q - 8| averages about 4: weights of about 1/sqrt(inputs)
            inputs = shape[1] * 32
            tensors[name] = torch.full(shape, 0.25 / inputs**0.5, dtype=torch.bfloat16)
        elif key.endswith("e_score_correction_bias"):
            tensors[name] = torch.zeros(shape, dtype=torch.float32)
        elif len(shape) == 1:  # norms
            tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensors[name] = (torch.randn(shape, generator=gen) / shape[1] ** 0.5).to(torch.bfloat16)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return config


def layer_bytes(experts: int, quant: str = "none") -> int:
    """Bytes of a K2 MoE layer's weights with ``experts`` routed experts, as the node holds them in bfloat16
    (``quant``: the rest quantized so)."""
    config = ModelConfig.from_dict(dict(K2_CONFIG, n_routed_experts=experts))
    return block_bytes(config, LAYER, torch.bfloat16, quant)[0]


def shape_of(block: torch.nn.Module, key: str) -> tuple[int, int]:
    """(outputs, inputs) of the 4-bit layer that holds ``key``."""
    layer = block.get_submodule(key.rsplit(".", 1)[0])
    return layer.out_features, layer.in_features


@dataclass
class Case:
    name: str
    context: int
    batch: int
    tokens: int
    form: str = "auto"


CASES = [Case("decode", c, b, 1) for c in CONTEXTS for b in (1, 4)]
CASES += [Case("verify", c, 1, 5) for c in CONTEXTS]
CASES += [Case("decode", c, 1, 1, "expanded") for c in CONTEXTS]


class Runner:
    """One case's cache, inputs and a timed call: the median of ``steps`` steps, and the bytes they read."""

    def __init__(self, span: BlockSpan, case: Case, steps: int, dense: int, per_expert: int,
                 picked: list[torch.Tensor]) -> None:
        self.span, self.case, self.steps = span, case, steps
        self.dense, self.per_expert, self.picked = dense, per_expert, picked
        config = span.config
        assert config.mla is not None
        gen = torch.Generator().manual_seed(case.context + case.batch)
        self.cache = span.new_cache(case.batch, case.context + case.tokens)
        latent, rot = self.cache.tensors[0]
        latent[:, : case.context].copy_(torch.randn(case.batch, case.context, latent.shape[-1], generator=gen))
        rot[:, : case.context].copy_(torch.randn(case.batch, case.context, rot.shape[-1], generator=gen))
        self.cache.length = case.context
        self.cache_bytes = case.batch * case.context * (latent.shape[-1] + rot.shape[-1]) * latent.element_size()
        self.inputs = [torch.randn(case.batch, case.tokens, config.hidden_size, generator=gen).to(span.dtype)
                       for _ in range(steps)]

    def run(self) -> tuple[float, float]:
        """(median step seconds, median bytes read per step)."""
        attention = self.span.layers[0].self_attn
        attention.attention_form = self.case.form
        times, reads = [], []
        for x in self.inputs:
            self.cache.truncate(self.case.context)
            self.picked.clear()
            t0 = time.perf_counter()
            self.span.forward_batch([(x, self.cache)])
            times.append(time.perf_counter() - t0)
            distinct = len(set(torch.cat(self.picked).flatten().tolist()))
            reads.append(self.dense + distinct * self.per_expert + self.cache_bytes)
        attention.attention_form = "auto"
        return statistics.median(times), statistics.median(reads)


class AttentionRunner:
    """The layer's MLA alone, one decoding row at batch 1 over ``context`` cached positions, in ``form``:
    the part of a step that the attention form changes, without the experts' noise around it."""

    def __init__(self, span: BlockSpan, context: int, form: str, steps: int) -> None:
        self.attention = span.layers[0].self_attn
        self.context, self.form, self.steps = context, form, steps
        gen = torch.Generator().manual_seed(context)
        self.cache = span.new_cache(1, context + 1)
        latent, rot = self.cache.tensors[0]
        latent[:, :context].copy_(torch.randn(1, context, latent.shape[-1], generator=gen))
        rot[:, :context].copy_(torch.randn(1, context, rot.shape[-1], generator=gen))
        self.cache.length = context
        self.h = torch.randn(1, span.config.hidden_size, generator=gen).to(span.dtype)
        rope = self.cache.tensors[0][1].shape[-1]
        self.cos = torch.ones(1, 1, rope, dtype=span.dtype)
        self.sin = torch.zeros(1, 1, rope, dtype=span.dtype)

    def run(self) -> float:
        self.attention.attention_form = self.form
        times = []
        with torch.no_grad():
            for _ in range(self.steps):
                segment = Segment(0, 1, 1, self.cache, self.context)
                t0 = time.perf_counter()
                self.attention(self.h, self.cos, self.sin, [segment], 0)
                times.append(time.perf_counter() - t0)
        self.attention.attention_form = "auto"
        return statistics.median(times)


def projection(efficiency: float, long_extra: float, quant: str = "none") -> None:
    """Kimi K2 whole (61 layers, 384 experts, bytes from model/sizes.py on its config) on chains of home
    PCs: each decoding token reads every layer's active bytes at ``efficiency`` of the PC's bandwidth,
    one layer after another, and crosses P + 1 links (client, P nodes in a chain with hand-off, client).
    ``long_extra``: seconds a layer's attention adds per step at 4,096 tokens of context over 128, as
    measured here (added as it is, whatever the PC's bandwidth)."""
    config = ModelConfig.from_dict(K2_CONFIG)
    layers = config.num_hidden_layers
    total = span_weight_bytes(config, 0, layers, torch.bfloat16, quant)
    active = span_active_bytes(config, 0, layers, torch.bfloat16, quant)
    rest = "bfloat16" if quant == "none" else f"{quant} (--quant)"
    print(f"Kimi K2 whole: {layers} layers, {total / 1e9:.0f} GB of block weights as a node holds them (int4 "
          f"experts, the rest {rest}; model/sizes.py), {active / 1e9:.1f} GB read per token; tokens/s for one "
          f"user at batch 1 (PCs = ceil(weights / (memory - {RESERVED_GB} GB)); context 4096: "
          f"{long_extra * 1000:.1f} ms more per layer, the attention's measured difference)")
    rows = []
    for memory, bandwidth in PCS:
        pcs = -(-total // int((memory - RESERVED_GB) * 1e9))
        for label, eff in ((f"measured {efficiency:.0%}", efficiency), ("target 60%", TARGET_EFFICIENCY)):
            compute = active / (eff * bandwidth * 1e9)
            cells = [f"{1 / (compute + (pcs + 1) * link / 1000):.2f}" for link in LINKS_MS]
            long = 1 / (compute + layers * long_extra + (pcs + 1) * LINKS_MS[1] / 1000)
            rows.append([f"{memory} GB, {bandwidth:.0f} GB/s", pcs, label, f"{compute:.2f}", *cells, f"{long:.2f}"])
    print(table(["PC", "PCs", "efficiency", "compute s/token", *[f"tok/s, {link} ms links" for link in LINKS_MS],
                 "tok/s, 10 ms, context 4096"], rows))


class Breakdown:
    """Seconds spent in the layer's parts during the steps run while it is attached (forward hooks)."""

    PARTS = ("self_attn", "mlp.gate", "mlp.experts", "mlp.shared_expert")

    def __init__(self, block: torch.nn.Module) -> None:
        self.seconds: dict[str, list[float]] = {part: [] for part in self.PARTS}
        self.started: dict[str, float] = {}
        self.handles = []
        for part in self.PARTS:
            module = block.get_submodule(part)
            self.handles.append(module.register_forward_pre_hook(
                lambda _m, _i, part=part: self.started.__setitem__(part, time.perf_counter())))
            self.handles.append(module.register_forward_hook(
                lambda _m, _i, _o, part=part: self.seconds[part].append(time.perf_counter() - self.started[part])))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=16, help="routed experts in the layer (K2: 384)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="steps per case and round (median)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--quant", choices=["none", "int8", "int4"], default="none",
                        help="quantize what the checkpoint ships in bfloat16 at load, as join-swarm --quant does")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = Path(tempfile.mkdtemp(prefix="k2-layer-"))
    try:
        t0 = time.perf_counter()
        write_layer(folder, args.experts)
        written = time.perf_counter() - t0
        t0 = time.perf_counter()
        span = load_span(folder, LAYER, LAYER + 1, dtype=torch.bfloat16, quant=args.quant)
        loaded = time.perf_counter() - t0
        # the same layer without --quant, for the paired comparison
        base_span = None if args.quant == "none" else load_span(folder, LAYER, LAYER + 1, dtype=torch.bfloat16)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    total = layer_bytes(args.experts, args.quant)
    per_expert = layer_bytes(args.experts + 1, args.quant) - total
    dense = total - args.experts * per_expert
    picked: list[torch.Tensor] = []
    span.layers[0].mlp.gate.register_forward_hook(lambda _m, _i, out: picked.append(out[1]))
    versus: dict[str, Runner] = {}
    if base_span is not None:
        base_picked: list[torch.Tensor] = []
        base_span.layers[0].mlp.gate.register_forward_hook(lambda _m, _i, out: base_picked.append(out[1]))
        base_total = layer_bytes(args.experts)
        decode = next(c for c in CASES if (c.name, c.context, c.batch, c.form) == ("decode", 128, 1, "auto"))
        versus = {"none": Runner(base_span, decode, args.steps, base_total - args.experts * per_expert, per_expert,
                                 base_picked),
                  args.quant: Runner(span, decode, args.steps, dense, per_expert, picked)}
    versus_times: dict[str, list[float]] = {key: [] for key in versus}
    versus_effs: dict[str, list[float]] = {key: [] for key in versus}
    versus_reads: dict[str, list[float]] = {key: [] for key in versus}
    print(f"K2 layer with {args.experts} routed experts: {total / 2**20:.0f} MiB ({dense / 2**20:.0f} MiB dense, "
          f"{per_expert / 2**20:.1f} MiB per expert); written in {written:.0f} s, loaded in {loaded:.0f} s",
          file=sys.stderr, flush=True)
    runners = [Runner(span, case, args.steps, dense, per_expert, picked) for case in CASES]
    attention = {(c, form): AttentionRunner(span, c, form, args.steps) for c in CONTEXTS
                 for form in ("absorbed", "expanded")}
    for runner in [*runners, *attention.values(), *versus.values()]:  # warm-up
        runner.run()
    attention_times: dict[tuple[int, str], list[float]] = {key: [] for key in attention}
    index = {(c.name, c.context, c.batch, c.form): i for i, c in enumerate(CASES)}
    parts: dict[str, list[float]] = {part: [] for part in Breakdown.PARTS}
    step_times: list[float] = []
    buffer = torch.ones(GIB // 4)
    bws: list[float] = []
    times: list[list[float]] = [[] for _ in CASES]
    effs: list[list[float]] = [[] for _ in CASES]
    reads: list[list[float]] = [[] for _ in CASES]
    loads = [_load()]
    for r in range(args.rounds):
        bw = read_bandwidth(buffer)
        bws.append(bw)
        order = list(range(len(CASES)))
        for i in order if r % 2 == 0 else order[::-1]:
            t, read = runners[i].run()
            times[i].append(t)
            reads[i].append(read)
            effs[i].append(read / t / bw)
        for key in list(attention) if r % 2 == 0 else list(attention)[::-1]:
            attention_times[key].append(attention[key].run())
        for key in list(versus) if r % 2 == 0 else list(versus)[::-1]:
            t, read = versus[key].run()
            versus_times[key].append(t)
            versus_reads[key].append(read)
            versus_effs[key].append(read / t / bw)
        breakdown = Breakdown(span.layers[0])
        step_times.append(runners[index[("decode", 128, 1, "auto")]].run()[0])
        breakdown.detach()
        for part, seconds in breakdown.seconds.items():
            parts[part].append(statistics.median(seconds))
        print(f"  round {r + 1}/{args.rounds}: read {bw / 1e9:.1f} GB/s", file=sys.stderr, flush=True)
    loads.append(_load())
    del buffer

    def ratio(a: int, b: int) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))

    rows = []
    for i, case in enumerate(CASES):
        step = statistics.median(times[i])
        read = statistics.median(reads[i])
        form = "absorbed" if case.form == "auto" else case.form
        rows.append([case.name, case.context, case.batch, case.batch * case.tokens, form, f"{step * 1000:.1f}",
                     f"{step * 1000 / (case.batch * case.tokens):.1f}", f"{read / 1e6:.0f}",
                     f"{read / (case.batch * case.tokens) / 1e6:.0f}", f"{read / step / 1e9:.1f}",
                     f"{statistics.median(effs[i]):.0%}"])
    rest = "bfloat16" if args.quant == "none" else f"{args.quant} (--quant)"
    print(f"Kimi K2 layer ({args.experts} routed experts of 2048, top-8, int4 experts, the rest {rest}), "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds of {args.steps} steps per case; read bandwidth "
          f"{statistics.median(bws) / 1e9:.1f} GB/s (median of rounds, {min(bws) / 1e9:.1f}-{max(bws) / 1e9:.1f}); "
          f"load average {loads[0]} before, {loads[1]} after")
    print(table(["step", "context", "batch", "tokens", "MLA form", "step ms", "ms/token", "MB read/step",
                 "MB/token", "GB/s", "efficiency"], rows))
    print()
    pairs = []
    for context in CONTEXTS:
        absorbed, expanded = index[("decode", context, 1, "auto")], index[("decode", context, 1, "expanded")]
        pairs.append([f"decode, batch 1, context {context}", f"{ratio(expanded, absorbed):.2f}x"])
    long, short = index[("decode", 4096, 1, "auto")], index[("decode", 128, 1, "auto")]
    pairs.append(["absorbed decode: context 4096 / 128", f"{ratio(long, short):.2f}x"])
    long, short = index[("decode", 4096, 1, "expanded")], index[("decode", 128, 1, "expanded")]
    pairs.append(["expanded decode: context 4096 / 128", f"{ratio(long, short):.2f}x"])
    for context in CONTEXTS:
        four, one = index[("decode", context, 4, "auto")], index[("decode", context, 1, "auto")]
        pairs.append([f"batch 4 / batch 1 step, context {context}", f"{ratio(four, one):.2f}x"])
        verify = index[("verify", context, 1, "auto")]
        pairs.append([f"5-token verify / 1-token step, context {context}", f"{ratio(verify, one):.2f}x"])
    print("paired (median of per-round ratios of step times)")
    print(table(["ratio", "value"], pairs))
    print()
    rows = []
    for context in CONTEXTS:
        absorbed, expanded = attention_times[(context, "absorbed")], attention_times[(context, "expanded")]
        rows.append([context, f"{statistics.median(absorbed) * 1000:.1f}", f"{statistics.median(expanded) * 1000:.1f}",
                     f"{statistics.median(e / a for a, e in zip(absorbed, expanded, strict=True)):.2f}x"])
    print("MLA attention alone, one decoding row (median ms; expanded / absorbed: median of per-round ratios)")
    print(table(["context", "absorbed ms", "expanded ms", "expanded / absorbed"], rows))
    print()
    rows = []
    for part, seconds in parts.items():
        share = statistics.median(x / t for x, t in zip(seconds, step_times, strict=True))
        rows.append([part, f"{statistics.median(seconds) * 1000:.1f}", f"{share:.0%}"])
    rows.append(["whole step", f"{statistics.median(step_times) * 1000:.1f}", "100%"])
    print("where a decoding step goes (batch 1, context 128; medians, share: median of per-round shares)")
    print(table(["part", "ms", "share of the step"], rows))
    print()
    if versus:
        rows = [[key, f"{statistics.median(versus_times[key]) * 1000:.1f}", f"{statistics.median(versus_reads[key]) / 1e6:.0f}",
                 f"{statistics.median(versus_effs[key]):.0%}"] for key in versus]
        speedup = statistics.median(a / b for a, b in zip(versus_times["none"], versus_times[args.quant], strict=True))
        print(f"decode, batch 1, context 128: --quant {args.quant} against the checkpoint's own weights "
              f"(alternating; {args.quant} {speedup:.2f}x faster, median of per-round ratios)")
        print(table(["--quant", "step ms", "MB read/step", "efficiency"], rows))
        print()
    short, long = attention_times[(128, "absorbed")], attention_times[(4096, "absorbed")]
    projection(statistics.median(effs[index[("decode", 128, 1, "auto")]]),
               max(0.0, statistics.median(b - a for a, b in zip(short, long, strict=True))), args.quant)


if __name__ == "__main__":
    main()
