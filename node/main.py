"""`join-swarm`: the one place that builds a node's components, starts them, and stops them.

``main()`` alone parses arguments, sets up logging, installs uvloop and the signal handlers.
Order of start-up: checkpoint config (fail fast on a bad folder), DHT, then serving periods
(``node.volunteer.run_volunteer``: block choice, "joining", weights, throughput, then
``_serve_with_dht``: gRPC server, announcement, ready file). A period ends on SIGTERM/SIGINT (exit 0
after it), when the machine's owner comes back (``--idle-only``) or when the node moves to other blocks:
it stops admitting sessions, announces offline or busy (so clients stop routing here at once, before
records expire), gives open sessions their grace (``shutdown_grace``, ``busy_grace``), then stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.metadata
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from pathlib import Path

import grpc
import torch
from grpc_reflection.v1alpha import reflection

from homeswarm.model import ModelConfig, cache_bytes, parse_dtype, span_weight_bytes
from homeswarm.model.digest import block_digests, span_digest
from homeswarm.model.gguf_files import gguf_folder, gguf_weight_format, is_gguf_folder, is_gguf_path
from homeswarm.model.gguf_reader import model_stem
from homeswarm.model.hub import (
    HubError,
    HubSnapshot,
    fetch_checkpoint_info,
    is_hub_id,
    local_blocks,
    span_files,
)
from homeswarm.model.loader import check_model_quant
from homeswarm.model.weight_format import weight_format as announced_weight_format
from homeswarm.node.adapters import SpanAdapters, check_adapter_folders
from homeswarm.node.announcer import Announcer
from homeswarm.node.config import ConfigError, NodeConfig
from homeswarm.node.executor import ComputeExecutor
from homeswarm.node.handoff_targets import HandoffTargets
from homeswarm.node.metrics import CacheUse, NodeMetrics, serve_metrics
from homeswarm.node.peer_fetch import PeerFetchError, fetch_span
from homeswarm.node.peer_folder import needs_peers, peer_folder
from homeswarm.node.peer_limits import PeerLimits
from homeswarm.node.peers import PeerChannels
from homeswarm.node.preflight import parse_args
from homeswarm.node.reachability import start_dht
from homeswarm.node.service import NodeIdentity, NodeService
from homeswarm.node.sessions import SessionManager
from homeswarm.node.volunteer import LoadedSpan, PeriodEnd, PeriodEnds, run_volunteer
from homeswarm.node.weight_upload import WeightUploader
from homeswarm.node.wire import add_node_service
from homeswarm.protocol import PROTOCOL_VERSION, node_pb2
from homeswarm.protocol.block_range import block_range as span_text
from homeswarm.protocol.block_range import block_ranges
from homeswarm.protocol.limits import GRPC_OPTIONS
from homeswarm.protocol.ready_file import write_certificate, write_ready_file
from homeswarm.routing.dht import SwarmDHT
from homeswarm.routing.records import PeerId, ServerRecord, ServerState
from homeswarm.routing.relay import forwarder_address, serve_grpc
from homeswarm.routing.signing import NodeKey
from homeswarm.routing.tls import NodeCertificate

logger = logging.getLogger("homeswarm.node")

# no SO_REUSEPORT: a second node asked for a taken port must fail, not share it
SERVER_OPTIONS = [*GRPC_OPTIONS, ("grpc.so_reuseport", 0)]


def software_version() -> str:
    try:
        return importlib.metadata.version("homeswarm")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 2 * 1024**3


async def serve(config: NodeConfig, stop: asyncio.Event) -> int:
    try:
        if is_hub_id(config.model_dir):  # config and index now; the shards once the blocks are chosen
            logger.info("fetching the config and index of %s", config.model_dir)
            snapshot = await asyncio.to_thread(fetch_checkpoint_info, config.model_dir, cache_dir=config.cache_dir)
            config = dataclasses.replace(config, model_dir=str(snapshot),
                                         model_name=config.model_name or config.model_dir)
        if is_gguf_path(config.model_dir):  # its config, tokenizer and chat template as a folder; weights stay in it
            folder = await asyncio.to_thread(gguf_folder, config.model_dir)
            config = dataclasses.replace(config, model_dir=str(folder),
                                         model_name=config.model_name or model_stem(config.model_dir))
        model_config = ModelConfig.from_dir(config.model_dir)
        check_model_quant(model_config, config.quant)
        check_adapter_folders(config.adapters, model_config)  # before the DHT starts or weights load
        dtype = parse_dtype(config.dtype)
    except (OSError, ValueError) as e:
        raise ConfigError(str(e)) from None
    model_name = config.model_name or Path(config.model_dir).resolve().name
    total_blocks = model_config.num_hidden_layers
    block_range = config.block_range()
    if block_range is not None and block_range[1] > total_blocks:
        raise ConfigError(f"--blocks {config.blocks}: the model has only {total_blocks} blocks")
    from_peers = (not config.new_swarm and HubSnapshot.of(config.model_dir) is None
                  and not is_gguf_folder(config.model_dir) and needs_peers(config.model_dir, total_blocks))
    if from_peers:  # the blocks' weights from nodes serving them, into a cache folder that then serves as MODEL_DIR
        try:
            folder = peer_folder(config.model_dir, model_name, config.cache_dir)
        except OSError as e:
            raise ConfigError(f"cannot prepare the folder for weights from peers: {e}") from None
        logger.info("%s holds no block's weights: fetching them from peers into %s", config.model_dir, folder)
        config = dataclasses.replace(config, model_dir=str(folder), model_name=model_name)
    else:
        check_local_shards(config, block_range, total_blocks)

    logger.info("starting the DHT peer")
    try:  # the same peer id across restarts with --identity
        key = NodeKey() if config.identity is None else NodeKey.load_or_create(config.identity)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--identity: {e}") from None
    dht, relays, config = await start_dht(config, key)  # checks how others reach it (node.reachability)
    metrics = NodeMetrics()  # one for the process: its counters carry on across serving periods
    # one TLS certificate for the process too (pinned by every record it announces); none with --insecure
    certificate = None if config.insecure else NodeCertificate()
    prepare = _peer_fetcher(config, dht, model_config, model_name) if from_peers else None
    try:
        with serve_metrics(metrics, config.host, config.metrics_port) as metrics_address:
            return await run_volunteer(config, stop, dht, model_config, dtype, model_name, block_range,
                                       available_memory_bytes(torch.device(config.device)),
                                       partial(_serve_with_dht, metrics=metrics, metrics_address=metrics_address,
                                               relays=relays, certificate=certificate),
                                       prepare_span=prepare)
    except (HubError, PeerFetchError) as e:  # a shard of the blocks chosen could not be had
        raise ConfigError(str(e)) from None
    finally:
        dht.shutdown()


def _peer_fetcher(config: NodeConfig, dht: SwarmDHT, model: ModelConfig,
                  model_name: str) -> Callable[[int, int], Awaitable[None]]:
    """What fetches a span's blocks from peers before it loads (node.peer_fetch)."""
    channels = PeerChannels()
    channels.forwarder = partial(asyncio.to_thread, forwarder_address, dht)  # relayed peers too
    # a sanity bound on what a peer may send for one block: 4x its float32 size (a checkpoint is float32 at most)
    largest = max(span_weight_bytes(model, b, b + 1, torch.float32) for b in range(model.num_hidden_layers))

    async def prepare(start: int, end: int) -> None:
        await fetch_span(Path(config.model_dir), dht, channels, model_name, start, end, me=dht.peer_id,
                         max_block_bytes=4 * largest + (1 << 20))

    return prepare


