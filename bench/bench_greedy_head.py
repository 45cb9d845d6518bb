"""The client's greedy LM head: the full float32 product against the bounded argmax over an int8 or a
bfloat16 copy (``homeswarm.model.bounded_argmax``), paired round by round.

    python bench/bench_greedy_head.py [--heads 32000x1024 128256x4096] [--rounds 7] [--calls 20]
                                      [--demo]

Each round times ``--calls`` greedy choices of each method on the same random hidden states, one
method after another; the table gives the median per-call time over the rounds and the median of the
per-round ratios against float32. Random heads (Gaussian rows) are the hard case: their logits are
flat, so more rows lie within the bound of the best. ``--demo`` adds the bundled demo model's
trained (tied) head on the hidden states along its own greedy text.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import table  # noqa: E402
from homeswarm.model import DEMO_MODEL_DIR, LocalModel  # noqa: E402
from homeswarm.model.bounded_argmax import BoundedArgmax  # noqa: E402


def _demo_inputs(steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the demo model's head weight, its normed hidden states along its greedy text [steps, H])."""
    model = LocalModel(DEMO_MODEL_DIR)
    caches = [span.new_cache(1, steps + 8) for span in model.spans]
    hidden = model.forward(model.head.embed(torch.tensor([[1, 50, 60, 70]])), caches)
    rows = []
    with torch.no_grad():
        for _ in range(steps):
            rows.append(model.head.norm(hidden[0, -1]))
            token = model.head.logits(hidden[:, -1:])[:, -1].argmax(dim=-1)
            hidden = model.forward(model.head.embed(token[:, None]), caches)
    return model.head.embed_tokens.weight.detach(), torch.stack(rows)


def measure(name: str, weight: torch.Tensor, inputs: torch.Tensor, rounds: int) -> list[list[object]]:
    methods = {
        "float32": None,
        "int8": BoundedArgmax(weight, precision="int8"),
        "bfloat16": BoundedArgmax(weight, precision="bfloat16"),
    }
    expected = F.linear(inputs, weight).argmax(dim=-1)
    times: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(rounds + 1):  # the first round warms up and is dropped
        for method, argmax in methods.items():
            t0 = time.perf_counter()
            for x in inputs:
                token = F.linear(x[None], weight).argmax(dim=-1) if argmax is None else argmax(x[None])
                assert int(token) >= 0
            times[method].append((time.perf_counter() - t0) / len(inputs))
    rows: list[list[object]] = []
    for method, argmax in methods.items():
        ratios = [f / t for f, t in zip(times["float32"][1:], times[method][1:], strict=True)]
        same = "-" if argmax is None else str(bool((argmax(inputs) == expected).all()))
        calls = (rounds + 1) * len(inputs) + (0 if argmax is None else len(inputs))
        cands = "-" if argmax is None else f"{argmax.candidates / calls:.1f}"
        falls = "-" if argmax is None else str(argmax.fallbacks)
        rows.append([name, method, statistics.median(times[method][1:]) * 1000, statistics.median(ratios), cands,
                     falls, same])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--heads", nargs="*", default=["32000x1024", "128256x4096"], metavar="VxH")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--demo", action="store_true")
    args = parser.parse_args()
    rows: list[list[object]] = []
    gen = torch.Generator().manual_seed(0)
    for head in args.heads:
        vocab, hidden = (int(v) for v in head.split("x"))
        weight = torch.randn(vocab, hidden, generator=gen) * 0.02
        rows += measure(f"random {head}", weight, torch.randn(args.calls, hidden, generator=gen), args.rounds)
        del weight
    if args.demo:
        weight, inputs = _demo_inputs(args.calls)
        rows += measure(f"demo {weight.shape[0]}x{weight.shape[1]}", weight, inputs, args.rounds)
    print(f"greedy LM head, batch 1, {torch.get_num_threads()} threads; median of {args.rounds} paired rounds "
          f"of {args.calls} calls")
    print(table(["head", "method", "ms/token", "speed-up vs float32", "rows recomputed/token", "fallbacks",
                 "same tokens"], rows))


if __name__ == "__main__":
    main()
