"""Checking steps on a second server: what it costs, and how often a corrupt node is caught.

    python bench/bench_verify.py [--shape small-8x256] [--fractions 0.1 0.25 0.5 1] [--rounds 5]
                                 [--trials 10] [--new-tokens 16]

A swarm on 127.0.0.1: blocks [0, L/2) on one node, [L/2, L) on two honest nodes and on one started with
HOMESWARM_FAULT=corrupt that announces a far higher throughput (so routes go through it).

Overhead: the corrupt node banned, greedy generations with each checked fraction against fraction 0,
alternated round by round; the median of the per-round time ratios. Detection: fresh bans each trial, a
greedy generation through the corrupt node with each fraction; the share of trials in which it was caught,
and the share whose tokens were all exact (what the honest route generates).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import SHAPES, checkpoint, table  # noqa: E402
from homeswarm.client.config import ClientConfig  # noqa: E402
from homeswarm.client.local_swarm import LocalSwarm  # noqa: E402
from homeswarm.client.model import AutoDistributedModelForCausalLM  # noqa: E402


def generate(model: AutoDistributedModelForCausalLM, fraction: float, prompt: torch.Tensor,
             new_tokens: int) -> tuple[float, list[int], list[str], int]:
    """(seconds, new tokens, peers caught, hop answers compared) of one greedy generation."""
    model.config = dataclasses.replace(model.config, verify_fraction=fraction)
    session = model.inference_session(max_length=prompt.shape[1] + new_tokens)
    with session:
        t0 = time.perf_counter()
        ids = model.generate(prompt, max_new_tokens=new_tokens, session=session)
        seconds = time.perf_counter() - t0
    return seconds, ids[0, prompt.shape[1]:].tolist(), list(session.caught), session.verifier.checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="small-8x256", choices=list(SHAPES))
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 0.5, 1.0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args()
    path = checkpoint(args.shape)
    layers = SHAPES[args.shape][0]
    half = f"{layers // 2}:{layers}"
    prompt = torch.randint(0, SHAPES[args.shape][5], (1, 16), generator=torch.Generator().manual_seed(0))
    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        nodes = [swarm.start_node(path, "--blocks", f"0:{layers // 2}", wait=False),
                 swarm.start_node(path, "--blocks", half, "--throughput", "1", wait=False),
                 swarm.start_node(path, "--blocks", half, "--throughput", "1", wait=False)]
        env = swarm.env
        swarm.env = {**env, "HOMESWARM_FAULT": "corrupt"}
        nodes.append(swarm.start_node(path, "--blocks", half, "--throughput", "1000", wait=False))
        swarm.env = env
        for node in nodes:
            swarm.wait_ready(node, timeout=300)
        corrupt = nodes[-1].info["peer_id"]
        with AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers,
                                                             config=ClientConfig()) as model:
            model.routes.ban(corrupt, seconds=1e9)
            _, exact, _, _ = generate(model, 0.0, prompt, args.new_tokens)  # also warms up
            rows = []
            for fraction in args.fractions:
                ratios, base_times, checked_times, checks = [], [], [], []
                for r in range(args.rounds):
                    order = [0.0, fraction] if r % 2 == 0 else [fraction, 0.0]
                    times = {}
                    for f in order:
                        seconds, tokens, _, count = generate(model, f, prompt, args.new_tokens)
                        assert tokens == exact
                        times[f] = seconds
                        if f == fraction:
                            checks.append(count)
                    ratios.append(times[fraction] / times[0.0])
                    base_times.append(times[0.0])
                    checked_times.append(times[fraction])
                rows.append([fraction, 1000 * statistics.median(base_times) / args.new_tokens,
                             1000 * statistics.median(checked_times) / args.new_tokens, statistics.median(ratios),
                             statistics.mean(checks)])
            print(f"overhead: {args.shape}, {args.new_tokens} new tokens after a 16-token prompt, "
                  f"{args.rounds} paired rounds, honest nodes only")
            print(table(["fraction", "ms/token unchecked", "ms/token checked", "median ratio",
                         "hop answers checked"], rows))

            rows = []
            for fraction in args.fractions:
                caught = exact_runs = 0
                for _ in range(args.trials):
                    model.routes.bans.clear()
                    model.routes.failures.clear()
                    _, tokens, peers, _ = generate(model, fraction, prompt, args.new_tokens)
                    caught += corrupt in peers
                    exact_runs += tokens == exact
                expected = 1 - (1 - fraction) ** args.new_tokens
                rows.append([fraction, f"{caught}/{args.trials}", f"{expected:.3f}", f"{exact_runs}/{args.trials}"])
            print(f"\ndetection: the corrupt node on the route, {args.trials} generations per fraction, "
                  f"{args.new_tokens} steps each")
            print(table(["fraction", "caught", "expected 1-(1-f)^steps", "all tokens exact"], rows))


if __name__ == "__main__":
    main()