def check_local_shards(config: NodeConfig, block_range: tuple[int, int] | None, total_blocks: int) -> None:
    """A folder with only some blocks' shards (not a hub snapshot, which downloads what it lacks) serves
    only those: it needs --blocks, within them."""
    if HubSnapshot.of(config.model_dir) is not None or is_gguf_folder(config.model_dir):
        return
    try:
        held = local_blocks(config.model_dir, total_blocks)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if len(held) == total_blocks:
        return
    if not held:
        raise ConfigError(f"{config.model_dir} holds no block's weights (no model.safetensors, nor the shards its "
                          f"model.safetensors.index.json names for any block): give a folder with the shards of the "
                          f"blocks to serve, or a repository id to download them")
    spans = block_ranges(held)
    if block_range is None:
        raise ConfigError(f"{config.model_dir} holds the shards of blocks {spans} only (of {total_blocks}): "
                          f"give --blocks A:B within them, or a repository id to download what the blocks need")
    lacking = [b for b in range(*block_range) if b not in held]
    if lacking:
        files = [f for f in span_files(config.model_dir, *block_range) if not Path(config.model_dir, f).is_file()]
        raise ConfigError(f"--blocks {config.blocks}: {config.model_dir} lacks {', '.join(files)}, shard file(s) of "
                          f"block(s) {block_ranges(lacking)} (it holds those of blocks {spans})")


