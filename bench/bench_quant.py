"""Quantized weights: speed of a Llama block too big for the CPU cache, and accuracy on the demo model.

    python bench/bench_quant.py [--part speed|accuracy|ternary|all] [--rounds 9] [--steps 20] [--threads 0]

Speed: one Llama block of hidden 2048, MLP 5632, 32 heads, 4 key/value heads (a TinyLlama block,
176 MB in float32), in float32, bfloat16, int8 and int4 (each group size): a decoding step at batch 1
after a 128-token prefill, and a 512-token prefill. Every round times each format once, in an order
that rotates from round to round; the table gives the median time and the median of the per-round
ratios to float32, since this machine's speed drifts within minutes (other work shares its cores).

Ternary: BitNet b1.58 2B4T's block shape (hidden 2560, MLP 6912, 20 heads, 5 key/value heads) with random
ternary weights loaded from the hub's packed form, in bfloat16 (torch's int4 kernel) and float32 (exact
dense products), against a float Llama block of the same shape; and the bytes a BitNet block holds.

Accuracy, on the bundled demo model against float32, the way llama.cpp's ``perplexity
--kl-divergence`` reports it: perplexity of a held-out paragraph (written for this benchmark, so the
model never saw it), the mean KL divergence of the next-token distributions over that paragraph, how
often the top token agrees, and greedy agreement over 64 new tokens from four prompts (tokens equal
at the same position, and the length of the identical prefix). Tokens are fed one at a time through
the cache, as decoding steps run on a node (torch's kernels, bfloat16 activations); the rows marked
"float32 act." run every product densely in float32 instead (the kernels' alternative for float32
activations: dequantize, then multiply).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import paired_rounds, table  # noqa: E402
from homeswarm.model import DEMO_MODEL_DIR, BlockSpan, ModelConfig, load_head, load_span  # noqa: E402
from homeswarm.model.quant import (  # noqa: E402
    INT4_GROUP_SIZES,
    QuantizedLinearInt4,
    QuantizedLinearInt8,
    quantize_block,
)

# Held out: written for this benchmark in the manner of the plays the demo model learned from.
HELD_OUT = """\
DUKE.
Come hither, cousin, and attend my words.
The night is old, the watch hath twice been changed,
And yet no messenger from Mantua.
What think you of this silence in the north?

LUCETTA.
My lord, I think the roads are foul with rain,
And men that ride in haste ride slow in mud.
Your brother's letters will arrive by noon,
Or I am much deceived in honest men.

DUKE.
Honest! There is a word that costs me sleep.
I have been served by honest men and false,
And found the false more constant in their falsehood
Than honest men in keeping of their faith.
Go, bid the captain of my guard come up,
And let the gates be shut till I have read.

LUCETTA.
I will, my lord. But pray you, rest a little;
You have not slept these three nights, and your eyes
Are heavy as the clouds above the town.

DUKE.
When Mantua is quiet, I will sleep.
Till then, let every candle in the house
Burn on, and every door be kept by two.
Away, and bring me word of what you hear.
"""

PROMPTS = ["DUKE.\nCome hither, cousin,", "LUCETTA.\nMy lord, I think", "ROMEO.\n", "KING HENRY.\nNow, lords,"]


def block_config(hidden: int, intermediate: int, heads: int, kv_heads: int) -> ModelConfig:
    return ModelConfig.from_dict({
        "model_type": "llama", "hidden_size": hidden, "intermediate_size": intermediate,
        "num_hidden_layers": 1, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    })


def random_span(config: ModelConfig, dtype: torch.dtype) -> BlockSpan:
    span = BlockSpan(config, 0, 1)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in span.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) / param.shape[-1] ** 0.5)
    return span.to(dtype).eval().requires_grad_(False)


def nbytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def speed(args: argparse.Namespace) -> None:
    config = block_config(2048, 5632, 32, 4)
    base = random_span(config, torch.float32)
    spans: dict[str, BlockSpan] = {"float32": base, "bfloat16": random_span(config, torch.bfloat16)}
    spans["int8"] = quantize_block(random_span(config, torch.float32), "int8")
    for group in INT4_GROUP_SIZES:
        spans[f"int4 g{group}"] = quantize_block(random_span(config, torch.float32), "int4", group)
    compare(spans, args, "one Llama block, hidden 2048, MLP 5632")


def ternary_span(config: ModelConfig, dtype: torch.dtype) -> BlockSpan:
    """A BitNet block with random ternary weights, loaded from the hub's packed form."""
    span = BlockSpan(config, 0, 1)
    gen = torch.Generator().manual_seed(0)
    state = {}
    for name, tensor in span.state_dict().items():
        if name.endswith("weight_scale"):
            state[name] = torch.ones(1, dtype=dtype)
        elif tensor.dtype == torch.uint8:  # four ternary codes (0, 1, 2) a byte
            codes = torch.randint(0, 3, (4, *tensor.shape), generator=gen, dtype=torch.uint8)
            state[name] = codes[0] | codes[1] << 2 | codes[2] << 4 | codes[3] << 6
        else:
            state[name] = torch.ones(tensor.shape, dtype=dtype)
    span.load_state_dict(state, assign=True)
    return span.eval().requires_grad_(False)


