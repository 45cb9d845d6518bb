"""Compressed activations: codec cost and size, and their effect on a swarm's speed and output.

    python bench/bench_compression.py [--shape small-8x256] [--new-tokens 32]

Part 1, in process: serialize + deserialize time and payload bytes of a decoding step's hidden
state [1, 1, H] and a 1,000-token prefill [1, 1000, H], per compression.
Part 2, through 2 nodes on loopback: decode tokens/s and how many of the greedy tokens agree with
the uncompressed run, per compression (the client compresses what it sends; nodes answer alike).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import SHAPES, checkpoint, table  # noqa: E402
from homeswarm.client.config import ClientConfig  # noqa: E402
from homeswarm.client.local_swarm import LocalSwarm, split_blocks  # noqa: E402
from homeswarm.client.model import AutoDistributedModelForCausalLM  # noqa: E402
from homeswarm.model import ModelConfig  # noqa: E402
from homeswarm.protocol import deserialize_tensor, parse_compression, serialize_tensor  # noqa: E402

COMPRESSIONS = ["none", "float16", "bfloat16", "int8"]


def codec_rows(hidden: int) -> list[list[object]]:
    rows: list[list[object]] = []
    for tokens in (1, 1000):
        x = torch.randn(1, tokens, hidden)
        for name in COMPRESSIONS:
            compression = parse_compression(name)
            repeats = 200 if tokens == 1 else 20
            t0 = time.perf_counter()
            for _ in range(repeats):
                message = serialize_tensor(x, compression)
                y = deserialize_tensor(message)
            seconds = (time.perf_counter() - t0) / repeats
            size = len(message.SerializeToString())
            error = ((y - x).norm() / x.norm()).item()
            rows.append([f"[1, {tokens}, {hidden}]", name, size, seconds * 1e6, error])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", default="small-8x256", choices=list(SHAPES))
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=64)
    args = parser.parse_args()
    path = checkpoint(args.shape)
    config = ModelConfig.from_dir(path)
    print(table(["tensor", "compression", "bytes on the wire", "encode+decode us", "relative error"],
                codec_rows(config.hidden_size)))
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    rows = []
    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        nodes = [swarm.start_node(path, "--blocks", f"{a}:{b}", wait=False)
                 for a, b in split_blocks(config.num_hidden_layers, 2)]
        for node in nodes:
            swarm.wait_ready(node, timeout=300)
        baseline = None
        for name in COMPRESSIONS:
            with AutoDistributedModelForCausalLM.from_pretrained(
                path, initial_peers=swarm.initial_peers, config=ClientConfig(compression=name)
            ) as model:
                model.generate(prompt, max_new_tokens=2)
                t0 = time.perf_counter()
                out = model.generate(prompt, max_new_tokens=args.new_tokens)[0, args.prompt :]
                seconds = time.perf_counter() - t0
            if baseline is None:
                baseline = out
            agree = int((out == baseline).cumprod(0).sum())
            rows.append([name, args.new_tokens / seconds, f"{agree}/{args.new_tokens}"])
    print(f"\n{args.shape}, 2 nodes on 127.0.0.1, greedy, prompt {args.prompt}")
    print(table(["compression", "tokens/s (incl. prefill)", "tokens equal to uncompressed before the first difference"],
                rows))


if __name__ == "__main__":
    main()
