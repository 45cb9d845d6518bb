"""What mirror sessions cost: greedy decoding speed with ``ClientConfig.mirrors`` on against off.

    python bench/bench_mirrors.py [--rounds 5] [--tokens 48] [--prompt 64] [--shape small-8x256]
                                  [--compute-threads 1]

Four nodes on loopback: each half of the model's blocks on two nodes, so with mirrors every hop has one (the
client sends each step's input to both, goes on with the hop's answer and compares the mirror's once the step
has been through every hop; steps are relayed). One swarm serves both modes; each round generates with mirrors
off and on, in alternating order, and the table gives the median of the per-round ratio of tokens per second
(on / off). On one machine the mirrors' compute competes with the hops' for the same cores: replicas on their
own (idle) machines cost less.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import checkpoint, table  # noqa: E402
from homeswarm.client.config import ClientConfig  # noqa: E402
from homeswarm.client.local_swarm import LocalSwarm  # noqa: E402
from homeswarm.client.model import AutoDistributedModelForCausalLM  # noqa: E402


def tokens_per_s(model, prompt: torch.Tensor, tokens: int) -> tuple[float, int, float]:  # noqa: ANN001
    """(decoding tokens per second after the first token, hops mirrored, share of that time spent checking
    mirrors' answers after the last hop had answered)."""
    with model.inference_session(max_length=prompt.shape[1] + tokens) as session:
        stream = model.generate_stream(prompt, max_new_tokens=tokens, session=session)
        next(stream)
        waited = session.mirror_wait
        t0 = time.perf_counter()
        n = sum(1 for _ in stream)
        seconds = time.perf_counter() - t0
        return n / seconds, len(session.mirrors), (session.mirror_wait - waited) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--shape", default="small-8x256")
    parser.add_argument("--compute-threads", type=int, default=1,
                        help="each node's torch threads (1: a hop and its mirror compute side by side, each on a core "
                        "of its own, as replicas on idle machines would; 0: torch's default, every core each)")
    args = parser.parse_args()
    path = checkpoint(args.shape)
    layers = json.loads((path / "config.json").read_text())["num_hidden_layers"]
    half = layers // 2
    prompt = torch.randint(0, 256, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    speeds: dict[bool, list[float]] = {False: [], True: []}
    ratios, waits = [], []
    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        threads = ("--compute-threads", str(args.compute_threads)) if args.compute_threads else ()
        nodes = [swarm.start_node(path, "--blocks", f"{a}:{b}", *threads, wait=False)
                 for a, b in [(0, half), (0, half), (half, layers), (half, layers)]]
        for node in nodes:
            swarm.wait_ready(node)
        models = {on: AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers,
                                                                     config=ClientConfig(mirrors=on))
                  for on in (False, True)}
        try:
            for on in (False, True):  # warm-up (connections, the nodes' thread choice)
                tokens_per_s(models[on], prompt, 8)
            for r in range(args.rounds):
                got = {}
                for on in ((False, True) if r % 2 == 0 else (True, False)):
                    got[on], mirrored, wait = tokens_per_s(models[on], prompt, args.tokens)
                    assert mirrored == (2 if on else 0), mirrored
                    speeds[on].append(got[on])
                    if on:
                        waits.append(wait)
                ratios.append(got[True] / got[False])
                print(f"round {r}: off {got[False]:.1f}, on {got[True]:.1f} tokens/s, on/off {ratios[-1]:.2f}, "
                      f"mirror check {waits[-1]:.0%} of the time", file=sys.stderr)
        finally:
            for model in models.values():
                model.close()
    print(table(["mirrors off tok/s", "mirrors on tok/s", "on/off (median of rounds)",
                 "checking mirrors after the last hop (share of time, median)"],
                [[statistics.median(speeds[False]), statistics.median(speeds[True]), statistics.median(ratios),
                  f"{statistics.median(waits):.1%}"]]))


if __name__ == "__main__":
    main()
