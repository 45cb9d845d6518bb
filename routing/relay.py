"""gRPC over libp2p streams, for nodes that cannot be dialled, and the reachability check's dial-back.

A node behind NAT keeps outbound libp2p connections (through the p2pd that the DHT already runs) and
holds reservations on circuit relays (reachable peers: every node's and ``homeswarm dht``'s p2pd offers
relay service). Three pieces run inside the DHT process, on its event loop, beside hivemind's DHT:

- on the relayed node, a stream handler (``GRPC_PROTOCOL``) that splices each incoming libp2p stream
  onto a TCP connection to the node's own gRPC port;
- on whoever dials it (a client, or a node handing off), a loopback TCP listener per relayed peer that
  opens one libp2p stream per accepted connection; a gRPC channel dials ``127.0.0.1:PORT`` and sees a
  plain TCP byte stream, so no gRPC code above the channel changes;
- on reachable peers, a handler (``REACHABILITY_PROTOCOL``) that dials an address back for a peer
  that wants to know whether others can reach it: it connects and reads a nonce that only the asking
  peer's listener sends, so a different service at that address does not count.

A stream that cannot be opened (relay gone, reservation refused, peer gone) closes the TCP connection
at once: the gRPC call fails with UNAVAILABLE and the client fails over as for a dead node. After a
hole punch (DCUtR) libp2p opens new streams on the direct connection; open ones stay on the relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import Sequence
from functools import partial
from typing import Any

from homeswarm.routing.dht import SwarmDHT
from homeswarm.routing.records import is_valid_address

logger = logging.getLogger(__name__)

GRPC_PROTOCOL = "/homeswarm/grpc/1"
REACHABILITY_PROTOCOL = "/homeswarm/reachability/1"
DIAL_BACK_TIMEOUT = 3.0  # a helper's TCP dial of the address to check (a dropped SYN waits all of it)
NONCE_TIMEOUT = 10.0  # then reading the nonce: connected already, so only a loaded machine is slow here
_CHUNK = 1 << 16
_MAX_REQUEST = 1024
_NONCE_RE = re.compile(r"[0-9a-f]{32}")
_P2P_CODE = b"\xa5\x03"  # multiaddr protocol codes as varints: p2p (421), p2p-circuit (290)
_CIRCUIT_CODE = b"\xa2\x02"

# state of the DHT process (these functions run there, through SwarmDHT.call)
_grpc_target: tuple[str, int] | None = None
_grpc_handler_added = False
_forwarders: dict[str, tuple[asyncio.AbstractServer, list[str]]] = {}
_paths: dict[str, str] = {}  # peer id -> the libp2p address its last stream went through
_dial_backs = asyncio.Semaphore(8)  # helpers dial at most this many addresses at once


class RelayError(RuntimeError):
    """A relayed path could not be set up (malformed relay address, DHT process gone)."""


def circuit_maddr(relay: str, multiaddr_class: Any = None) -> Any:
    """``RELAY/p2p-circuit`` as a hivemind ``Multiaddr`` built from bytes.

    hivemind's multiaddr package writes the ``/p2p/`` part as a CID, which p2pd rejects ("length greater
    than remaining number of bytes in buffer"), so the bytes are put together here as go-multiaddr reads
    them: the relay's transport address, then /p2p/ with its multihash, then /p2p-circuit.
    """
    from hivemind.p2p import PeerID
    from hivemind.utils.multiaddr import Multiaddr

    multiaddr_class = multiaddr_class or Multiaddr
    base, sep, relay_id = relay.rpartition("/p2p/")
    if not sep or not base or "/" in relay_id:
        raise RelayError(f"a relay must be a multiaddr ending in /p2p/PEER_ID, got {relay!r}")
    try:
        multihash = PeerID.from_base58(relay_id).to_bytes()
        transport = Multiaddr(base).to_bytes()
    except Exception as e:  # noqa: BLE001 - base58, multihash and multiaddr parsers raise assorted types
        raise RelayError(f"malformed relay address {relay!r}: {e}") from None
    return multiaddr_class(transport + _P2P_CODE + _varint(len(multihash)) + multihash + _CIRCUIT_CODE)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


async def _splice(a_reader: Any, a_writer: Any, b_reader: Any, b_writer: Any) -> None:
    """Copy bytes both ways until either side ends; then close both (gRPC never half-closes)."""

    async def copy(reader: Any, writer: Any) -> None:
        with contextlib.suppress(ConnectionError, OSError, asyncio.IncompleteReadError):
            while data := await reader.read(_CHUNK):
                writer.write(data)
                await writer.drain()

    tasks = [asyncio.ensure_future(copy(a_reader, b_writer)), asyncio.ensure_future(copy(b_reader, a_writer))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        for writer in (a_writer, b_writer):
            with contextlib.suppress(Exception):
                writer.close()


# --- the relayed node: libp2p streams to the local gRPC port ---------------------------------------


async def _handle_grpc_stream(_info: Any, reader: Any, writer: Any) -> None:
    if _grpc_target is None:  # between serving periods
        writer.close()
        return
    try:
        up_reader, up_writer = await asyncio.open_connection(*_grpc_target)
    except OSError as e:
        logger.warning("could not reach the local gRPC service at %s:%d: %s", *_grpc_target, e)
        writer.close()
        return
    await _splice(reader, writer, up_reader, up_writer)


async def _serve_grpc(host: str, port: int, _dht: Any, node: Any) -> None:
    global _grpc_target, _grpc_handler_added
    _grpc_target = None if port == 0 else (host, port)
    if not _grpc_handler_added and _grpc_target is not None:
        await node.protocol.p2p.add_binary_stream_handler(GRPC_PROTOCOL, _handle_grpc_stream)
        _grpc_handler_added = True


def serve_grpc(dht: SwarmDHT, host: str, port: int) -> None:
    """Carry libp2p streams of ``GRPC_PROTOCOL`` to the gRPC service at host:port (port 0: refuse them)."""
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    dht.call(partial(_serve_grpc, host, port), "serving gRPC over libp2p")


# --- the dialling side: loopback listeners that open libp2p streams --------------------------------


async def _open_forwarder(peer_id: str, relays: list[str], _dht: Any, node: Any) -> int:
    from hivemind.p2p import PeerID

    if peer_id in _forwarders:
        server, known = _forwarders[peer_id]
        known[:] = relays  # the newest record's relays serve the next connections
        return server.sockets[0].getsockname()[1]
    try:
        peer = PeerID.from_base58(peer_id)
    except Exception as e:  # noqa: BLE001
        raise RelayError(f"malformed peer id {peer_id!r}: {e}") from None
    p2p = node.protocol.p2p
    known = list(relays)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            # a no-op while connected (directly, after a hole punch, or through a relay)
            await p2p._client.connect(peer, [circuit_maddr(r) for r in known])
            info, p2p_reader, p2p_writer = await p2p.call_binary_stream_handler(peer, GRPC_PROTOCOL)
            _paths[peer_id] = str(info.addr)
        except Exception as e:  # noqa: BLE001 - p2pd's control failures come in several types
            logger.info("no libp2p stream to %s: %s", peer_id[:16], e)
            writer.close()
            return
        await _splice(reader, writer, p2p_reader, p2p_writer)

    for relay in known:
        circuit_maddr(relay)  # malformed relays fail here, at once
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    _forwarders[peer_id] = (server, known)
    return server.sockets[0].getsockname()[1]


def forwarder_address(dht: SwarmDHT, peer_id: str, relays: Sequence[str]) -> str:
    """``127.0.0.1:PORT`` where a TCP connection reaches ``peer_id``'s gRPC service through ``relays``."""
    port = dht.call(partial(_open_forwarder, peer_id, list(relays)), f"opening a relayed path to {peer_id[:16]}")
    return f"127.0.0.1:{port}"