def ternary(args: argparse.Namespace) -> None:
    """BitNet b1.58 2B4T's block shape: ternary weights against a float Llama block of the same shape."""
    shape = {"hidden_size": 2560, "intermediate_size": 6912, "num_attention_heads": 20, "num_key_value_heads": 5,
             "num_hidden_layers": 1, "vocab_size": 128256, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
             "rope_theta": 500000.0}
    llama = ModelConfig.from_dict({"model_type": "llama", **shape})
    bitnet = ModelConfig.from_dict({"model_type": "bitnet", "hidden_act": "relu2", **shape,
                                    "quantization_config": {"quant_method": "bitnet", "linear_class": "bitlinear",
                                                            "quantization_mode": "offline"}})
    base = random_span(llama, torch.float32)
    spans = {"float32": base, "bfloat16": random_span(llama, torch.bfloat16),
             "ternary, bfloat16 (kernel)": ternary_span(bitnet, torch.bfloat16),
             "ternary, float32 (exact)": ternary_span(bitnet, torch.float32)}
    # what a node holds (the unit scales are shared by every layer of a shape, so not per block)
    held = {name: sum(t.numel() * t.element_size() for t in span.state_dict().values()) for name, span in spans.items()}
    float_bytes = held["float32"]
    ternary_float = 4 * sum(m.in_features * m.out_features for m in spans["ternary, float32 (exact)"].modules()
                            if hasattr(m, "stored_bytes"))
    ternary_float += 4 * sum(t.numel() for n, t in spans["ternary, float32 (exact)"].state_dict().items()
                             if n.endswith("norm.weight"))
    print(f"\nbytes held per block: BitNet {held['ternary, float32 (exact)'] / 2**20:.1f} MiB, "
          f"{held['ternary, float32 (exact)'] / ternary_float:.3f}x of the same block in float32 "
          f"({ternary_float / 2**20:.1f} MiB; the Llama block, without sub-norms: {float_bytes / 2**20:.1f} MiB)")
    compare(spans, args, "BitNet b1.58 2B4T's block, hidden 2560, MLP 6912, against a float Llama block")


def compare(spans: dict[str, BlockSpan], args: argparse.Namespace, what: str) -> None:
    """Paired rounds of a decoding step and a 512-token prefill through each span; "float32" is the base."""
    base = spans["float32"]
    hidden = base.config.hidden_size

    def decode(span: BlockSpan) -> Callable[[], float]:
        cache = span.new_cache(1, 128 + args.steps * (args.rounds + 2))
        span(torch.randn(1, 128, hidden, dtype=span.dtype), cache)
        x = torch.randn(1, 1, hidden, dtype=span.dtype)

        def run() -> float:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                span(x, cache)
            return (time.perf_counter() - t0) / args.steps

        return run

    def prefill(span: BlockSpan) -> Callable[[], float]:
        x = torch.randn(1, 512, hidden, dtype=span.dtype)

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
            ratios = [f / t for f, t in zip(times["float32"], times[name], strict=True)]
            rows.append([name, f"{nbytes(spans[name]) / 2**20:.1f}", f"{nbytes(spans[name]) / nbytes(base):.3f}",
                         f"{statistics.median(times[name]) * 1e3:.2f}", f"{statistics.median(ratios):.2f}x"])
        print(f"\n{title}: {what} ({args.rounds} rounds, torch threads "
              f"{torch.get_num_threads()}, CPU capability {torch.backends.cpu.get_cpu_capability()})")
        print(table(["format", "MiB", "of float32", "median ms", "speed vs float32 (median of ratios)"], rows))


