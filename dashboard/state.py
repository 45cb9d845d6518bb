"""The swarm's state as the dashboard shows it: built from DHT records and probe results, nothing else.

Pure: records, probes and ``now`` in, a frozen ``SwarmState`` out; no clock, socket or DHT here.

A server *counts* for its blocks when its record says online and it did not fail its probe: an online
record of a node that no longer answers is a node clients cannot use either, and it is shown as
"unreachable" (its ``status``), never as online, until its record expires. A model is healthy when
every one of its blocks has at least one server that counts. A block's throughput is the sum of the
throughputs of the servers that count for it; the weakest block's throughput bounds what the whole
model can do. Spans are clipped to the model's blocks (records are validated, but a record may claim
blocks past the model's end).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from homeswarm.routing.records import PeerId, ServerRecord, ServerState

UNREACHABLE = "unreachable"
# the Info counters a probe reports, in the order the page lists them
COUNTER_NAMES = ("steps_from_client", "steps_from_peers", "pushes_sent", "forward_passes", "batched_steps",
                 "inline_steps")


@dataclass(frozen=True)
class Probe:
    """What one call of a node's ``Info`` RPC told (or that it failed)."""

    reachable: bool
    rtt_ms: float | None = None
    version: str = ""  # the node's software version ("" when never reached)
    active_sessions: int | None = None
    uptime_seconds: float | None = None
    counters: Mapping[str, int] = field(default_factory=dict)
    error: str | None = None  # why the probe failed


@dataclass(frozen=True)
class ServerView:
    peer_id: PeerId
    public_name: str | None
    address: str
    start: int
    end: int  # exclusive
    state: ServerState
    throughput: float  # steps per second through one block
    cache_tokens_left: int
    quant: str
    dtype: str
    protocol_version: int
    probe: Probe

    @property
    def counts(self) -> bool:
        """Whether the server counts for its blocks: online and answering."""
        return self.state is ServerState.ONLINE and self.probe.reachable

    @property
    def status(self) -> str:
        """What the page and the metrics call it: its announced state, except that an online server that does
        not answer its probe is "unreachable" (a killed node's record says online until it expires)."""
        if self.state is ServerState.ONLINE and not self.probe.reachable:
            return UNREACHABLE
        return self.state.value

    @property
    def connection(self) -> str | None:
        """Direct when its announced address answered; unknown (None) otherwise: it may be reached by relay."""
        return "direct" if self.probe.reachable else None


@dataclass(frozen=True)
class ModelView:
    name: str
    num_blocks: int
    servers: tuple[ServerView, ...]
    coverage: tuple[int, ...]  # servers that count, per block
    block_throughput: tuple[float, ...]  # their summed throughput, per block

    @property
    def healthy(self) -> bool:
        return self.num_blocks > 0 and min(self.coverage) > 0

    @property
    def covered_blocks(self) -> int:
        return sum(1 for n in self.coverage if n > 0)

    @property
    def online_servers(self) -> int:
        return sum(1 for s in self.servers if s.counts)

    @property
    def weakest_throughput(self) -> float:
        return min(self.block_throughput, default=0.0)


@dataclass(frozen=True)
class SwarmState:
    updated: float  # unix time the state was built; 0.0 before the first look at the swarm
    models: tuple[ModelView, ...] = ()

    def model(self, name: str) -> ModelView | None:
        return next((m for m in self.models if m.name == name), None)


def build_model(name: str, num_blocks: int, records: Sequence[ServerRecord],
                probes: Mapping[PeerId, Probe]) -> ModelView:
    """One model's view; a server without a probe result is taken as not answering."""
    servers = []
    for record in records:
        probe = probes.get(record.peer_id, Probe(reachable=False, error="not probed"))
        servers.append(ServerView(
            peer_id=record.peer_id, public_name=record.public_name or None, address=record.address,
            start=record.start, end=record.end, state=record.state, throughput=record.throughput,
            cache_tokens_left=record.cache_tokens_left, quant=record.quant, dtype=record.dtype,
            protocol_version=record.protocol_version, probe=probe,
        ))
    # the page lists servers along the blocks, so spans read left to right
    servers.sort(key=lambda s: (s.start, s.end, s.public_name or "", s.peer_id))
    coverage = [0] * num_blocks
    throughput = [0.0] * num_blocks
    for server in servers:
        if not server.counts:
            continue
        for block in range(max(0, server.start), min(num_blocks, server.end)):
            coverage[block] += 1
            throughput[block] += server.throughput
    return ModelView(name, num_blocks, tuple(servers), tuple(coverage), tuple(throughput))


def build_state(models: Mapping[str, int], records: Mapping[str, Sequence[ServerRecord]],
                probes: Mapping[PeerId, Probe], now: float) -> SwarmState:
    """``models``: name -> number of blocks (the DHT's model index); ``records``: name -> its servers."""
    views = [build_model(name, num_blocks, records.get(name, ()), probes)
             for name, num_blocks in models.items() if num_blocks > 0]
    return SwarmState(updated=now, models=tuple(sorted(views, key=lambda m: m.name)))


# --- JSON (the /api/v1/state contract: the fields are kept; more may be added) -------------


def server_json(server: ServerView) -> dict[str, Any]:
    probe = server.probe
    return {
        "peer_id": server.peer_id,
        "public_name": server.public_name,
        "blocks": [server.start, server.end],
        "state": server.state.value,  # as announced
        "status": server.status,  # as seen: "unreachable" for an online record that does not answer
        "throughput": server.throughput,
        "cache_tokens_left": server.cache_tokens_left,
        "version": probe.version,
        "reachable": probe.reachable,
        "rtt_ms": probe.rtt_ms,
        "address": server.address,
        "quant": server.quant,
        "dtype": server.dtype,
        "protocol_version": server.protocol_version,
        "connection": server.connection,
        "counts": server.counts,
        "uptime_seconds": probe.uptime_seconds,
        "active_sessions": probe.active_sessions,
        "counters": dict(probe.counters),
        "error": probe.error,
    }


def model_json(model: ModelView) -> dict[str, Any]:
    return {
        "name": model.name,
        "num_blocks": model.num_blocks,
        "healthy": model.healthy,
        "coverage": list(model.coverage),
        "servers": [server_json(s) for s in model.servers],
        "block_throughput": list(model.block_throughput),
        "covered_blocks": model.covered_blocks,
        "online_servers": model.online_servers,
        "weakest_throughput": model.weakest_throughput,
    }


@dataclass(frozen=True)
class RefreshStatus:
    """How the last attempt to read the swarm went; the state shown is the last one that succeeded."""

    ok: bool = False
    last_attempt: float = 0.0  # unix time; 0.0 before the first attempt
    error: str | None = None
    dht_peers: int = 0


def state_json(state: SwarmState, status: RefreshStatus, now: float) -> dict[str, Any]:
    return {
        "updated": state.updated,
        "models": [model_json(m) for m in state.models],
        "age_seconds": now - state.updated if state.updated else None,
        "dht": {"ok": status.ok, "peers": status.dht_peers, "error": status.error,
                "last_attempt": status.last_attempt or None},
    }