async def _serve_with_dht(
    config: NodeConfig,
    stop: PeriodEnds,
    dht: SwarmDHT,
    model_config: ModelConfig,
    dtype: torch.dtype,
    model_name: str,
    loaded: LoadedSpan,
    *,
    metrics: NodeMetrics,
    metrics_address: str | None = None,
    relays: tuple[str, ...] = (),
    certificate: NodeCertificate | None = None,
) -> PeriodEnd:
    """One serving period: serve ``loaded`` until ``stop`` says why to end, then end in order."""
    total_blocks = model_config.num_hidden_layers
    span, throughput, budget = loaded.span, loaded.throughput, loaded.cache_budget
    start, end = span.start, span.end
    bytes_per_token = cache_bytes(model_config, end - start, 1, 1, dtype)
    # what the node holds, not only what --quant asked: a pre-quantized checkpoint's 4-bit layers too
    weight_format = await asyncio.to_thread(announced_weight_format, model_config, config.quant, start, end)
    if config.quant == "none" and is_gguf_folder(config.model_dir):  # which GGUF type the span is stored as
        weight_format = await asyncio.to_thread(gguf_weight_format, config.model_dir, start, end) or weight_format
    # the LoRA adapters' tensors of this period's blocks (small beside the weights: r x (in + out) per layer)
    adapters = await asyncio.to_thread(SpanAdapters, span, config.adapters) if config.adapters else None
    sessions = SessionManager(budget, bytes_per_token)
    executor = ComputeExecutor(inline_max_seconds=config.inline_compute_ms / 1000,
                               batch_wait_seconds=config.batch_wait_ms / 1000)
    executor.on_batch = metrics.batch
    metrics.live = lambda: CacheUse(budget_bytes=sessions.budget_bytes, used_bytes=sessions.used_bytes,
                                    free_tokens=sessions.free_tokens, sessions=len(sessions),
                                    queued_steps=executor.queue_length)
    identity = NodeIdentity(
        model=model_name,
        dtype=config.dtype,
        peer_id=dht.peer_id,
        throughput=throughput,
        software_version=software_version(),
        quant=weight_format,
    )
    service = NodeService(
        span,
        identity,
        sessions,
        executor,
        max_batch_size=config.max_batch_size,
        max_session_length=config.max_session_length,
        session_idle_timeout=config.session_idle_timeout,
        metrics=metrics,
        peer_limits=PeerLimits(max_sessions=config.max_sessions_per_peer, rate=config.max_requests_per_peer),
        handoff_targets=HandoffTargets(lambda block: dht.get_servers(model_name, block, block + 1)),
        corrupt_outputs=os.environ.get("HOMESWARM_FAULT") == "corrupt",
        weight_uploads=WeightUploader(config.model_dir, model_name, rate=config.upload_rate(),
                                      busy=lambda: executor.queue_length > 0,
                                      corrupt=os.environ.get("HOMESWARM_FAULT") == "corrupt-weights"),
        adapters=adapters,
    )
    service.peers.forwarder = partial(asyncio.to_thread, forwarder_address, dht)  # hand-off to relayed nodes
    server = grpc.aio.server(options=SERVER_OPTIONS)
    add_node_service(service, server)
    reflection.enable_server_reflection(
        (node_pb2.DESCRIPTOR.services_by_name["Node"].full_name, reflection.SERVICE_NAME), server
    )
    if certificate is None:
        logger.warning("--insecure: serving gRPC in plaintext; anyone on the path can read and change activations")
        port = server.add_insecure_port(f"{config.host}:{config.port}")
    else:
        port = server.add_secure_port(f"{config.host}:{config.port}", certificate.server_credentials())
    if port == 0:
        raise ConfigError(f"could not bind the gRPC service to {config.host}:{config.port}")
    await server.start()
    address = config.public_address or f"{config.host}:{port}"
    if relays:  # unreachable: clients come through libp2p streams from the relays
        await asyncio.to_thread(serve_grpc, dht, config.host, port)

    announced_cert = certificate.cert_pem if certificate is not None else ""
    if certificate is not None and os.environ.get("HOMESWARM_FAULT") == "wrong-cert":
        announced_cert = NodeCertificate().cert_pem  # announces one certificate and presents another
    digests = await asyncio.to_thread(block_digests, config.model_dir)
    weights = span_digest(digests, start, end) or ""
    identity.block_digests = tuple(digests[b] for b in range(start, end)) if weights else ()  # for peers' fetches

    async def offer_client_files() -> None:  # hashing a large head takes seconds: serving does not wait for it
        identity.file_digests = await asyncio.to_thread(service.weight_uploads.file_digests)

    client_files = asyncio.create_task(offer_client_files()) if config.upload_rate() > 0 else None

    def make_record(state: ServerState) -> ServerRecord:
        return ServerRecord(
            peer_id=PeerId(dht.peer_id),
            address=address,
            model=model_name,
            start=start,
            end=end,
            state=state,
            protocol_version=PROTOCOL_VERSION,
            dtype=config.dtype,
            throughput=throughput,
            cache_tokens_left=sessions.free_tokens,
            queue=executor.queue_length,
            public_name=config.public_name,
            quant=weight_format,
            relays=relays,
            weights=weights,
            tls_cert=announced_cert,
            adapters=adapters.names if adapters is not None else (),
        )

    announcer = Announcer(dht, make_record, total_blocks, config.announce_ttl)
    await announcer.announce(ServerState.ONLINE)
    refresher = asyncio.create_task(announcer.run())
    maddrs = dht.visible_maddrs()
    if config.ready_file:
        if announced_cert:  # beside the ready file (whose keys the interface contract fixes): PATH.pem
            write_certificate(config.ready_file, announced_cert)
        write_ready_file(
            config.ready_file,
            {
                "peer_id": dht.peer_id,
                "dht_maddrs": maddrs,
                "address": address,
                "model": model_name,
                "blocks": [start, end],
                # only with --metrics-port: where it serves (the port may have been 0)
                **({"metrics_address": metrics_address} if metrics_address else {}),
            },
        )
    logger.info(
        "serving blocks %s of %s at %s (%.0f steps/s per block, KV cache limit %d tokens: none is allocated "
        "until sessions open)",
        span_text(start, end), model_name, address, throughput, sessions.free_tokens,
    )
    if not relays:  # a relayed node's own addresses cannot be dialled: others join through its relays
        logger.info("others join with: join-swarm MODEL_DIR --initial-peers %s", maddrs[0] if maddrs else "?")

    period_end = await stop.wait()
    logger.info("%s: announcing %s, %d open session(s)", period_end.why, period_end.state.value, len(sessions))
    sessions.draining = True
    sessions.drain_message = period_end.refusal
    if service.weight_uploads is not None:  # at once, not after the sessions' grace: the owner is back, or we stop
        service.weight_uploads.stop(period_end.why)
    if client_files is not None:
        client_files.cancel()
    refresher.cancel()
    try:
        await asyncio.wait_for(announcer.announce(period_end.state), timeout=5)
    except Exception as e:
        logger.warning("could not announce %s: %s", period_end.state.value, e)
    deadline = time.monotonic() + period_end.grace
    while len(sessions) and time.monotonic() < deadline:
        service.sessions_changed.clear()
        try:
            await asyncio.wait_for(service.sessions_changed.wait(), deadline - time.monotonic())
        except asyncio.TimeoutError:
            break
    if len(sessions):
        logger.info("closing %d session(s) still open after the grace period", len(sessions))
    await server.stop(grace=0.5)
    await service.peers.close()
    metrics.live = None
    announcer.close()
    executor.shutdown()
    logger.info("stopped serving blocks %s", span_text(start, end))
    return period_end


