"""The stall at failover: a node killed at a long context, its blocks rebuilt on a spare by a prefill replay
(the stored history in few messages, computed in chunks), by the old replay (one step per recorded step), or
taken over by a mirror that already holds the cache (``ClientConfig.mirrors``: no replay at all).

    python bench/bench_failover.py [--contexts 1024 4000] [--rounds 2] [--shape small-8x256]

Three nodes on loopback: blocks 0..A-1 on one, A..N-1 on two (the spare takes over). The context is built
as a chat or a long generation builds it, one token per step (the old replay's worst case, and the
common one: a serve stream killed 3,100 generated tokens in stalled for minutes); then decoding steps run, and before
one of them the node serving the second span is killed (kill -9 of its process group). The stall is the
longest gap between two tokens minus the median gap. Every mode runs in every round, their order rotating;
the table gives the median over rounds of each stall, and of the per-round ratio of the new replay's to the
old one's.
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
from homeswarm.client import session as session_module  # noqa: E402
from homeswarm.client.config import ClientConfig  # noqa: E402
from homeswarm.client.local_swarm import LocalSwarm  # noqa: E402
from homeswarm.client.model import AutoDistributedModelForCausalLM  # noqa: E402
from homeswarm.client.replay import replay_steps  # noqa: E402

DECODE_STEPS = 12
KILL_AT = 6


def step_by_step(steps, max_bytes=0):  # noqa: ANN001, ANN201 - the old replay: every recorded step again
    assert all(keep is None for _, _, keep in steps), "the benchmark makes no rollbacks"
    return [(step_id, hidden) for step_id, hidden, _ in steps]


def one_run(path: Path, context: int, mode: str) -> tuple[float, float, int]:
    """(stall seconds, median decoding step seconds, replayed messages) of one failover."""
    session_module.replay_steps = step_by_step if mode == "step-by-step" else replay_steps
    num_layers = json.loads((path / "config.json").read_text())["num_hidden_layers"]
    split = num_layers // 2
    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        nodes = [swarm.start_node(path, "--blocks", f"{a}:{b}", wait=False)
                 for a, b in [(0, split), (split, num_layers), (split, num_layers)]]
        for node in nodes:
            swarm.wait_ready(node)
        config = ClientConfig(handoff=False, mirrors=mode == "mirror")
        with (AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers,
                                                              config=config) as model,
              model.inference_session(max_length=context + DECODE_STEPS + 1) as session):
            ids = torch.randint(0, model.model_config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
            for t in range(context):
                session.step(model.head.embed(ids[:, t : t + 1]))
            token = ids[:, -1:]
            gaps = []
            for i in range(DECODE_STEPS):
                if i == KILL_AT:
                    address = next(a for a, start, _ in session.route if start == split)
                    LocalSwarm.kill(next(n for n in nodes if n.info["address"] == address))
                t0 = time.perf_counter()
                token = model.head.greedy(session.step(model.head.embed(token)))[:, None]
                gaps.append(time.perf_counter() - t0)
            assert session.failovers == 1 and (session.promotions == 1) == (mode == "mirror")
            messages = 0 if mode == "mirror" else len(session._hops[1].inputs) - (DECODE_STEPS - KILL_AT)
    median = statistics.median(gaps)
    return max(gaps) - median, median, messages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4000])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--shape", default="small-8x256")
    args = parser.parse_args()
    path = checkpoint(args.shape)
    rows = []
    for context in args.contexts:
        modes = ["step-by-step", "prefill", "mirror"]
        stalls: dict[str, list[float]] = {mode: [] for mode in modes}
        steps, messages, ratios = [], {}, []
        for r in range(args.rounds):
            for mode in modes[r % 3 :] + modes[: r % 3]:
                stall, median, sent = one_run(path, context, mode)
                stalls[mode].append(stall)
                steps.append(median)
                messages[mode] = sent
                print(f"context {context}, round {r}, {mode}: stall {stall:.3f} s, step {median * 1000:.1f} ms, "
                      f"{sent} replayed message(s)", file=sys.stderr)
            ratios.append(stalls["prefill"][-1] / max(stalls["step-by-step"][-1], 1e-9))
        rows.append([context, statistics.median(steps) * 1000, messages["step-by-step"],
                     statistics.median(stalls["step-by-step"]), messages["prefill"],
                     statistics.median(stalls["prefill"]), statistics.median(ratios),
                     statistics.median(stalls["mirror"])])
    print(table(["context", "step ms", "old msgs", "old stall s", "new msgs", "new stall s", "new/old",
                 "mirror stall s"], rows))


if __name__ == "__main__":
    main()
