"""Per-step cost of a node reached through a libp2p relay against the same node dialled directly.

    python bench/bench_relay.py [--rounds 7] [--steps 30] [--shape small-8x256]

On loopback: a bootstrap peer (also the relay), a node started with ``--reachability direct`` and one
with ``--reachability relayed`` (its gRPC reached through the bootstrap peer's relay), both serving
every block of the same checkpoint under two model names, so that a client routes through one or the
other. Each round times, on each path, the median of ``--steps`` decoding steps and of as many Info
round trips (a small message: the path's own latency); the rounds alternate the paths and the table
gives the median over rounds and the median of the per-round ratios. The path column says what libp2p
actually used ("/p2p-circuit": through the relay; anything else: a direct libp2p connection, e.g. after
a hole punch, which on loopback nothing prevents).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import checkpoint, info_ms, swarm_step_ms, table  # noqa: E402
from homeswarm.client.config import ClientConfig  # noqa: E402
from homeswarm.client.local_swarm import LocalSwarm  # noqa: E402
from homeswarm.client.model import AutoDistributedModelForCausalLM  # noqa: E402
from homeswarm.routing.relay import stream_path  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--shape", default="small-8x256")
    args = parser.parse_args()
    path = checkpoint(args.shape)
    config = ClientConfig(handoff=False)
    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        nodes = {
            mode: swarm.start_node(path, "--model-name", f"bench-{mode}", "--reachability", mode,
                                   "--compute-threads", "1", wait=False)
            for mode in ("direct", "relayed")
        }
        for daemon in nodes.values():
            swarm.wait_ready(daemon)
        models = {mode: AutoDistributedModelForCausalLM.from_pretrained(
            path, initial_peers=swarm.initial_peers, model_name=f"bench-{mode}", config=config) for mode in nodes}
        try:
            for model in models.values():
                model.routes.records(refresh=True)
                swarm_step_ms(model, 3)  # warm: connections, forwarder, thread pools
            samples: dict[str, dict[str, list[float]]] = {m: {"step": [], "info": []} for m in nodes}
            for r in range(args.rounds):
                order = list(nodes) if r % 2 == 0 else list(reversed(nodes))
                for mode in order:
                    samples[mode]["step"].append(swarm_step_ms(models[mode], args.steps)[0])
                    samples[mode]["info"].append(info_ms(models[mode], nodes[mode].info, args.steps))
            relay_path = stream_path(models["relayed"].dht, nodes["relayed"].info["peer_id"]) or "?"
        finally:
            for model in models.values():
                model.close()
    rows = []
    for what in ("step", "info"):
        direct, relayed = samples["direct"][what], samples["relayed"][what]
        ratios = [b / a for a, b in zip(direct, relayed, strict=True)]
        rows.append([
            "decoding step (ms)" if what == "step" else "Info round trip (ms)",
            f"{statistics.median(direct):.2f}", f"{statistics.median(relayed):.2f}",
            f"{statistics.median(relayed) - statistics.median(direct):+.2f}", f"{statistics.median(ratios):.2f}x",
        ])
    print(f"shape {args.shape}, {args.rounds} rounds of {args.steps} steps, client relays (no hand-off)")
    print(f"relayed node's libp2p path: {relay_path}")
    print(table(["", "direct", "relayed", "difference", "median ratio"], rows))


if __name__ == "__main__":
    main()
