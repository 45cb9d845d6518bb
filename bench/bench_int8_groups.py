"""How faithful each weight format is, alone: int8 per output channel, int8 in groups, int4 in groups.

    python bench/bench_int8_groups.py [--model demo|demo_draft|PATH] [--from-q4_0]

Every linear weight that ``--quant`` quantizes is replaced by what a format stores, dequantized
(quantize, then dequantize, in float32), and the model runs in float32 with dense products: no kernel's
activation rounding, only the weights' own. Formats: int8 symmetric per output channel with a bfloat16
scale (``--quant int8`` today); int8 symmetric in groups of 32 with a float16 scale (GGUF's Q8_0) and in
groups of 128 with a bfloat16 scale; int4 in groups of 32 and 128 (``--quant int4``, asymmetric,
bfloat16 scale and zero point). Against the float32 model, the way bench/bench_quant.py measures
accuracy (llama.cpp's ``perplexity --kl-divergence``): mean and largest KL divergence of the next-token
distributions over a held-out paragraph, top-1 agreement, and greedy agreement over 64 new tokens from
four prompts; bits a weight takes with its scales.

``--from-q4_0``: the model's weights are first rounded to GGUF's Q4_0 (groups of 32, ``w = d * (q - 8)``,
``d`` float16, llama.cpp's rounding), and that model is the reference: a checkpoint whose weights come
from a 4-bit file (as SmolLM2-135M-Instruct's did, where per-channel int8 agreed with float32 less than
int4 in groups of 32).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_quant import HELD_OUT, PROMPTS  # noqa: E402
from bench.common import table  # noqa: E402
from homeswarm.model import DEMO_MODEL_DIR, ModelConfig, load_head, load_span  # noqa: E402
from homeswarm.model.quant import is_quantizable  # noqa: E402
from homeswarm.model.quant_values import dequantize_int4, dequantize_int8, quantize_int4, quantize_int8  # noqa: E402


def int8_groups(w: torch.Tensor, group: int, scale_dtype: torch.dtype) -> torch.Tensor:
    """``w`` stored as int8 in groups of ``group`` inputs, symmetric (q in -127..127), one scale a group."""
    rows, cols = w.shape
    padded = -(-cols // group) * group
    g = F.pad(w.float(), (0, padded - cols)).view(rows, -1, group)
    scales = (g.abs().amax(-1, keepdim=True) / 127).clamp(min=torch.finfo(torch.float32).tiny).to(scale_dtype).float()
    q = torch.round(g / scales).clamp(-127, 127)
    return (q * scales).view(rows, padded)[:, :cols]


def q4_0(w: torch.Tensor) -> torch.Tensor:
    """``w`` rounded as llama.cpp's quantize_row_q4_0 rounds it, dequantized (inputs a multiple of 32)."""
    rows, cols = w.shape
    g = w.float().view(rows, cols // 32, 32)
    signed_max = g.gather(-1, g.abs().argmax(-1, keepdim=True))  # the value of largest magnitude, with its sign
    d = (signed_max / -8).to(torch.float16).float()
    inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    q = torch.clamp(torch.floor(g * inv + 8.5), 0, 15)  # llama.cpp: (int8_t)(x * id + 8.5f), at most 15
    return ((q - 8) * d).view(rows, cols)


FORMATS = {  # name -> (bits a weight takes with its scales, the stored weight dequantized)
    "int8 per channel (--quant int8)": (8.0, lambda w: dequantize_int8(*quantize_int8(w))),
    "int8 g32, float16 scale (Q8_0)": (8.5, lambda w: int8_groups(w, 32, torch.float16)),
    "int8 g128, bfloat16 scale": (8.125, lambda w: int8_groups(w, 128, torch.bfloat16)),
    "int4 g32 (--quant int4)": (5.0, lambda w: dequantize_int4(*quantize_int4(w, 32), w.shape[1])),
    "int4 g128": (4.25, lambda w: dequantize_int4(*quantize_int4(w, 128), w.shape[1])),
}


@torch.no_grad()
def run(model_dir: Path, form: str | None, text: list[int], prompts: list[list[int]],
        from_q4_0: bool) -> tuple[torch.Tensor, list]:
    """(float32 logits over ``text``, one token at a time; greedy tokens from each prompt)."""
    head = load_head(model_dir)
    span = load_span(model_dir, 0, ModelConfig.from_dir(model_dir).num_hidden_layers)
    for name, module in span.named_modules():
        if name and is_quantizable(name, module) and isinstance(module, torch.nn.Linear):
            if from_q4_0:
                module.weight.copy_(q4_0(module.weight))
            if form is not None:
                module.weight.copy_(FORMATS[form][1](module.weight))
    cache = span.new_cache(1, len(text))
    logits = []
    for token in text:
        logits.append(head.logits(span(head.embed(torch.tensor([[token]])), cache))[0, -1].float())
    greedy = []
    for ids in prompts:
        cache = span.new_cache(1, len(ids) + 64)
        hidden = span(head.embed(torch.tensor([ids])), cache)
        tokens: list[int] = []
        for _ in range(64):
            tokens.append(int(head.logits(hidden[:, -1:])[0, -1].argmax()))
            hidden = span(head.embed(torch.tensor([[tokens[-1]]])), cache)
        greedy.append(tokens)
    return torch.stack(logits), greedy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="demo, demo_draft or a checkpoint folder")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--from-q4_0", action="store_true", help="the reference: the model rounded to Q4_0")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = {"demo": DEMO_MODEL_DIR, "demo_draft": DEMO_MODEL_DIR.parent / "demo_draft"}.get(args.model,
                                                                                                 Path(args.model))
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    text = tokenizer.encode(HELD_OUT).ids
    prompts = [tokenizer.encode(p).ids for p in PROMPTS]
    ref_logits, ref_greedy = run(model_dir, None, text, prompts, args.from_q4_0)
    ref_logp = F.log_softmax(ref_logits[:-1], dim=-1)
    targets = torch.tensor(text[1:])
    rows = [["float32" + (" (Q4_0's weights)" if args.from_q4_0 else ""), "32", f"{math.exp(-ref_logp.gather(1, targets[:, None]).mean().item()):.3f}", "0", "0",
             "100.0%", "64.0", "64.0"]]
    for form, (bits, _) in FORMATS.items():
        logits, greedy = run(model_dir, form, text, prompts, args.from_q4_0)
        logp = F.log_softmax(logits[:-1], dim=-1)
        kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
        top1 = (logits[:-1].argmax(-1) == ref_logits[:-1].argmax(-1)).float().mean().item()
        same = [sum(a == b for a, b in zip(g, r, strict=True)) for g, r in zip(greedy, ref_greedy, strict=True)]
        prefix = [next((i for i, (a, b) in enumerate(zip(g, r, strict=True)) if a != b), 64)
                  for g, r in zip(greedy, ref_greedy, strict=True)]
        rows.append([form, f"{bits:g}", f"{math.exp(-logp.gather(1, targets[:, None]).mean().item()):.3f}",
                     f"{kl.mean().item():.1e}", f"{kl.max().item():.1e}", f"{top1 * 100:.1f}%",
                     f"{statistics.mean(same):.1f}", f"{statistics.mean(prefix):.1f}"])
        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    print(f"weight formats alone on {model_dir.name}{' rounded to Q4_0' if args.from_q4_0 else ''} against float32 ({len(text)} held-out tokens; greedy: 64 "
          f"tokens from {len(prompts)} prompts; dense float32 products of the dequantized weights)")
    print(table(["format", "bits/weight", "perplexity", "mean KL", "max KL", "top-1 agrees", "greedy: equal of 64",
                 "greedy: same prefix"], rows))


if __name__ == "__main__":
    main()
