"""Adapter names in server records (strictly validated, optional) and the planner's adapter filter."""

from __future__ import annotations

import dataclasses

import pytest

from homeswarm.routing.adapter_routes import AdapterNotServedError, plan_for_adapter, serving_adapter
from homeswarm.routing.planner import MissingBlocksError, QuantizedOnlyError, plan_exact_route
from homeswarm.routing.records import InvalidRecord, PeerId, ServerRecord, ServerState


def rec(peer: str, start: int, end: int, *adapters: str, throughput: float = 100.0, quant: str = "none") -> ServerRecord:
    return ServerRecord(peer_id=PeerId(peer), address=f"{peer}.lan:31337", model="m", start=start, end=end,
                        state=ServerState.ONLINE, protocol_version=1, dtype="float32", throughput=throughput,
                        cache_tokens_left=1_000_000, quant=quant, adapters=adapters)


def spans(hops) -> list[tuple[str, int, int]]:
    return [(h.peer_id, h.start, h.end) for h in hops]


def test_records_carry_adapters_and_old_records_still_parse():
    record = rec("a", 0, 4, "style", "chat-v2")
    data = record.to_dict()
    assert data["adapters"] == ["style", "chat-v2"]
    assert ServerRecord.from_dict(data) == record
    plain = rec("b", 0, 4).to_dict()
    assert "adapters" not in plain  # none served: what a node predating the field sends
    assert ServerRecord.from_dict(plain).adapters == ()


@pytest.mark.parametrize("value", ["style", ["style", "style"], ["bad name"], [""], ["-x"], [7], ["a" * 65],
                                   [f"a{i}" for i in range(65)], None])
def test_malformed_adapter_lists_are_refused(value):
    data = rec("a", 0, 4).to_dict()
    data["adapters"] = value
    with pytest.raises(InvalidRecord, match="field 'adapters' must be a list of at most 64 distinct names"):
        ServerRecord.from_dict(data)


def test_routes_use_only_the_adapters_nodes():
    # the fast node "c" serves every block but not the adapter: an adapter's route avoids it
    records = [rec("a", 0, 2, "style"), rec("b", 2, 4, "style", "other"), rec("c", 0, 4, throughput=1000.0)]
    assert [r.peer_id for r in serving_adapter(records, "style")] == ["a", "b"]
    assert spans(plan_for_adapter(records, 0, 4, adapter="")) == [("c", 0, 4)]
    assert spans(plan_for_adapter(records, 0, 4, adapter="style")) == [("a", 0, 2), ("b", 2, 4)]
    assert spans(plan_for_adapter(records, 2, 4, adapter="other")) == [("b", 2, 4)]


def test_an_adapter_no_node_serves_is_named():
    records = [rec("a", 0, 2, "style"), rec("b", 2, 4, "other"), rec("c", 0, 4)]
    with pytest.raises(AdapterNotServedError) as caught:
        plan_for_adapter(records, 0, 4, adapter="style", model="m")
    assert isinstance(caught.value, MissingBlocksError)  # callers that handle missing blocks handle this
    assert caught.value.blocks == [2, 3]
    assert str(caught.value) == ("no server in the swarm serves LoRA adapter 'style' for block(s) 2:4 of model 'm' "
                                 "(adapters announced: other, style)")
    with pytest.raises(AdapterNotServedError, match=r"'nope' for block\(s\) 0:4 .*\(no node announces any adapter\)"):
        plan_for_adapter([rec("c", 0, 4)], 0, 4, adapter="nope", model="m")


def test_the_adapter_filter_composes_with_exact_routes():
    records = [rec("a", 0, 4, "style", quant="int8"), rec("b", 0, 4, "style"), rec("c", 0, 4, throughput=1000.0)]
    assert spans(plan_for_adapter(records, 0, 4, adapter="style", plan=plan_exact_route)) == [("b", 0, 4)]
    only_quantized = [records[0], records[2]]
    with pytest.raises(AdapterNotServedError):
        plan_for_adapter(only_quantized, 0, 4, adapter="style", plan=plan_exact_route, model="m")
    with pytest.raises(QuantizedOnlyError):  # no adapter: the planner's own error, unchanged
        plan_for_adapter([dataclasses.replace(records[0], adapters=())], 0, 4, adapter="", plan=plan_exact_route,
                         model="m")
