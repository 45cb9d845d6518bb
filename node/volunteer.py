"""A volunteer node's life around its serving periods: choose a span, load it, serve, step aside, move.

``run_volunteer`` loops over serving periods. Before each: wait while the machine's owner uses it
(``--idle-only``, announcing "busy"), choose the span (``--blocks``, else as many blocks as fit the
memory budget, placed where the swarm is weakest), claim it (announce "joining" and re-read the swarm
until no higher-ranked node claims it too: :mod:`.placement`), load it (progress bar) and take its
throughput (``--throughput``, the cache, or the self-test). A period is ``serve_span``
(``main._serve_with_dht``): it serves until a :class:`PeriodEnd` comes, from a signal (stop), the idle
watch (the owner is back: busy), the claim watch (a node that joined at the same moment keeps these
blocks: move) or the rebalancer (the swarm's weakest blocks need this node more than its current ones:
move), announces what comes next, gives open sessions their grace and returns. Then the weights are
released, and the loop goes on or, after a stop, ends. If the DHT process dies on its own, the node
stops as after a signal and exits with status 1.

The decisions are the pure functions of :mod:`homeswarm.routing.block_chooser`, :mod:`.idle` and
:mod:`.capacity`; this module only feeds them measurements and DHT reads, and acts on their answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from tqdm import tqdm

from homeswarm.model import BlockSpan, ModelConfig, cache_bytes, load_span, span_weight_bytes
from homeswarm.model.heap import trim_heap
from homeswarm.model.hub import fetch_span_files
from homeswarm.node.announcer import Announcer
from homeswarm.node.capacity import (
    DEFAULT_FIXED_COST,
    DEFAULT_MEMORY_FRACTION,
    WORKING_MEMORY,
    blocks_that_fit,
    cache_budget,
    default_budget,
    format_size,
    parse_size,
    weight_budget,
)
from homeswarm.node.config import ConfigError, NodeConfig
from homeswarm.node.idle import IdleThresholds
from homeswarm.node.idle_probe import MachineProbe
from homeswarm.node.idle_watch import IdleWatch, idle_users
from homeswarm.node.period import EndReason, PeriodEnd, PeriodEnds
from homeswarm.node.placement import JOIN_SETTLE, Sightings, read_swarm, rebalance, settle_claim, watch_claim
from homeswarm.node.process_memory import cgroup_memory_left, other_nodes, tree_memory
from homeswarm.node.throughput import (
    SELF_TEST_STEPS,
    ThroughputCache,
    ThroughputKey,
    config_digest,
    measure_block_throughput,
)
from homeswarm.protocol import PROTOCOL_VERSION
from homeswarm.protocol.block_range import block_range as span_text
from homeswarm.routing.block_chooser import choose_blocks
from homeswarm.routing.dht import SwarmDHT
from homeswarm.routing.records import PeerId, ServerRecord, ServerState

logger = logging.getLogger("homeswarm.node")

DHT_CHECK = 1.0  # seconds between checks that the DHT process still runs


# --- memory --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryPlan:
    budget: int  # bytes for weights and KV cache: --max-memory (or the default) less the runtime's
    given: bool  # --max-memory was given (else the default fraction of available memory)
    num_blocks: int  # how many blocks to serve when no --blocks is given
    total: int = 0  # the whole node's budget (--max-memory, or the default)
    runtime: int = 0  # what the runtime takes of it (fixed cost and working memory)


def runtime_cost(config: NodeConfig) -> int:
    """The memory the node takes besides weights and KV cache, counted against --max-memory: --fixed-cost,
    else the process tree's resident memory now (Python, torch, the DHT process, p2pd) plus working
    memory for the largest step. On a GPU, whose memory holds only weights and cache, nothing."""
    if torch.device(config.device).type != "cpu":
        return 0
    if config.fixed_cost is not None:
        return 0 if config.fixed_cost.strip() == "0" else parse_size(config.fixed_cost)
    release_memory(torch.device("cpu"))
    measured = tree_memory()
    return (measured.rss if measured is not None else DEFAULT_FIXED_COST) + WORKING_MEMORY


def plan_memory(config: NodeConfig, model: ModelConfig, dtype: torch.dtype, available: int,
                runtime: int = 0) -> MemoryPlan:
    """The memory budget for weights and cache (the node's budget less ``runtime``, the bytes its runtime
    takes: :func:`runtime_cost`) and, without --blocks or --num-blocks, how many blocks fit in it."""
    given = config.max_memory is not None
    total = parse_size(config.max_memory) if given else default_budget(available, torch.device(config.device).type)
    share = DEFAULT_MEMORY_FRACTION.get(torch.device(config.device).type, DEFAULT_MEMORY_FRACTION["cpu"])
    what = "--max-memory" if given else f"the default budget ({share:.0%} of the memory available at start)"
    # nothing is reserved: nodes started side by side each see the same available memory and count it
    source = "--max-memory" if given else (
        f"the default budget: {share:.0%} of the {format_size(available)} available at start, which other nodes "
        f"started on this machine count too; give each node --max-memory")
    budget = total - runtime
    if budget <= 0:
        raise ConfigError(
            f"{what} of {format_size(total)} does not even hold the node's runtime, {format_size(runtime)} "
            f"(Python, torch, the DHT process and p2pd, and working memory; --fixed-cost sets it): give more memory"
        )
    if runtime or not given:
        logger.info("memory: %s in all (%s), of which the runtime takes %s; %s for weights and KV cache (the "
                    "cache a limit, at most --cache-share %g of it)", format_size(total), source, format_size(runtime),
                    format_size(budget), config.cache_share)
    total_blocks = model.num_hidden_layers
    if config.num_blocks is not None:
        return MemoryPlan(budget, given, min(config.num_blocks, total_blocks), total, runtime)
    if config.blocks is not None:
        return MemoryPlan(budget, given, 0, total, runtime)
    layer_bytes = [span_weight_bytes(model, i, i + 1, dtype, config.quant, config.quant_group_size)
                   for i in range(total_blocks)]
    split = weight_budget(budget, cache_share=config.cache_share, cache_tokens=config.max_cache_tokens,
                          token_bytes_per_block=cache_bytes(model, 1, 1, 1, dtype))
    n = blocks_that_fit(layer_bytes, split.per_block_cache, split.weights)
    if n == 0:
        raise ConfigError(
            f"not even one block fits in the memory budget of {format_size(budget)} for weights and KV cache "
            f"({what}{f' less the runtime, {format_size(runtime)}' if runtime else ''}): the smallest takes "
            f"{format_size(min(layer_bytes))} of weights, and the KV cache needs its share (--cache-share "
            f"{config.cache_share:g} or --max-cache-tokens); give more memory or a smaller --quant"
        )
    logger.info("%d of %d blocks fit in the memory budget of %s for weights and KV cache", n, total_blocks,
                format_size(budget))
    return MemoryPlan(budget, given, n, total, runtime)


def span_cache_budget(config: NodeConfig, plan: MemoryPlan, model: ModelConfig, dtype: torch.dtype,
                      start: int, end: int) -> int:
    """KV cache bytes for a node serving [start, end)."""
    weights = span_weight_bytes(model, start, end, dtype, config.quant, config.quant_group_size)
    token_bytes = cache_bytes(model, end - start, 1, 1, dtype)
    budget = cache_budget(plan.budget, weights, cache_share=config.cache_share, cache_tokens=config.max_cache_tokens,
                          token_bytes=token_bytes)
    if config.max_cache_tokens is None and budget < int(config.cache_share * plan.budget):
        if plan.given:
            raise ConfigError(
                f"blocks {span_text(start, end)} take {format_size(weights)} of weights, which leaves "
                f"{format_size(budget)} of --max-memory {format_size(plan.budget)} for the KV cache, less than "
                f"its share (--cache-share {config.cache_share:g}); serve fewer blocks or give more memory"
            )
        budget = int(config.cache_share * plan.budget)  # explicit blocks beyond the default budget
    return budget


def release_memory(device: torch.device) -> None:
    """Give freed weights back to the system, not only to the allocator (glibc keeps freed heap)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    trim_heap()