def setup_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("HOMESWARM_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("hivemind", "grpc"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def _run(config: NodeConfig) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if config.compute_threads > 0:
        torch.set_num_threads(config.compute_threads)
    if config.max_threads > 0:
        torch.set_num_threads(min(torch.get_num_threads(), config.max_threads))
        with contextlib.suppress(RuntimeError):  # settable only before torch's first parallel work
            torch.set_num_interop_threads(min(torch.get_num_interop_threads(), config.max_threads))
    return await serve(config, stop)


def main(argv: Sequence[str] | None = None) -> None:
    run(parse_args(argv))


def run(config: NodeConfig) -> None:
    """Run the node of a checked config (``node.preflight.parse_args``) until it stops; exit with its code."""
    setup_logging()
    fault = os.environ.get("HOMESWARM_FAULT", "")
    if fault not in ("", "corrupt", "wrong-cert", "corrupt-weights"):
        print(f"join-swarm: error: HOMESWARM_FAULT must be 'corrupt', 'wrong-cert', 'corrupt-weights' or unset, "
              f"got {fault!r}", file=sys.stderr)
        sys.exit(2)
    if fault == "corrupt-weights":
        logger.warning("HOMESWARM_FAULT=corrupt-weights: THIS NODE SENDS WRONG TENSOR BYTES TO PEERS FETCHING "
                       "WEIGHTS ON PURPOSE (for tests); their digest checks ban it")
    if fault == "wrong-cert":
        logger.warning("HOMESWARM_FAULT=wrong-cert: THIS NODE ANNOUNCES A TLS CERTIFICATE OTHER THAN THE ONE IT "
                       "PRESENTS ON PURPOSE (for tests); every peer refuses it")
    if fault == "corrupt":
        logger.warning("HOMESWARM_FAULT=corrupt: THIS NODE ADDS NOISE TO EVERY OUTPUT ON PURPOSE (a faulty node "
                       "for tests); clients that check steps will ban it")
    install_uvloop()
    try:
        code = asyncio.run(_run(config))
    except ConfigError as e:
        print(f"join-swarm: error: {e}", file=sys.stderr)
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    main()
