"""Aggregate decoding throughput of one node with 1, 2, 4, 8 concurrent sessions, batched vs unbatched.

In process, no network: a random 8-block, hidden-512 Llama span and the node's ComputeExecutor. Each
session holds a 128-token prefix, then every session decodes concurrently (one asyncio task each);
"unbatched" runs every step alone (`executor.run(span.forward, ...)`, the node's old path),
"batched" goes through `executor.step` (steps ready together run as one `forward_batch`).
With --grpc, also through a real `join-swarm` daemon (LocalSwarm; batched, as the node runs) with one
client thread and one HopStream per session. Prints tables; asserts nothing.

    python -m bench.bench_concurrency [--steps 32] [--grpc] [--node-args --batch-wait-ms 5]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import threading
import time
from pathlib import Path

import torch

from homeswarm.model import load_span
from homeswarm.node.executor import ComputeExecutor
from tests.helpers.checkpoints import make_checkpoint

PREFIX = 128
SESSIONS = (1, 2, 4, 8)


def make_model(folder: Path) -> Path:
    return make_checkpoint(folder / "llama-8x512", "llama3", num_layers=8, hidden_size=512, intermediate_size=1408,
                           num_heads=8, num_kv_heads=8, vocab_size=1024)


async def _decode(executor: ComputeExecutor, span, sessions: int, steps: int, batched: bool) -> tuple[float, float]:
    """(aggregate tokens/s, mean forward_batch size) for ``sessions`` concurrent sessions."""
    gen = torch.Generator().manual_seed(0)
    caches = []
    for _ in range(sessions):
        cache = span.new_cache(1, PREFIX + steps + 1)
        span(torch.randn(1, PREFIX, span.config.hidden_size, generator=gen), cache)
        caches.append(cache)
    start_batches, start_steps = executor.batches, executor.batched_steps

    async def session(cache) -> None:
        hidden = torch.randn(1, 1, span.config.hidden_size, generator=gen)
        for _ in range(steps):
            if batched:
                out = await executor.step(span, hidden, cache)
            else:
                out = await executor.run(span.forward, hidden, cache)
            hidden = out / out.norm() * 20  # keep the activations in range over many steps

    t0 = time.perf_counter()
    await asyncio.gather(*(session(c) for c in caches))
    elapsed = time.perf_counter() - t0
    batches = executor.batches - start_batches
    mean_batch = (executor.batched_steps - start_steps) / batches if batches else 1.0
    return sessions * steps / elapsed, mean_batch


def bench_in_process(model_dir: Path, steps: int) -> None:
    span = load_span(model_dir, 0, 8)
    executor = ComputeExecutor()
    rows = []
    try:
        asyncio.run(_decode(executor, span, 2, 4, True))  # warm-up
        for n in SESSIONS:
            plain, _ = asyncio.run(_decode(executor, span, n, steps, False))
            batched, mean_batch = asyncio.run(_decode(executor, span, n, steps, True))
            rows.append((n, plain, batched, mean_batch))
    finally:
        executor.shutdown()
    _table(f"in process: 8 blocks x hidden 512, prefix {PREFIX}, {steps} decode steps per session, "
           f"{torch.get_num_threads()} torch threads", rows)


def _table(title: str, rows: list[tuple[int, float, float, float]]) -> None:
    print(f"\n{title}")
    print(f"{'sessions':>8} | {'unbatched tok/s':>15} | {'batched tok/s':>13} | {'batched/unbatched':>17} | "
          f"{'mean batch':>10}")
    print("-" * 76)
    for n, plain, batched, mean_batch in rows:
        print(f"{n:>8} | {plain:>15.1f} | {batched:>13.1f} | {batched / plain:>17.2f} | {mean_batch:>10.2f}")
    one = {False: rows[0][1], True: rows[0][2]}
    last = rows[-1]
    print(f"{last[0]} sessions vs 1: unbatched {last[1] / one[False]:.2f}x, batched {last[2] / one[True]:.2f}x "
          f"(batched {last[0]} vs unbatched 1: {last[2] / one[False]:.2f}x)")


def bench_grpc(model_dir: Path, steps: int, workdir: Path, node_args: list[str]) -> None:
    """The same through one real node over gRPC (batched, as the node runs): a client thread per session."""
    from homeswarm.client.local_swarm import LocalSwarm

    rows = []
    (workdir / "swarm").mkdir()
    with LocalSwarm(workdir / "swarm") as swarm:
        swarm.start_bootstrap()
        node = swarm.start_node(model_dir, "--model-name", "bench", "--blocks", "0:8", *node_args)
        pool = swarm.pool()
        try:
            _grpc_round(pool, node.info, 1, 4)  # warm-up
            for n in SESSIONS:
                before = _counters(pool, node.info)
                rate = _grpc_round(pool, node.info, n, steps)
                passes, batched, inline = (a - b for a, b in zip(_counters(pool, node.info), before, strict=True))
                rows.append((n, rate, batched / max(passes, 1), inline))
        finally:
            pool.close()
    print(f"\nthrough one join-swarm node over gRPC (loopback, batched), prefix {PREFIX}, {steps} steps per session")
    print(f"{'sessions':>8} | {'tok/s':>8} | {'vs 1 session':>12} | {'mean batch':>10} | {'inline steps':>12}")
    print("-" * 66)
    for n, rate, mean_batch, inline in rows:
        print(f"{n:>8} | {rate:>8.1f} | {rate / rows[0][1]:>11.2f}x | {mean_batch:>10.2f} | {inline:>12}")


def _counters(pool, info: dict) -> tuple[int, int, int]:
    """The node's (forward passes, steps they ran, steps run on the event loop) so far."""
    from homeswarm.client.transport import ping

    _, response = ping(pool, info["peer_id"], info["address"], 10)
    return response.forward_passes, response.batched_steps, response.inline_steps


def _grpc_round(pool, info: dict, sessions: int, steps: int) -> float:
    from homeswarm.client.transport import HopStream
    from homeswarm.protocol import node_pb2

    hidden_size = 512
    barrier = threading.Barrier(sessions + 1)
    errors: list[BaseException] = []

    def client(seed: int) -> None:
        try:
            gen = torch.Generator().manual_seed(seed)
            stream = HopStream(pool, peer_id=info["peer_id"], address=info["address"], model="bench", start=0,
                               end=8, batch_size=1, max_length=PREFIX + steps + 1, compression=node_pb2.NONE,
                               connect_timeout=30, step_timeout=120)
            stream.step(1, torch.randn(1, PREFIX, hidden_size, generator=gen))
            hidden = torch.randn(1, 1, hidden_size, generator=gen)
            barrier.wait()
            for i in range(steps):
                out = stream.step(i + 2, hidden)
                hidden = out / out.norm() * 20
            stream.close()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(sessions)]
    for t in threads:
        t.start()
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        pass
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return sessions * steps / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=32, help="decode steps per session")
    parser.add_argument("--grpc", action="store_true", help="also measure through a real node over gRPC")
    parser.add_argument("--node-args", nargs=argparse.REMAINDER, default=[],
                        help="extra join-swarm options for the --grpc node (last on the line)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="homeswarm-bench-concurrency-") as tmp:
        model_dir = make_model(Path(tmp))
        bench_in_process(model_dir, args.steps)
        if args.grpc:
            bench_grpc(model_dir, args.steps, Path(tmp), args.node_args)


if __name__ == "__main__":
    main()