# --- loading -------------------------------------------------------------------------------------


@dataclass
class LoadedSpan:
    span: BlockSpan
    throughput: float  # steps per second through one block
    cache_budget: int  # bytes of KV cache this node offers


def _load(config: NodeConfig, dtype: torch.dtype, start: int, end: int, throughput: float | None,
          cache: ThroughputCache, key: ThroughputKey) -> tuple[BlockSpan, float]:
    """Load the span and take its throughput, under one progress bar (shown on a terminal only)."""
    fetch_span_files(config.model_dir, start, end)  # a hub checkpoint: the span's shards it lacks (own bars)
    steps = 0 if throughput is not None else SELF_TEST_STEPS
    with tqdm(total=end - start + steps, desc=f"loading blocks {span_text(start, end)}", unit="step",
              disable=None, leave=False) as bar:
        span = load_span(config.model_dir, start, end, dtype=dtype, device=config.device, quant=config.quant,
                         group_size=config.quant_group_size, on_block=lambda _: bar.update(1))
        if throughput is None:
            bar.set_description("throughput self-test")
            throughput = measure_block_throughput(span, on_step=lambda: bar.update(1))
            cache.put(key, throughput, time.time())
            release_memory(span.device)  # the self-test's activations, held by the heap otherwise
    return span, throughput


