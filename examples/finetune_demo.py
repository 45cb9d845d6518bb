"""Prompt tuning through a local swarm: the bundled demo model learns a lighthouse keeper's log.

Starts a bootstrap peer and two nodes on 127.0.0.1 serving the demo model's blocks (frozen), then
trains only a few prompt embeddings on this computer: each step runs forward and backward through the
nodes (Forward and Backward RPCs) and an Adam step on the prompts. It prints the loss on the training
batch every step and, before and after, on a fixed evaluation batch; the loss falls. Everything started
is stopped on exit.

    .venv/bin/python examples/finetune_demo.py [--steps 40] [--tuning-mode ptune|deep_ptune]

About a minute on a 2-core machine. The text is examples/data/lighthouse_log.txt (written for this
example); the demo model was trained on Shakespeare, so the log's style is new to it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from homeswarm.client.local_swarm import LocalSwarm, split_blocks
from homeswarm.client.model import AutoDistributedModelForCausalLM
from homeswarm.client.tokenizer import TextCodec
from homeswarm.model import DEMO_MODEL_DIR, ModelConfig

DATA = Path(__file__).parent / "data" / "lighthouse_log.txt"


def windows(ids: list[int], length: int) -> torch.Tensor:
    """Every window of ``length`` tokens, starting each ``length // 2`` tokens: [n, length]."""
    starts = range(0, len(ids) - length + 1, length // 2)
    return torch.tensor([ids[s : s + length] for s in starts])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--tuning-mode", choices=("ptune", "deep_ptune"), default="deep_ptune")
    parser.add_argument("--pre-seq-len", type=int, default=8, help="trainable prompt positions")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=64, help="tokens per training sequence")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # the nodes need the other cores

    codec = TextCodec.for_model(DEMO_MODEL_DIR)
    assert codec is not None, "the demo model ships its tokenizer.json"
    data = windows(codec.encode(DATA.read_text(), add_special_tokens=False), args.length)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))
    evaluation, training = data[order[: args.batch]], data[order[args.batch :]]
    print(f"{DATA.name}: {len(data)} windows of {args.length} tokens ({len(training)} to train on, "
          f"{len(evaluation)} held out)", file=sys.stderr)

    blocks = ModelConfig.from_dir(DEMO_MODEL_DIR).num_hidden_layers
    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        daemons = [swarm.start_node(DEMO_MODEL_DIR, "--blocks", f"{a}:{b}", "--compute-threads", "1", wait=False)
                   for a, b in split_blocks(blocks, args.nodes)]
        for daemon in daemons:
            swarm.wait_ready(daemon)
        print(f"{len(daemons)} nodes serve the demo model's {blocks} blocks", file=sys.stderr)
        with AutoDistributedModelForCausalLM.from_pretrained(
            DEMO_MODEL_DIR, initial_peers=swarm.initial_peers, tuning_mode=args.tuning_mode,
            pre_seq_len=args.pre_seq_len,
        ) as model:
            optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)

            def held_out() -> float:
                with torch.no_grad():
                    return model(input_ids=evaluation, labels=evaluation).loss.item()

            before = held_out()
            print(f"held-out loss before: {before:.3f}")
            batches = torch.Generator().manual_seed(args.seed + 1)
            losses: list[float] = []
            t0 = time.perf_counter()
            for step in range(args.steps):
                batch = training[torch.randint(len(training), (args.batch,), generator=batches)]
                optimizer.zero_grad()
                loss = model(input_ids=batch, labels=batch).loss
                loss.backward()  # through the nodes' Backward RPCs, into the prompts
                optimizer.step()
                losses.append(loss.item())
                recent = losses[-10:]  # batches differ: the mean of the last ten shows the trend
                print(f"step {step + 1:3d}  loss {losses[-1]:.3f}  (mean of the last {len(recent)}: "
                      f"{sum(recent) / len(recent):.3f})")
            seconds = time.perf_counter() - t0
            after = held_out()
            print(f"held-out loss after {args.steps} steps: {after:.3f} (before: {before:.3f}); "
                  f"{seconds / args.steps:.2f} s a step")
    return 0 if after < before else 1


if __name__ == "__main__":
    sys.exit(main())
