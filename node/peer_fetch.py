"""Fetching a span's blocks from the nodes serving them: discovery, transfers, checks (the thin network side).

``discover`` reads the span's records from the DHT and asks each online node announcing a weights digest
for its per-block digests (Info), keeping a node only when their hash is the digest its signed record
announces. ``fetch_blocks`` then runs one transfer per peer at a time (``node.peer_fetch_plan`` decides
which block from which peer and what a failure means): each streams a block file into
``block-NNNNN.safetensors.part`` from the offset the file already has, checks the header as soon as it
is in, and once complete hashes the file; the agreed digest renames it into place, any other discards it
(and bans the peer that sent it). A transfer that breaks or stalls for ``stall_timeout`` leaves its
bytes for the next peer to resume from. A tqdm bar on stderr shows the bytes (on a terminal).

Invariants: a block file is never in place unless its digest is the agreed one; every failure that
leaves blocks unfetched is a ``PeerFetchError`` whose message is one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from tqdm import tqdm

from homeswarm.model.digest import file_block_digest, span_digest
from homeswarm.node.peer_fetch_plan import EARLIER_RUN, FetchPlan, PeerOffer, agreed_digests
from homeswarm.node.peer_folder import DIGESTS_FILE, block_file, held_blocks, trusted_digests, write_index
from homeswarm.node.peers import PeerChannels
from homeswarm.node.weight_stream import MAX_HEADER_BYTES, WeightStreamError, check_header
from homeswarm.protocol import PROTOCOL_VERSION, node_pb2
from homeswarm.routing.dht import SwarmDHT
from homeswarm.routing.records import ServerState

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 18
STALL_TIMEOUT = 30.0
INFO_TIMEOUT = 10.0
PEER_WAIT = 120.0  # how long a joining node looks for peers serving its blocks before it gives up
RETRY_EVERY = 5.0


class PeerFetchError(RuntimeError):
    """Blocks that could not be had from peers (message: one line)."""


@dataclass
class FetchReport:
    blocks: dict[int, str]  # block -> the peer that sent its last bytes
    banned: set[str]
    resumed: list[tuple[int, int, str]]  # (block, offset, peer)


async def discover(dht: SwarmDHT, channels: PeerChannels, model_name: str, start: int, end: int,
                   me: str = "") -> list[PeerOffer]:
    """The online peers serving blocks of [start, end) whose per-block digests hash to their announced one."""
    records = await asyncio.to_thread(dht.get_servers, model_name, start, end)
    records = [r for r in records if r.peer_id != me and r.state == ServerState.ONLINE and r.weights]

    async def ask(record) -> PeerOffer | None:  # noqa: ANN001
        try:
            stub = await channels.stub(record.address, record.peer_id, record.relays, record.tls_cert)
            info = await stub.Info(node_pb2.InfoRequest(protocol_version=PROTOCOL_VERSION), timeout=INFO_TIMEOUT)
        except (grpc.aio.AioRpcError, ValueError, RuntimeError, OSError) as e:
            logger.info("peer %s at %s: no digests (%s)", record.peer_id, record.address, e)
            return None
        digests = dict(enumerate(info.block_digests, start=record.start))
        if len(digests) != record.end - record.start or span_digest(digests, record.start, record.end) != record.weights:
            logger.warning("peer %s: its block digests do not hash to the weights digest it announces; ignored",
                           record.peer_id)
            return None
        return PeerOffer(record.peer_id, record.address, digests, record.tls_cert, tuple(record.relays))

    return [o for o in await asyncio.gather(*(ask(r) for r in records)) if o is not None]


async def fetch_blocks(folder: Path, model_name: str, blocks: list[int], offers: list[PeerOffer],
                       stub_of: Callable[[PeerOffer], Awaitable[object]], *, max_block_bytes: int,
                       stall_timeout: float = STALL_TIMEOUT, chunk_bytes: int = CHUNK_BYTES,
                       trusted: dict[int, str] | None = None, report: FetchReport | None = None) -> FetchReport:
    """Fetch ``blocks`` into ``folder`` from ``offers``, each block against its ``trusted`` digest (a digest list
    given with the config) or else the digest peers agree on. What happened goes into ``report`` (a new one by
    default) as it happens, so a fetch that fails still tells which blocks came from whom and whom it banned."""
    report = report if report is not None else FetchReport({}, set(), [])
    agreed = agreed_digests(offers, blocks) | {b: d for b, d in (trusted or {}).items() if b in blocks}
    if unagreed := [b for b in blocks if b not in agreed]:
        raise PeerFetchError(f"no two peers announce the same weights digest for block(s) "
                             f"{', '.join(map(str, unagreed))} of {model_name} ({len(offers)} peer(s) with digests), "
                             f"and no {DIGESTS_FILE} beside config.json names it")
    partial = {b: p.stat().st_size for b in blocks if (p := folder / f"{block_file(b)}.part").is_file()}
    # bytes from an earlier run came from peers unknown now: a wrong file then bans nobody
    plan = FetchPlan(list(blocks), list(offers), agreed, partial=partial,
                     contributors={b: {EARLIER_RUN} for b in partial}, banned=report.banned,
                     resumed=report.resumed)
    with tqdm(desc=f"blocks {min(blocks)}:{max(blocks) + 1} from peers", unit="B", unit_scale=True,
              disable=None, leave=False) as bar:

        async def worker(offer: PeerOffer) -> None:
            while (block := plan.take(offer)) is not None:
                await _fetch_one(folder, model_name, block, offer, plan, stub_of, bar, max_block_bytes,
                                 stall_timeout, chunk_bytes)
                if block in plan.done:
                    report.blocks[block] = offer.peer_id

        while not plan.complete:
            before = (len(plan.done), len(plan.banned), len(plan.dropped), len(plan.resumed))
            await asyncio.gather(*(worker(o) for o in offers if plan.usable(o.peer_id)))
            if stranded := plan.stranded():
                raise PeerFetchError(f"no peer left to fetch block(s) {', '.join(map(str, stranded))} of "
                                     f"{model_name} from ({len(plan.banned)} banned for wrong bytes, "
                                     f"{len(plan.dropped)} unreachable)")
            if (len(plan.done), len(plan.banned), len(plan.dropped), len(plan.resumed)) == before and not plan.complete:
                raise PeerFetchError(f"fetching blocks of {model_name} from peers made no progress")
    write_index(folder)
    return report


async def _fetch_one(folder: Path, model_name: str, block: int, offer: PeerOffer, plan: FetchPlan,
                     stub_of: Callable[[PeerOffer], Awaitable[object]], bar: tqdm, max_block_bytes: int,
                     stall_timeout: float, chunk_bytes: int) -> None:
    part = folder / f"{block_file(block)}.part"
    offset = part.stat().st_size if part.is_file() else 0
    if offset:
        logger.info("block %d: resuming at byte %d from peer %s", block, offset, offer.peer_id)
    total: int | None = _part_total(part) if offset else None
    call = None
    try:
        if total is not None and offset >= total:  # an earlier run had every byte: only the checks are left
            if offset > total or total > max_block_bytes:
                raise WeightStreamError(f"{part.name} holds {offset} bytes, its header says {total}")
            raise _Complete
        stub = await stub_of(offer)
        call = stub.Weights(node_pb2.WeightsRequest(protocol_version=PROTOCOL_VERSION, model=model_name, block=block,
                                                    offset=offset, chunk_size=chunk_bytes))
        checked = False
        with open(part, "ab") as f:
            stream = call.__aiter__()
            while True:
                try:
                    chunk = await asyncio.wait_for(stream.__anext__(), stall_timeout)
                except StopAsyncIteration:
                    break
                if (chunk.offset != offset or not chunk.data or chunk.total_bytes > max_block_bytes
                        or (total is not None and chunk.total_bytes != total)
                        or offset + len(chunk.data) > chunk.total_bytes):
                    raise WeightStreamError(f"peer {offer.peer_id} sent a chunk at {chunk.offset} of "
                                            f"{chunk.total_bytes} bytes, {len(chunk.data)} long, at {offset}")
                total = chunk.total_bytes
                f.write(chunk.data)
                offset += len(chunk.data)
                plan.received(block, offer.peer_id, len(chunk.data))
                bar.update(len(chunk.data))
                if not checked and offset >= 8 + (length := _header_length(f, part)):
                    with open(part, "rb") as r:
                        check_header(r.read(8 + length), block, total)
                    checked = True
        if total is None or offset != total:
            raise ConnectionError(f"the stream ended at byte {offset} of {total}")
    except _Complete:
        pass
    except WeightStreamError as e:
        _discard(plan, part, block, f"{e}")
        return
    except (grpc.aio.AioRpcError, asyncio.TimeoutError, ConnectionError, ValueError, RuntimeError, OSError) as e:
        what = f"{e.code().name}: {e.details()}" if isinstance(e, grpc.aio.AioRpcError) else str(e) or type(e).__name__
        logger.info("block %d from peer %s broke off at byte %d (%s); another peer resumes it", block, offer.peer_id,
                    offset, what)
        plan.broke(block, offer.peer_id)
        return
    finally:
        if call is not None:
            call.cancel()  # a stream left early (a stall, wrong bytes) must not go on in the background
    try:
        digest = await asyncio.to_thread(file_block_digest, part, block)
    except (ValueError, OSError) as e:  # the header was checked: only a file changed under us gets here
        digest = f"unreadable ({e})"
    if digest != plan.agreed[block]:
        _discard(plan, part, block, "its digest is not the one peers agree on")
        return
    os.replace(part, folder / block_file(block))
    plan.finished(block)
    logger.info("block %d: %d bytes from peer %s, digest checked", block, total, offer.peer_id)


class _Complete(Exception):  # noqa: N818 - a signal, not an error
    """The partial file already holds every byte of its block."""


def _part_total(part: Path) -> int | None:
    """The size a partial block file will have, per its header once that is in and checks out (else None)."""
    try:
        with open(part, "rb") as r:
            prefix = r.read(8)
            if len(prefix) < 8:
                return None
            length = int.from_bytes(prefix, "little")
            if length > MAX_HEADER_BYTES:
                return None
            header = json.loads(r.read(length))
        return 8 + length + max(int(info["data_offsets"][1]) for name, info in header.items() if name != "__metadata__")
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return None  # too short yet, or not a header: the stream's own checks decide


def _header_length(f, part: Path) -> int:  # noqa: ANN001
    """The header's length per the part file's first 8 bytes (huge while fewer are in: nothing to check yet)."""
    f.flush()
    if part.stat().st_size < 8:
        return 1 << 62
    with open(part, "rb") as r:
        return int.from_bytes(r.read(8), "little")


def _discard(plan: FetchPlan, part: Path, block: int, why: str) -> None:
    with contextlib.suppress(OSError):
        part.unlink()
    banned = plan.mismatched(block)
    if banned is not None:
        logger.warning("block %d: peer %s sent wrong bytes (%s); banned, fetching the block elsewhere", block,
                       banned, why)
    else:
        logger.warning("block %d: wrong bytes from several peers of a resumed transfer (%s); fetching it again "
                       "from one", block, why)


async def fetch_span(folder: Path, dht: SwarmDHT, channels: PeerChannels, model_name: str, start: int, end: int, *,
                     me: str, max_block_bytes: int, wait: float = PEER_WAIT,
                     retry_every: float = RETRY_EVERY) -> FetchReport | None:
    """Fetch into ``folder`` the blocks of [start, end) it does not hold yet (None: it held them all). Peers that
    are not there yet (seeders still loading) or blocks left without a source are looked for again every
    ``retry_every`` seconds for up to ``wait``; a peer banned stays banned."""
    held = set(held_blocks(folder))
    blocks = [b for b in range(start, end) if b not in held]
    if not blocks:
        return None
    try:
        trusted = trusted_digests(folder)
    except ValueError as e:
        raise PeerFetchError(str(e)) from None
    merged = FetchReport({}, set(), [])
    deadline = time.monotonic() + wait
    while True:
        offers = [o for o in await discover(dht, channels, model_name, start, end, me) if o.peer_id not in merged.banned]
        todo = [b for b in blocks if b not in set(held_blocks(folder))]
        logger.info("fetching block(s) %s of %s from peers (%d serve them)", ", ".join(map(str, todo)), model_name,
                    len(offers))
        try:
            await fetch_blocks(folder, model_name, todo, offers,
                               lambda o: channels.stub(o.address, o.peer_id, o.relays, o.tls_cert),
                               max_block_bytes=max_block_bytes, trusted=trusted, report=merged)
        except PeerFetchError as e:
            if time.monotonic() + retry_every > deadline:
                raise
            logger.warning("%s; looking for peers again in %.0f s", e, retry_every)
            await asyncio.sleep(retry_every)
            continue
        break
    logger.info("fetched block(s) %s from %d peer(s)%s", ", ".join(map(str, blocks)), len(set(merged.blocks.values())),
                f"; banned {', '.join(sorted(merged.banned))}" if merged.banned else "")
    return merged