async def _stream_path(peer_id: str, _dht: Any, _node: Any) -> str | None:
    return _paths.get(peer_id)


def stream_path(dht: SwarmDHT, peer_id: str) -> str | None:
    """The libp2p address that the last stream to ``peer_id`` went through (``.../p2p-circuit`` while
    relayed), or None if none was opened."""
    return dht.call(partial(_stream_path, peer_id), "reading a relayed path")


# --- the reachability check --------------------------------------------------------------------------


async def _dial_back(address: str, nonce: str) -> bool:
    host, port = address.rsplit(":", 1)
    async with _dial_backs:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host.strip("[]"), int(port)), DIAL_BACK_TIMEOUT
            )
        except (OSError, asyncio.TimeoutError, ValueError):
            return False
        try:
            got = await asyncio.wait_for(reader.readexactly(len(nonce)), NONCE_TIMEOUT)
            return got == nonce.encode()
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            return False
        finally:
            writer.close()


async def _handle_reachability(_info: Any, reader: Any, writer: Any) -> None:
    try:
        line = await asyncio.wait_for(reader.readline(), DIAL_BACK_TIMEOUT)
        request = json.loads(line[:_MAX_REQUEST])
        address, nonce = request["address"], request["nonce"]
        if not (isinstance(address, str) and is_valid_address(address) and isinstance(nonce, str)
                and _NONCE_RE.fullmatch(nonce)):
            raise ValueError("malformed request")
        reached = await _dial_back(address, nonce)
        writer.write(b"1\n" if reached else b"0\n")
        await writer.drain()
    except Exception as e:  # noqa: BLE001 - a bad request or a peer that went away: answer nothing
        logger.debug("reachability request failed: %s", e)
    finally:
        writer.close()


async def _serve_reachability(_dht: Any, node: Any) -> None:
    await node.protocol.p2p.add_binary_stream_handler(REACHABILITY_PROTOCOL, _handle_reachability)


def serve_reachability_checks(dht: SwarmDHT) -> None:
    """Answer other peers' requests to dial their address back (reachable peers offer this)."""
    dht.call(_serve_reachability, "serving reachability checks")


async def _ask_one(p2p: Any, peer: Any, request: bytes, timeout: float) -> bool | None:
    try:
        _info, reader, writer = await asyncio.wait_for(p2p.call_binary_stream_handler(peer, REACHABILITY_PROTOCOL),
                                                       timeout)
    except Exception:  # noqa: BLE001 - a peer without the handler, or gone
        return None
    try:
        writer.write(request)
        await writer.drain()
        answer = await asyncio.wait_for(reader.readline(), timeout)
    except Exception:  # noqa: BLE001
        return None
    finally:
        writer.close()
    return {b"1\n": True, b"0\n": False}.get(answer)


async def _ask_dial_back(address: str, nonce: str, max_peers: int, _dht: Any, node: Any) -> list[bool | None]:
    peers = list(node.protocol.routing_table.peer_id_to_uid)[:max_peers]
    request = json.dumps({"address": address, "nonce": nonce}).encode() + b"\n"
    timeout = DIAL_BACK_TIMEOUT + NONCE_TIMEOUT + 3
    return list(await asyncio.gather(*(_ask_one(node.protocol.p2p, p, request, timeout) for p in peers)))


def ask_dial_back(dht: SwarmDHT, address: str, nonce: str, max_peers: int = 3) -> list[bool | None]:
    """Ask up to ``max_peers`` peers of the DHT's routing table to dial ``address`` and read ``nonce`` there:
    one answer per peer asked, True (reached), False (could not), None (no answer)."""
    return dht.call(partial(_ask_dial_back, address, nonce, max_peers), "asking peers to dial back")
