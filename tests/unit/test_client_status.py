"""`homeswarm status`: the report built from records, as JSON data and as a table."""

from __future__ import annotations

import json

from homeswarm.client.status import format_report, swarm_report
from homeswarm.routing.records import PeerId, ServerRecord, ServerState


def rec(peer: str, start: int, end: int, state: ServerState = ServerState.ONLINE, throughput: float = 100.0,
        quant: str = "none", name: str = "") -> ServerRecord:
    return ServerRecord(peer_id=PeerId(peer), address=f"10.0.0.{len(peer)}:5000", model="m", start=start, end=end,
                        state=state, protocol_version=1, dtype="bfloat16", throughput=throughput,
                        cache_tokens_left=4096, public_name=name, quant=quant)


def test_report_per_block_and_per_server():
    records = [rec("peer-a", 0, 4, name="alice"), rec("peer-bb", 4, 8, throughput=50.0, quant="int8"),
               rec("peer-ccc", 4, 8, ServerState.BUSY), rec("peer-dddd", 8, 12, ServerState.JOINING)]
    report = swarm_report({"m": 12}, {"m": records})
    json.dumps(report)  # plain data
    model = report["models"]["m"]
    assert model["num_blocks"] == 12 and model["online_servers"] == 2
    assert model["missing_blocks"] == [8, 9, 10, 11]  # joining and busy nodes serve nothing yet
    assert model["blocks"][5] == {"block": 5, "servers": 1, "throughput": 50.0}
    by_peer = {s["peer_id"]: s for s in model["servers"]}
    assert by_peer["peer-bb"]["quant"] == "int8" and by_peer["peer-ccc"]["state"] == "busy"
    assert by_peer["peer-a"]["blocks"] == [0, 4] and by_peer["peer-a"]["public_name"] == "alice"
    assert set(by_peer["peer-a"]) >= {"address", "throughput", "cache_tokens_left", "dtype", "state"}


def test_text_names_the_missing_blocks_and_every_server():
    records = [rec("peer-a", 0, 4), rec("peer-bb", 4, 8, ServerState.BUSY, quant="int4")]
    text = format_report(swarm_report({"m": 12}, {"m": records}))
    assert "blocks 4:12 served by nobody" in text  # as --blocks 4:12 would fill them
    assert "0:4  online" in text and "4:8  busy" in text and "int4/bfloat16" in text


def test_an_empty_swarm():
    assert format_report(swarm_report({}, {})) == "no model is announced in this swarm"
    report = swarm_report({"m": 3}, {})
    assert report["models"]["m"]["missing_blocks"] == [0, 1, 2]
    assert "served by nobody" in format_report(report)
