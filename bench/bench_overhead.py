"""Overhead of the swarm over one process: greedy decoding through 2 nodes on loopback against
transformers `generate` on the same checkpoint, in one run; plus time to first token.

    python bench/bench_overhead.py [--shapes small-8x256 large-16x1024] [--new-tokens 24] [--prompt 16]
                                   [--node-env KEY=VALUE ...] [--node-args ARGS]

``--node-env`` sets environment variables of the nodes only (e.g. ``GOMP_SPINCOUNT=300000``, libgomp's
default, against the 10,000 that ``join-swarm``'s launcher sets); this process, which runs
``transformers`` and the client, keeps its own environment.

Prints, per shape: decode tokens/s of transformers, of our engine in one process (LocalModel), and
through the swarm, both with the client's default greedy head (an int8 copy of the LM head, the
rows that could win rescored in float32: ``homeswarm.model.bounded_argmax``) and with the plain
float32 head product (as LocalModel and transformers); the ratios; and the per-step overhead of each
node (swarm step time minus the local step time, divided by the number of nodes, both with the
float32 head).

A second table splits a decoding step's time per node, measured directly: the client relays each
step through every hop itself and times it (send to answer), the node reports its forward pass
(``StepResult.compute_seconds``), and the difference is ours (serialization, gRPC, the node's queues
and threads, the client's threads). Beside it, the same blocks' forward pass timed alone in this
process, with the nodes idle: what the node's compute would take without other processes sharing
the cores and the CPU caches.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import SHAPES, checkpoint, params, table  # noqa: E402
from homeswarm.client.local_swarm import LocalSwarm, split_blocks  # noqa: E402
from homeswarm.client.model import AutoDistributedModelForCausalLM  # noqa: E402
from homeswarm.client.transport import HopStream  # noqa: E402
from homeswarm.model import LocalModel, ModelConfig, load_head, load_span  # noqa: E402
from homeswarm.protocol import node_pb2  # noqa: E402


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
    parser.add_argument("--node-env", nargs="*", default=[], metavar="KEY=VALUE",
                        help="environment variables for the nodes only")
    parser.add_argument("--node-args", default="", metavar="ARGS",
                        help="extra join-swarm arguments for every node, e.g. '--inline-compute-ms 100'")
    parser.add_argument("--split-steps", type=int, default=200, help="decoding steps for the per-node split")
    args = parser.parse_args()
    rows = []
    split_rows: list[list[object]] = []
    for shape in args.shapes:
        rows += measure(shape, args, split_rows)
    print(f"greedy, float32, CPU ({torch.get_num_threads()} threads), prompt {args.prompt}, "
          f"{args.new_tokens} new tokens, {args.nodes} nodes on 127.0.0.1")
    print(table(["shape", "params", "run", "transformers tok/s", "ours local tok/s", "swarm tok/s",
                 "swarm f32 head tok/s", "local/hf", "swarm/hf", "swarm f32 head/hf", "overhead ms/node/step",
                 "hf TTFT ms", "swarm TTFT ms"], rows))
    print()
    print(f"one decoding step split per node (client relays, medians of {args.split_steps} steps)")
    print(table(["shape", "node", "blocks", "round trip ms", "node compute ms", "ours ms (trip - compute)",
                 "same blocks alone ms"], split_rows))


def measure(shape: str, args: argparse.Namespace, split_rows: list[list[object]]) -> list[list[object]]:
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

    with LocalSwarm(env=dict(kv.split("=", 1) for kv in args.node_env)) as swarm:
        swarm.start_bootstrap()
        nodes = [swarm.start_node(path, "--blocks", f"{a}:{b}", *args.node_args.split(), wait=False)
                 for a, b in split_blocks(config.num_hidden_layers, args.nodes)]
        for node in nodes:
            swarm.wait_ready(node, timeout=300)
        with AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers) as model:

            fast_head, plain_head = model.head, load_head(path)  # the client's default, and without prepare_greedy

            def swarm_generate(ids: torch.Tensor, n: int) -> torch.Tensor:
                model.head = fast_head
                return model.generate(ids, max_new_tokens=n)

            def swarm_plain_generate(ids: torch.Tensor, n: int) -> torch.Tensor:
                model.head = plain_head
                return model.generate(ids, max_new_tokens=n)

            swarm_generate(prompt, 4)  # warm-up: routes, pings, channels
            hf_generate(prompt, 4)
            local_generate(prompt, 4)
            expected = hf_generate(prompt, args.new_tokens).tolist()
            assert swarm_generate(prompt, args.new_tokens).tolist() == expected
            assert swarm_plain_generate(prompt, args.new_tokens).tolist() == expected
            for repeat in range(args.repeats):
                # interleaved, so that a slow moment of the machine hits all three alike
                hf_ttft, hf_rate = decode_rate(hf_generate, prompt, args.new_tokens)
                our_ttft, our_rate = decode_rate(local_generate, prompt, args.new_tokens)
                sw_ttft, sw_rate = decode_rate(swarm_generate, prompt, args.new_tokens)
                _, plain_rate = decode_rate(swarm_plain_generate, prompt, args.new_tokens)
                overhead_ms = (1 / plain_rate - 1 / our_rate) / args.nodes * 1000
                rows.append([shape, f"{params(shape) / 1e6:.1f}M", repeat, hf_rate, our_rate, sw_rate, plain_rate,
                             our_rate / hf_rate, sw_rate / hf_rate, plain_rate / hf_rate, overhead_ms,
                             hf_ttft * 1000, sw_ttft * 1000])
            split_rows += split_step(model, path, config, args.split_steps, shape)
    for column, name in ((8, "swarm/hf"), (9, "swarm f32 head/hf")):
        print(f"{shape}: {name} median of {len(rows)} rounds {statistics.median(r[column] for r in rows):.3f}")
    return rows


def split_step(model: AutoDistributedModelForCausalLM, path: Path, config: ModelConfig, steps: int,
               shape: str) -> list[list[object]]:
    """Per hop: round trip, node compute, our part, the same blocks alone in this process."""
    route = model.routes.plan(0, config.num_hidden_layers)
    streams = [HopStream(model.pool, peer_id=hop.peer_id, address=hop.address, model=model.model_name,
                         start=hop.start, end=hop.end, batch_size=1, max_length=steps + 20,
                         compression=node_pb2.NONE, connect_timeout=10, step_timeout=60) for hop in route]
    trips: list[list[float]] = [[] for _ in route]
    computes: list[list[float]] = [[] for _ in route]
    gen = torch.Generator().manual_seed(1)
    try:
        for step_id in range(1, steps + 2):
            hidden = torch.randn(1, 16 if step_id == 1 else 1, config.hidden_size, generator=gen)
            for i, stream in enumerate(streams):
                t0 = time.perf_counter()
                hidden = stream.step(step_id, hidden)
                received = time.perf_counter()
                if step_id > 1:  # decoding steps only
                    trips[i].append(received - t0)
                    computes[i].append(stream.last_compute_seconds)
    finally:
        for stream in streams:
            stream.close()
    rows: list[list[object]] = []
    for i, hop in enumerate(route):
        alone = _alone_ms(path, hop.start, hop.end, config.hidden_size, steps)
        trip, compute = statistics.median(trips[i]) * 1000, statistics.median(computes[i]) * 1000
        ours = statistics.median(t - c for t, c in zip(trips[i], computes[i], strict=True)) * 1000
        rows.append([shape, i, f"{hop.start}:{hop.end}", trip, compute, ours, alone])
    return rows


def _alone_ms(path: Path, start: int, end: int, hidden_size: int, steps: int) -> float:
    """Median forward time of blocks [start, end) for one cached token, in this process."""
    span = load_span(path, start, end)
    cache = span.new_cache(1, steps + 20)
    times = []
    with torch.no_grad():
        span(torch.randn(1, 16, hidden_size), cache)
        for _ in range(steps):
            t0 = time.perf_counter()
            span.forward_batch([(torch.randn(1, 1, hidden_size), cache)])
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


if __name__ == "__main__":
    main()
