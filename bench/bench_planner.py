"""Route planner benchmark: milliseconds per ``plan_route`` call on random swarms.

Each swarm has servers with random spans of 4-16 blocks, random per-block throughputs and random
round-trip times; a few servers are short of cache or have queued work. Prints a table; asserts nothing.
Each row times ``--repeats`` calls after one untimed warm-up call; the p95 is the 95th percentile of
those, so it needs at least 100 of them to be one (the default is 200).

    python bench/bench_planner.py [--repeats N]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from homeswarm.routing.planner import plan_route
from homeswarm.routing.records import PeerId, ServerRecord, ServerState


def make_swarm(
    num_servers: int, num_blocks: int, seed: int
) -> tuple[list[ServerRecord], dict[PeerId, float]]:
    rng = random.Random(seed)
    records: list[ServerRecord] = []
    rtts: dict[PeerId, float] = {}
    for i in range(num_servers):
        span = rng.randint(4, min(16, num_blocks))
        start = rng.randint(0, num_blocks - span)
        if i * 4 < num_blocks:  # the first servers tile the model, so that a route always exists
            start, span = i * 4, min(4, num_blocks - i * 4)
        peer = PeerId(f"peer{i}")
        records.append(
            ServerRecord(
                peer_id=peer,
                address=f"10.0.{i // 256 % 256}.{i % 256}:{30000 + i % 1000}",
                model="bench",
                start=start,
                end=start + span,
                state=ServerState.ONLINE
                if i * 4 < num_blocks or rng.random() < 0.95
                else ServerState.JOINING,
                protocol_version=1,
                dtype="bfloat16",
                throughput=rng.uniform(1.0, 200.0),
                cache_tokens_left=rng.choice([0, 4096, 65536]),
                public_name="",
                **(
                    {"queue": rng.choice([0, 0, 0, 1, 4])}
                    if "queue" in ServerRecord.__dataclass_fields__
                    else {}
                ),
            )
        )
        if rng.random() < 0.8:
            rtts[peer] = rng.uniform(0.002, 0.2)
    return records, rtts


def bench(num_servers: int, num_blocks: int, repeats: int) -> tuple[float, float]:
    records, rtts = make_swarm(num_servers, num_blocks, seed=num_servers * 1000 + num_blocks)
    banned = {PeerId(f"peer{i}"): 10.0 for i in range(num_blocks, num_servers, 50)}
    plan_route(records, 0, num_blocks, rtts=rtts, banned=banned, now=5.0, cache_tokens_needed=2048, model="bench")
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        plan_route(
            records, 0, num_blocks, rtts=rtts, banned=banned, now=5.0, cache_tokens_needed=2048, model="bench"
        )
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times), statistics.quantiles(times, n=100, method="inclusive")[94]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200, help="timed calls per row (at least 100)")
    args = parser.parse_args()
    if args.repeats < 100:
        parser.error("--repeats must be at least 100: a 95th percentile of fewer calls is their maximum or close to it")
    print(f"{'servers':>8} {'blocks':>7} {'median ms':>10} {'p95 ms':>8}")
    for num_servers, num_blocks in [
        (10, 32),
        (100, 32),
        (1_000, 80),
        (10_000, 80),
        (10_000, 160),
        (30_000, 80),
    ]:
        median, p95 = bench(num_servers, num_blocks, args.repeats)
        print(f"{num_servers:>8} {num_blocks:>7} {median:>10.2f} {p95:>8.2f}")


if __name__ == "__main__":
    main()