# --- the loop ------------------------------------------------------------------------------------


def free_port(host: str) -> int:
    """A port free now on ``host``: the node keeps one address across its serving periods."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class _Presence:
    """What the node announces between serving periods (joining, busy)."""

    start: int = 0
    end: int = 1
    throughput: float = 0.0


ServeSpan = Callable[..., Awaitable[PeriodEnd]]
T = TypeVar("T")


async def until_stopped(work: Awaitable[T], stop: asyncio.Event) -> T | None:
    """``work``'s result, or None (``work`` cancelled) once ``stop`` is set."""
    task, stopped = asyncio.ensure_future(work), asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([task, stopped], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


async def watch_dht(dht: SwarmDHT, stop: asyncio.Event, lost: asyncio.Event) -> None:
    """Stop the node (it then exits with status 1, so that a service manager restarts it) once its DHT
    process is gone: killed on its own, the node could no longer announce or be found."""
    while dht.is_alive():
        await asyncio.sleep(DHT_CHECK)
    logger.error("the DHT process has exited; stopping")
    lost.set()
    stop.set()


async def run_volunteer(config: NodeConfig, stop: asyncio.Event, dht: SwarmDHT, model: ModelConfig,
                        dtype: torch.dtype, model_name: str, block_range: tuple[int, int] | None,
                        available_memory: int, serve_span: ServeSpan,
                        prepare_span: Callable[[int, int], Awaitable[None]] | None = None) -> int:
    """Serve periods until stopped; ``prepare_span(start, end)``, when given, gets a span's weights (from
    peers) before it loads."""
    total = model.num_hidden_layers
    me = PeerId(dht.peer_id)
    rng = random.Random()
    left = cgroup_memory_left() if torch.device(config.device).type == "cpu" else None
    runtime = runtime_cost(config)
    # what the runtime holds already no longer shows as available: count it back in
    available = available_memory if left is None else min(available_memory, left)
    memory = plan_memory(config, model, dtype, available + runtime, runtime)
    if not memory.given and torch.device(config.device).type == "cpu" and (others := other_nodes()):
        # nothing is reserved: their weights and caches may together take more than the machine has
        logger.warning("%d other join-swarm node(s) run on this machine, and each counts the memory available "
                       "at its start as its own: give each --max-memory so that together they fit", others)
    if config.port == 0:
        config = dataclasses.replace(config, port=free_port(config.host))
    address = config.public_address or f"{config.host}:{config.port}"
    cache = ThroughputCache()
    presence = _Presence()

    def record(state: ServerState) -> ServerRecord:
        return ServerRecord(peer_id=me, address=address, model=model_name, start=presence.start, end=presence.end,
                            state=state, protocol_version=PROTOCOL_VERSION, dtype=config.dtype,
                            throughput=presence.throughput, cache_tokens_left=0, public_name=config.public_name,
                            quant=config.quant)

    announcer = Announcer(dht, record, total, config.announce_ttl)
    refresher: asyncio.Task | None = None

    async def announce(state: ServerState) -> None:
        nonlocal refresher
        try:
            await asyncio.wait_for(announcer.announce(state), timeout=config.announce_ttl / 3)
        except Exception as e:  # the refresher tries again
            logger.warning("announcing %s failed: %s", state.value, e)
        if refresher is None:
            refresher = asyncio.create_task(announcer.run())

    def quiet() -> None:
        nonlocal refresher
        if refresher is not None:
            refresher.cancel()
            refresher = None

    def key(start: int, end: int) -> ThroughputKey:
        return ThroughputKey(model_name, config_digest(config.model_dir), start, end, config.dtype,
                             config.quant if config.quant != "int4" else f"int4g{config.quant_group_size}",
                             str(torch.device(config.device)), torch.get_num_threads())

    sightings = Sightings()

    async def read() -> list[ServerRecord]:
        return await read_swarm(dht, model_name, total, sightings)

    async def choose() -> tuple[int, int]:
        if block_range is not None:
            return block_range
        return choose_blocks([r for r in await read() if r.peer_id != me], total, memory.num_blocks)

    async def announce_claim(claim: ServerRecord) -> None:
        presence.start, presence.end = claim.start, claim.end
        await announce(ServerState.JOINING)

    ends = PeriodEnds(stop, config.shutdown_grace)
    dht_lost = asyncio.Event()
    dht_watch = asyncio.create_task(watch_dht(dht, stop, dht_lost))
    watch = None
    watch_task = None
    if config.idle_only:
        thresholds = IdleThresholds(cpu_busy=config.idle_cpu_busy, input_idle=config.idle_input_after,
                                    busy_after=config.busy_after, idle_after=config.idle_after,
                                    serve_on_battery=config.serve_on_battery)
        watch = IdleWatch(MachineProbe(users=idle_users(config.idle_users)), thresholds,
                          config.idle_check_interval, ends, config.busy_grace)
        await watch.start()
        watch_task = asyncio.create_task(watch.run())
    next_span: tuple[int, int] | None = None
    last_span: tuple[int, int] | None = None
    try:
        while not stop.is_set():
            if watch is not None and not watch.state.serving:
                # the record shows the span the node served last (or would serve), marked busy
                presence.start, presence.end = next_span or last_span or await choose()
                logger.info("the machine is in use (%s): waiting until it is idle", watch.state.reason)
                await announce(ServerState.BUSY)
                if not await watch.wait_serving(stop):
                    break
                next_span = None
            if next_span is None and last_span is None and block_range is None:
                # nodes started in the same moment (a swarm rebooted, say) read the swarm at different moments
                await until_stopped(asyncio.sleep(rng.uniform(0, JOIN_SETTLE)), stop)
            start, end = next_span or await choose()
            next_span = None
            ends.reset()
            throughput = config.throughput or await asyncio.to_thread(cache.get, key(start, end), time.time())
            estimate = throughput or await asyncio.to_thread(cache.estimate, key(start, end), time.time())
            presence.start, presence.end, presence.throughput = start, end, estimate or 0.0
            await announce(ServerState.JOINING)
            if block_range is None:
                claim = await until_stopped(settle_claim(read, total, record(ServerState.JOINING), announce_claim,
                                                         rng), stop)
                if claim is None:
                    break
                start, end = claim.start, claim.end
            weights = span_weight_bytes(model, start, end, dtype, config.quant, config.quant_group_size)
            budget = span_cache_budget(config, memory, model, dtype, start, end)
            weights_shown = config.dtype if config.quant == "none" else (
                config.quant if config.quant != "int4" else f"int4 in groups of {config.quant_group_size}")
            logger.info("loading blocks %s of %s (%s, weights %s: %s; KV cache limit %s, taken only as sessions "
                        "need it)", span_text(start, end), model_name, config.device, weights_shown,
                        format_size(weights), format_size(budget))
            t0 = time.perf_counter()
            if prepare_span is not None:
                await until_stopped(prepare_span(start, end), stop)
                if stop.is_set():
                    break  # stopped while fetching: a transfer's bytes stay for the next start to resume
            span, throughput = await asyncio.to_thread(_load, config, dtype, start, end, throughput, cache,
                                                       key(start, end))
            logger.info("loaded in %.1f s; %.0f steps/s per block (%s)", time.perf_counter() - t0, throughput,
                        "given" if config.throughput else "measured or cached")
            presence.throughput = throughput
            last_span = (start, end)
            if stop.is_set():
                del span
                break  # stopped while loading: nothing was announced online, nothing to drain
            quiet()
            loaded = LoadedSpan(span, throughput, budget)
            del span
            movers = []
            if block_range is None:

                def move(destination: tuple[int, int]) -> None:
                    ends.set(PeriodEnd.move(config.shutdown_grace, destination))

                movers.append(asyncio.create_task(watch_claim(
                    read, total, lambda: record(ServerState.ONLINE), move, rng,
                    duration=max(config.announce_ttl, 3 * JOIN_SETTLE), imbalance=config.rebalance_imbalance)))
                if config.rebalance_interval > 0:
                    movers.append(asyncio.create_task(rebalance(
                        read, total, me, move, interval=config.rebalance_interval,
                        imbalance=config.rebalance_imbalance, settle=max(JOIN_SETTLE, config.announce_ttl / 3),
                        rng=rng)))
            try:
                end_of_period = await serve_span(config, ends, dht, model, dtype, model_name, loaded)
            finally:
                for mover in movers:
                    mover.cancel()
            device = loaded.span.device
            del loaded
            release_memory(device)
            if end_of_period.reason == EndReason.STOP:
                return 1 if dht_lost.is_set() else 0
            if end_of_period.reason == EndReason.MOVE:
                next_span = end_of_period.destination
            else:
                logger.info("released the memory of blocks %s until the machine is idle again", span_text(start, end))
                next_span = (start, end) if block_range is not None else None
        quiet()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(announcer.announce(ServerState.OFFLINE), timeout=5)
        return 1 if dht_lost.is_set() else 0
    finally:
        quiet()
        dht_watch.cancel()
        if watch_task is not None:
            watch_task.cancel()
        announcer.close()
