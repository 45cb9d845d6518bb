"""One prompt-tuning step through two nodes against the same step in one process, paired round by round.

    python bench/bench_training.py [--shape small-8x256] [--batch 4] [--length 128] [--rounds 7]

A step is forward, loss, backward and an Adam step on the prompts (``ptune``, 16 positions): through the
swarm, two nodes on loopback each serving half the blocks (Forward RPCs hop by hop, then Backward RPCs in
reverse, the nodes recomputing their forward passes); locally, transformers with the same frozen weights
and prompts, on one torch thread (each node computes on one thread too). Each round times one step of
each, their order alternating; the table gives the median of each and of the per-round ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import checkpoint, table  # noqa: E402
from homeswarm.client.local_swarm import LocalSwarm, split_blocks  # noqa: E402
from homeswarm.client.model import AutoDistributedModelForCausalLM  # noqa: E402

PREFIX = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="small-8x256")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import transformers

    path = checkpoint(args.shape)
    local = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    local.requires_grad_(False)
    num_layers = local.config.num_hidden_layers
    ids = torch.randint(0, local.config.vocab_size, (args.batch, args.length),
                        generator=torch.Generator().manual_seed(0))
    local_prompts = torch.nn.Parameter(torch.randn(PREFIX, local.config.hidden_size) * 0.02)
    local_optimizer = torch.optim.Adam([local_prompts], lr=1e-3)

    def local_step() -> float:
        local_optimizer.zero_grad()
        embeds = local.get_input_embeddings()(ids)
        hidden = torch.cat([local_prompts[None].expand(args.batch, -1, -1), embeds], dim=1)
        logits = local(inputs_embeds=hidden).logits[:, PREFIX:]
        labels = F.pad(ids, (0, 1), value=-100)[:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        loss.backward()
        local_optimizer.step()
        return loss.item()

    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        nodes = [swarm.start_node(path, "--blocks", f"{a}:{b}", "--compute-threads", "1", wait=False)
                 for a, b in split_blocks(num_layers, 2)]
        for node in nodes:
            swarm.wait_ready(node)
        with AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers,
                                                             tuning_mode="ptune", pre_seq_len=PREFIX) as model:
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

            def swarm_step() -> float:
                optimizer.zero_grad()
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                optimizer.step()
                return loss.item()

            steps = {"swarm": swarm_step, "local": local_step}
            for fn in steps.values():  # warm-up: connections, allocator
                fn()
            times: dict[str, list[float]] = {name: [] for name in steps}
            for round_ in range(args.rounds):
                for name in (["swarm", "local"] if round_ % 2 == 0 else ["local", "swarm"]):
                    t0 = time.perf_counter()
                    steps[name]()
                    times[name].append(time.perf_counter() - t0)
    ratios = [s / max(lo, 1e-9) for s, lo in zip(times["swarm"], times["local"], strict=True)]
    print(f"{args.shape}, batch {args.batch} x {args.length} tokens + {PREFIX} prompt positions, "
          f"{args.rounds} rounds (medians)")
    print(table(["step", "seconds", "swarm / local"],
                [["local (transformers, 1 thread)", statistics.median(times["local"]), 1.0],
                 ["swarm (2 nodes, loopback)", statistics.median(times["swarm"]), statistics.median(ratios)]]))


if __name__ == "__main__":
    main()
