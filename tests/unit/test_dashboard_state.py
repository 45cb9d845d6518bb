"""build_state and its JSON: coverage, health and the weakest block from records and probes (pure)."""

from __future__ import annotations

import json

from homeswarm.dashboard.state import Probe, RefreshStatus, SwarmState, build_state, state_json
from homeswarm.routing.records import PeerId, ServerRecord, ServerState

NOW = 1_800_000_000.0
ISSUE_SERVER_KEYS = {"peer_id", "public_name", "blocks", "state", "throughput", "cache_tokens_left", "version",
                     "reachable", "rtt_ms"}
ISSUE_MODEL_KEYS = {"name", "num_blocks", "healthy", "coverage", "servers"}


def record(peer: str, start: int, end: int, *, state: ServerState = ServerState.ONLINE, throughput: float = 10.0,
           name: str = "", model: str = "m", quant: str = "none") -> ServerRecord:
    return ServerRecord(peer_id=PeerId(peer), address=f"10.0.0.{len(peer)}:5000", model=model, start=start, end=end,
                        state=state, protocol_version=1, dtype="float32", throughput=throughput,
                        cache_tokens_left=1000, public_name=name, quant=quant)


UP = Probe(reachable=True, rtt_ms=1.5, version="0.1.0", active_sessions=2, uptime_seconds=60.0,
           counters={"forward_passes": 7})
DOWN = Probe(reachable=False, error="UNAVAILABLE: connection refused")


def test_coverage_counts_online_servers_that_answer():
    records = [record("a", 0, 2), record("b", 1, 4), record("c", 2, 4, state=ServerState.JOINING),
               record("d", 3, 4, state=ServerState.OFFLINE), record("e", 0, 4)]
    probes = {PeerId("a"): UP, PeerId("b"): UP, PeerId("c"): UP, PeerId("d"): UP, PeerId("e"): DOWN}
    state = build_state({"m": 4}, {"m": records}, probes, now=NOW)
    (model,) = state.models
    assert model.coverage == (1, 2, 1, 1)
    assert model.healthy and model.covered_blocks == 4 and model.online_servers == 2
    assert model.block_throughput == (10.0, 20.0, 10.0, 10.0)
    assert model.weakest_throughput == 10.0
    assert state.updated == NOW


def test_a_block_without_a_server_that_counts_breaks_the_model():
    records = [record("a", 0, 2), record("b", 2, 4)]
    state = build_state({"m": 4}, {"m": records}, {PeerId("a"): UP, PeerId("b"): DOWN}, now=NOW)
    model = state.model("m")
    assert model is not None
    assert model.coverage == (1, 1, 0, 0) and not model.healthy
    assert model.weakest_throughput == 0.0 and model.covered_blocks == 2


def test_a_model_with_no_servers_is_broken_and_a_server_without_a_probe_is_down():
    state = build_state({"empty": 3, "m": 2}, {"m": [record("a", 0, 2)]}, {}, now=NOW)
    assert [m.name for m in state.models] == ["empty", "m"]  # sorted by name
    empty, m = state.models
    assert empty.coverage == (0, 0, 0) and not empty.healthy and empty.servers == ()
    assert not m.healthy and m.servers[0].probe.error == "not probed"


def test_spans_past_the_model_are_clipped_and_servers_sorted_along_the_blocks():
    records = [record("z", 2, 9, name="late"), record("y", 0, 2, name="early")]
    model = build_state({"m": 4}, {"m": records}, {PeerId("z"): UP, PeerId("y"): UP}, now=NOW).models[0]
    assert model.coverage == (1, 1, 1, 1)
    assert [s.public_name for s in model.servers] == ["early", "late"]


def test_state_json_keeps_the_contract_fields():
    records = [record("a", 0, 2, name="alice", quant="int8"), record("b", 2, 4)]
    state = build_state({"m": 4}, {"m": records}, {PeerId("a"): UP, PeerId("b"): DOWN}, now=NOW)
    data = state_json(state, RefreshStatus(ok=True, last_attempt=NOW, dht_peers=3), now=NOW + 2)
    json.dumps(data, allow_nan=False)  # what the HTTP response does
    assert data["updated"] == NOW and data["age_seconds"] == 2
    assert data["dht"] == {"ok": True, "peers": 3, "error": None, "last_attempt": NOW}
    (model,) = data["models"]
    assert ISSUE_MODEL_KEYS <= set(model)
    assert model["coverage"] == [1, 1, 0, 0] and model["healthy"] is False and model["num_blocks"] == 4
    alice, b = model["servers"]
    assert ISSUE_SERVER_KEYS <= set(alice)
    assert alice == {**alice, "peer_id": "a", "public_name": "alice", "blocks": [0, 2], "state": "online",
                     "throughput": 10.0, "cache_tokens_left": 1000, "version": "0.1.0", "reachable": True,
                     "rtt_ms": 1.5, "quant": "int8", "connection": "direct", "uptime_seconds": 60.0,
                     "active_sessions": 2}
    assert b["public_name"] is None and b["reachable"] is False and b["rtt_ms"] is None
    assert b["connection"] is None and b["error"].startswith("UNAVAILABLE")


def test_empty_state_json():
    data = state_json(SwarmState(updated=0.0), RefreshStatus(), now=NOW)
    assert data["updated"] == 0.0 and data["models"] == [] and data["age_seconds"] is None
    assert data["dht"]["ok"] is False and data["dht"]["last_attempt"] is None