class DemoModel:
    """The demo model's head and its blocks in one weight format, run one token at a time."""

    def __init__(self, dtype: torch.dtype, quant: str, group_size: int) -> None:
        self.head = load_head(DEMO_MODEL_DIR, dtype=dtype)
        config = ModelConfig.from_dir(DEMO_MODEL_DIR)
        self.span = load_span(DEMO_MODEL_DIR, 0, config.num_hidden_layers, dtype=dtype, quant=quant,
                              group_size=group_size)

    @torch.no_grad()
    def stepwise_logits(self, ids: list[int]) -> torch.Tensor:
        """float32 logits [len(ids), V], each position computed as a decoding step with the cache."""
        cache = self.span.new_cache(1, len(ids))
        out = []
        for token in ids:
            hidden = self.span(self.head.embed(torch.tensor([[token]])), cache)
            out.append(self.head.logits(hidden)[0, -1].float())
        return torch.stack(out)

    @torch.no_grad()
    def greedy(self, ids: list[int], new_tokens: int) -> list[int]:
        cache = self.span.new_cache(1, len(ids) + new_tokens)
        hidden = self.span(self.head.embed(torch.tensor([ids])), cache)  # the prompt as one prefill
        tokens: list[int] = []
        for _ in range(new_tokens):
            tokens.append(int(self.head.logits(hidden[:, -1:])[0, -1].float().argmax()))
            hidden = self.span(self.head.embed(torch.tensor([[tokens[-1]]])), cache)
        return tokens


def accuracy(args: argparse.Namespace) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(DEMO_MODEL_DIR / "tokenizer.json"))
    text = tokenizer.encode(HELD_OUT).ids
    prompts = [tokenizer.encode(p).ids for p in PROMPTS]
    formats: list[tuple[str, torch.dtype, str, int, bool]] = [  # name, dtype, quant, group size, kernels
        ("float32", torch.float32, "none", 64, True),
        ("bfloat16", torch.bfloat16, "none", 64, True),
        ("int8", torch.float32, "int8", 64, True),
        ("int8, float32 act.", torch.float32, "int8", 64, False),
    ]
    for group in INT4_GROUP_SIZES:
        formats.append((f"int4 g{group}", torch.float32, "int4", group, True))
        formats.append((f"int4 g{group}, float32 act.", torch.float32, "int4", group, False))
    reference_logits = reference_greedy = None
    rows = []
    classes = (QuantizedLinearInt8, QuantizedLinearInt4)
    for name, dtype, fmt, group, kernels in formats:
        saved = [cls.kernel_max_rows for cls in classes]
        try:
            if not kernels:
                for cls in classes:
                    cls.kernel_max_rows = 0
            model = DemoModel(dtype, fmt, group)
            logits = model.stepwise_logits(text)
            greedy = [model.greedy(p, 64) for p in prompts]
        finally:
            for cls, rows_ in zip(classes, saved, strict=True):
                cls.kernel_max_rows = rows_
        if reference_logits is None:
            reference_logits, reference_greedy = logits, greedy
        assert reference_greedy is not None
        logp = F.log_softmax(logits[:-1], dim=-1)
        ref_logp = F.log_softmax(reference_logits[:-1], dim=-1)
        targets = torch.tensor(text[1:])
        ppl = math.exp(-logp.gather(1, targets[:, None]).mean().item())
        kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
        top1 = (logits[:-1].argmax(-1) == reference_logits[:-1].argmax(-1)).float().mean().item()
        same = [sum(a == b for a, b in zip(g, r, strict=True)) for g, r in zip(greedy, reference_greedy, strict=True)]
        prefix = [next((i for i, (a, b) in enumerate(zip(g, r, strict=True)) if a != b), 64)
                  for g, r in zip(greedy, reference_greedy, strict=True)]
        rows.append([name, f"{ppl:.3f}", f"{kl.mean().item():.1e}", f"{kl.max().item():.1e}", f"{top1 * 100:.1f}%",
                     f"{statistics.mean(same):.1f}", f"{statistics.mean(prefix):.1f}"])
    print(f"\naccuracy on the demo model against float32 ({len(text)} held-out tokens, greedy: 64 tokens from "
          f"{len(prompts)} prompts)")
    print(table(["format", "perplexity", "mean KL", "max KL", "top-1 agrees", "greedy: equal of 64",
                 "greedy: same prefix"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["speed", "accuracy", "ternary", "all"], default="all")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=20, help="decoding steps timed per round and format")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.part in ("accuracy", "all"):
        threads = torch.get_num_threads()
        if not args.threads:  # the demo model's products are tiny: a second thread adds only waiting
            torch.set_num_threads(1)
        accuracy(args)
        torch.set_num_threads(threads)
    if args.part in ("speed", "all"):
        speed(args)
    if args.part in ("ternary", "all"):
        ternary(args)


if __name__ == "__main__":
    main()
