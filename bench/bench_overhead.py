"""Overhead of the swarm over one process: greedy decoding through 2 nodes on loopback against
transformers `generate` on the same checkpoint, in one run; plus time to first token.

    python bench/bench_overhead.py [--shapes small-8x256 large-16x1024] [--new-tokens 24] [--prompt 16]

Prints, per shape: decode tokens/s of transformers, of our engine in one process (LocalModel), and
through the swarm; the ratios; and the per-step overhead of each node (swarm step time minus the
local step time, divided by the number of nodes).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import SHAPES, checkpoint, params, table  # noqa: E402
from homeswarm.client.local_swarm import LocalSwarm, split_blocks  # noqa: E402
from homeswarm.client.model import AutoDistributedModelForCausalLM  # noqa: E402
from homeswarm.model import LocalModel, ModelConfig  # noqa: E402


def decode_rate(generate, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(seconds to first token, decode tokens/s after it) for a generate(prompt, n) callable."""
    t0 = time.perf_counter()
    generate(prompt, 1)
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    generate(prompt, new_tokens)
    total = time.perf_counter() - t0
    return ttft, (new_tokens - 1) / max(total - ttft, 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", nargs="+", default=["small-8x256", "large-16x1024"], choices=list(SHAPES))
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for shape in args.shapes:
        rows += measure(shape, args)
    print(f"greedy, float32, CPU ({torch.get_num_threads()} threads), prompt {args.prompt}, "
          f"{args.new_tokens} new tokens, {args.nodes} nodes on 127.0.0.1")
    print(table(["shape", "params", "run", "transformers tok/s", "ours local tok/s", "swarm tok/s",
                 "local/hf", "swarm/hf", "overhead ms/node/step", "hf TTFT ms", "swarm TTFT ms"], rows))


def measure(shape: str, args: argparse.Namespace) -> list[list[object]]:
    import transformers

    rows: list[list[object]] = []
    path = checkpoint(shape)
    config = ModelConfig.from_dir(path)
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))

    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def hf_generate(ids: torch.Tensor, n: int) -> torch.Tensor:
        with torch.no_grad():
            return ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                do_sample=False, pad_token_id=0)

    local = LocalModel(path)

    def local_generate(ids: torch.Tensor, n: int) -> torch.Tensor:
        return local.generate_greedy(ids, n)

    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        nodes = [swarm.start_node(path, "--blocks", f"{a}:{b}", wait=False)
                 for a, b in split_blocks(config.num_hidden_layers, args.nodes)]
        for node in nodes:
            swarm.wait_ready(node, timeout=300)
        with AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers) as model:

            def swarm_generate(ids: torch.Tensor, n: int) -> torch.Tensor:
                return model.generate(ids, max_new_tokens=n)

            swarm_generate(prompt, 4)  # warm-up: routes, pings, channels
            hf_generate(prompt, 4)
            local_generate(prompt, 4)
            assert swarm_generate(prompt, args.new_tokens).tolist() == hf_generate(prompt, args.new_tokens).tolist()
            for repeat in range(args.repeats):
                # interleaved, so that a slow moment of the machine hits all three alike
                hf_ttft, hf_rate = decode_rate(hf_generate, prompt, args.new_tokens)
                our_ttft, our_rate = decode_rate(local_generate, prompt, args.new_tokens)
                sw_ttft, sw_rate = decode_rate(swarm_generate, prompt, args.new_tokens)
                overhead_ms = (1 / sw_rate - 1 / our_rate) / args.nodes * 1000
                rows.append([shape, f"{params(shape) / 1e6:.1f}M", repeat, hf_rate, our_rate, sw_rate,
                             our_rate / hf_rate, sw_rate / hf_rate, overhead_ms,
                             hf_ttft * 1000, sw_ttft * 1000])
    return rows


if __name__ == "__main__":
    main()
