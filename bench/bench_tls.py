"""Per-step cost of TLS on a hop: a node serving over TLS (the default) against one started with --insecure.

    python bench/bench_tls.py [--rounds 7] [--steps 30] [--shape small-8x256] [--prefill 256]

On loopback: a bootstrap peer and two nodes serving every block of the same checkpoint under two model
names, one with the default TLS (its certificate pinned by its record), one with ``--insecure``; the
client relays (no hand-off), so each step is one hop out and back. Each round times, on each node, the
median of ``--steps`` decoding steps, of as many Info round trips (a small message: the path's latency),
and of a few steps of ``--prefill`` tokens (a large message: encryption's per-byte cost); the rounds
alternate the nodes and the table gives the median over rounds and the median of the per-round ratios.
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

PREFILL_STEPS = 5






def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--shape", default="small-8x256")
    parser.add_argument("--prefill", type=int, default=256, help="tokens of the large steps")
    args = parser.parse_args()
    path = checkpoint(args.shape)
    config = ClientConfig(handoff=False)
    modes = {"tls": (), "insecure": ("--insecure",)}
    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        nodes = {mode: swarm.start_node(path, "--model-name", f"bench-{mode}", "--compute-threads", "1", *flags,
                                        wait=False) for mode, flags in modes.items()}
        for daemon in nodes.values():
            swarm.wait_ready(daemon)
        assert nodes["tls"].info["tls_cert"] and not nodes["insecure"].info["tls_cert"]
        models = {mode: AutoDistributedModelForCausalLM.from_pretrained(
            path, initial_peers=swarm.initial_peers, model_name=f"bench-{mode}", config=config) for mode in nodes}
        try:
            for mode, model in models.items():
                model.routes.records(refresh=True)
                assert bool(model.pool.pinned(nodes[mode].info["peer_id"])) == (mode == "tls")
                swarm_step_ms(model, 3)  # warm: connections (the TLS handshake), thread pools
            samples: dict[str, dict[str, list[float]]] = {m: {"step": [], "info": [], "prefill": []} for m in nodes}
            for r in range(args.rounds):
                order = list(nodes) if r % 2 == 0 else list(reversed(nodes))
                for mode in order:
                    samples[mode]["step"].append(swarm_step_ms(models[mode], args.steps)[0])
                    samples[mode]["info"].append(info_ms(models[mode], nodes[mode].info, args.steps))
                    samples[mode]["prefill"].append(swarm_step_ms(models[mode], PREFILL_STEPS, args.prefill)[0])
        finally:
            for model in models.values():
                model.close()
    names = {"step": "decoding step (ms)", "info": "Info round trip (ms)",
             "prefill": f"{args.prefill}-token step (ms)"}
    rows = []
    for what, name in names.items():
        plain, tls = samples["insecure"][what], samples["tls"][what]
        ratios = [b / a for a, b in zip(plain, tls, strict=True)]
        rows.append([name, f"{statistics.median(plain):.2f}", f"{statistics.median(tls):.2f}",
                     f"{statistics.median(tls) - statistics.median(plain):+.2f}", f"{statistics.median(ratios):.2f}x"])
    print(f"shape {args.shape}, {args.rounds} rounds of {args.steps} steps, client relays (no hand-off)")
    print(table(["", "--insecure", "TLS", "difference", "median ratio"], rows))


if __name__ == "__main__":
    main()
