"""Whether other peers can dial this node's gRPC address, and the DHT peer that follows from the answer.

``--reachability auto`` (the default) starts the DHT peer as before, then asks up to three peers of the
swarm to dial the address the node will announce and read a nonce that a short-lived listener on the
gRPC bind address sends (``homeswarm.routing.relay``). One "reached" makes the node direct; otherwise,
if any peer answered "could not reach", the node is relayed: its DHT peer is restarted to take relay
reservations on the ``--initial-peers`` and the gRPC service is carried over libp2p streams. Without
answers (a new swarm, or peers that predate the check) the node stays direct and says so. ``direct``
and ``relayed`` skip the check.

Direct nodes answer such checks for others and relay for relayed nodes (``SwarmDHT.create``'s
``relay_service``: with p2pd's own relay limits a relayed session would break within seconds). A node that can reach no peer at all fails at the DHT's
start (``join-swarm`` exits with code 2 and says which peers it tried).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets

from homeswarm.node.config import ConfigError, NodeConfig
from homeswarm.routing.dht import SwarmDHT
from homeswarm.routing.preflight import explain_dht_error
from homeswarm.routing.relay import ask_dial_back, serve_reachability_checks
from homeswarm.routing.signing import NodeKey

logger = logging.getLogger(__name__)


async def start_dht(config: NodeConfig, key: NodeKey) -> tuple[SwarmDHT, tuple[str, ...], NodeConfig]:
    """(started DHT peer with ``key`` as its identity, relays to announce (empty: direct), config with
    the checked gRPC port pinned)."""
    relays: tuple[str, ...] = ()
    if config.reachability == "relayed":
        relays = config.initial_peers
    dht = await _create_dht(config, key, relays)
    if config.reachability == "auto" and config.initial_peers:
        try:
            reachable, config = await _check(config, dht)
        except BaseException:
            dht.shutdown()
            raise
        if not reachable:
            logger.info("no peer could dial this node; restarting its DHT peer to be reached through relays %s",
                        ", ".join(config.initial_peers))
            dht.shutdown()
            relays = config.initial_peers
            dht = await _create_dht(config, key, relays)
    if relays:
        logger.info("reachable through relays: %s", ", ".join(relays))
    else:
        await asyncio.to_thread(serve_reachability_checks, dht)
    return dht, relays, config


async def _create_dht(config: NodeConfig, key: NodeKey, relays: tuple[str, ...]) -> SwarmDHT:
    try:
        return await asyncio.to_thread(
            SwarmDHT.create, config.initial_peers, host=config.host, port=config.dht_port, key=key, relays=relays,
            relay_service=not relays,  # a node others reach relays for those they cannot
        )
    except Exception as e:  # hivemind raises several types for unreachable or malformed peers
        raise ConfigError("could not start or join the DHT: "
                          + explain_dht_error(e, config.initial_peers, config.host, config.dht_port)) from None


async def _check(config: NodeConfig, dht: SwarmDHT) -> tuple[bool, NodeConfig]:
    """(whether a peer reached the gRPC address, config whose port is the one checked)."""
    nonce = secrets.token_hex(16)

    async def send_nonce(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(nonce.encode())
        try:
            await writer.drain()
        finally:
            writer.close()

    try:
        listener = await asyncio.start_server(send_nonce, config.host, config.port)
    except OSError as e:
        raise ConfigError(f"could not bind the gRPC port {config.host}:{config.port}: {e}") from None
    try:
        port = listener.sockets[0].getsockname()[1]
        address = config.public_address or f"{config.host}:{port}"
        answers = await asyncio.to_thread(ask_dial_back, dht, address, nonce)
    finally:
        listener.close()
        await listener.wait_closed()
    config = dataclasses.replace(config, port=port)  # the gRPC service binds the port that was checked
    logger.info("reachability of %s: %d peer(s) reached it, %d could not, %d did not answer",
                address, answers.count(True), answers.count(False), answers.count(None))
    reachable = is_reachable(answers)
    if reachable and True not in answers:
        logger.warning("no peer answered the reachability check; announcing %s as directly reachable", address)
    return reachable, config


def is_reachable(answers: list[bool | None]) -> bool:
    """The verdict of the peers' answers (True: reached, False: could not, None: no answer): one success
    is enough (the others may sit behind firewalls of their own); without any answer, direct."""
    return True in answers or False not in answers
