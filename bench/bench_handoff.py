"""Per-step latency with and without server-to-server hand-off, over delaying proxies.

    python bench/bench_handoff.py [--delays-ms 0 5 15 30] [--nodes 3] [--steps 40]

Every node sits behind a TCP proxy on 127.0.0.1 that delays each direction by the given time (it is
announced through --public-address), so each network leg costs that delay. With hand-off a decoding
step crosses N+1 legs on its critical path; with client relay, 2N. A first row ("direct") has no
proxies: bare loopback. The "auto" column is the default client, which relays where the route's round
trips average under ``ClientConfig.handoff_min_rtt`` and hands off elsewhere. Prints ms per decoding step.
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import checkpoint, swarm_step_ms, table  # noqa: E402
from homeswarm.client.config import ClientConfig  # noqa: E402
from homeswarm.client.local_swarm import LocalSwarm, split_blocks  # noqa: E402
from homeswarm.client.model import AutoDistributedModelForCausalLM  # noqa: E402
from tests.helpers.proxy import DelayingProxy  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--delays-ms", type=float, nargs="+", default=[0, 5, 15, 30])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--shape", default="small-8x256")
    args = parser.parse_args()
    path = checkpoint(args.shape)
    num_layers = int(__import__("json").loads((path / "config.json").read_text())["num_hidden_layers"])
    rows = []
    for delay in [None, *args.delays_ms]:  # None: no proxies
        with LocalSwarm() as swarm:
            swarm.start_bootstrap()
            proxies, nodes = [], []
            try:
                for a, b in split_blocks(num_layers, args.nodes):
                    if delay is None:
                        nodes.append(swarm.start_node(path, "--blocks", f"{a}:{b}", wait=False))
                        continue
                    port = free_port()
                    proxy = DelayingProxy("127.0.0.1", port, delay / 1000)
                    proxies.append(proxy)
                    nodes.append(swarm.start_node(path, "--blocks", f"{a}:{b}", "--port", str(port),
                                                  "--public-address", proxy.address, wait=False))
                for node in nodes:
                    swarm.wait_ready(node)
                result = {}
                configs = {"relay": ClientConfig(handoff=False), "handoff": ClientConfig(handoff_min_rtt=0.0),
                           "auto": ClientConfig()}
                for name, config in configs.items():
                    with AutoDistributedModelForCausalLM.from_pretrained(
                        path, initial_peers=swarm.initial_peers, config=config
                    ) as model:
                        result[name], chose = swarm_step_ms(model, args.steps)
                        if name == "auto":
                            result["chose"] = "hand-off" if chose else "relay"
                n, d = args.nodes, delay or 0.0
                rows.append(["direct" if delay is None else delay, result["relay"], result["handoff"],
                             result["relay"] / result["handoff"], result["auto"], result["chose"],
                             2 * n * d, (n + 1) * d])
            finally:
                for proxy in proxies:
                    proxy.close()
    print(f"{args.nodes} nodes, model {args.shape!r}, each node behind a proxy delaying each direction; "
          f"median of {args.steps} decoding steps")
    print(table(["delay ms/leg", "relay ms/step", "hand-off ms/step", "hand-off speed-up", "auto ms/step",
                 "auto chose", "2N legs ms", "N+1 legs ms"], rows))


if __name__ == "__main__":
    main()
