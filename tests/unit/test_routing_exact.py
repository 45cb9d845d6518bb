"""Exact routes: a client that demands the checkpoint's own weights plans through unquantized nodes only,
and is told which blocks only quantized nodes serve. Plain records in, hops or errors out; then the
RouteManager with a fake DHT, to show ClientConfig(exact=True) reaches the planner."""

from __future__ import annotations

import dataclasses

import pytest

from homeswarm.client.config import ClientConfig
from homeswarm.client.route import RouteManager
from homeswarm.routing.planner import MissingBlocksError, QuantizedOnlyError, plan_exact_route, plan_route
from homeswarm.routing.records import PeerId, ServerRecord, ServerState


def rec(peer: str, start: int, end: int, quant: str = "none", *, throughput: float = 100.0,
        state: ServerState = ServerState.ONLINE) -> ServerRecord:  # fmt: skip
    return ServerRecord(peer_id=PeerId(peer), address=f"{peer}.lan:31337", model="m", start=start, end=end,
                        state=state, protocol_version=1, dtype="float32", throughput=throughput,
                        cache_tokens_left=10**6, quant=quant)


def spans(hops) -> list[tuple[str, int, int]]:  # noqa: ANN001
    return [(h.peer_id, h.start, h.end) for h in hops]


def test_exact_routes_avoid_quantized_nodes_however_fast():
    records = [rec("fast-int4", 0, 8, "int4", throughput=1000), rec("a", 0, 4), rec("b", 4, 8), rec("q8", 2, 6, "int8")]
    assert spans(plan_route(records, 0, 8)) == [("fast-int4", 0, 8)]  # by default any node will do
    assert spans(plan_exact_route(records, 0, 8)) == [("a", 0, 4), ("b", 4, 8)]


def test_blocks_served_only_by_quantized_nodes_are_named():
    records = [rec("a", 0, 3), rec("q4", 2, 8, "int4"), rec("q8", 5, 8, "int8"), rec("b", 6, 8)]
    with pytest.raises(QuantizedOnlyError) as caught:
        plan_exact_route(records, 0, 8, model="llama")
    error = caught.value
    assert isinstance(error, MissingBlocksError)  # callers that handle missing blocks handle this too
    assert error.blocks == error.quantized_blocks == [3, 4, 5]
    message = str(error)
    assert "block(s) 3:6 of model 'llama' are served only by quantized nodes (int4, int8)" in message
    assert "--exact" in message and "\n" not in message


def test_blocks_nobody_serves_are_named_beside_the_quantized_ones():
    records = [rec("a", 0, 2), rec("q", 2, 4, "int8")]
    with pytest.raises(QuantizedOnlyError) as caught:
        plan_exact_route(records, 0, 6, model="m")
    assert caught.value.blocks == [2, 3, 4, 5] and caught.value.quantized_blocks == [2, 3]
    assert "no server at all serves block(s) 4:6" in str(caught.value)


def test_without_quantized_nodes_the_error_is_the_usual_one():
    with pytest.raises(MissingBlocksError) as caught:
        plan_exact_route([rec("a", 0, 2)], 0, 4, model="m")
    assert type(caught.value) is MissingBlocksError and caught.value.blocks == [2, 3]


def test_banned_and_offline_nodes_count_as_absent():
    records = [rec("a", 0, 4), rec("q", 0, 4, "int4"), rec("gone", 0, 4, "int8", state=ServerState.OFFLINE)]
    with pytest.raises(QuantizedOnlyError, match=r"\(int4\)"):
        plan_exact_route(records, 0, 4, banned={PeerId("a"): 10.0}, now=5.0)
    assert spans(plan_exact_route(records, 0, 4, banned={PeerId("a"): 10.0}, now=11.0)) == [("a", 0, 4)]
    with pytest.raises(MissingBlocksError) as caught:
        plan_exact_route(records, 0, 4, banned={PeerId("a"), PeerId("q")})
    assert type(caught.value) is MissingBlocksError


class FakeDHT:
    def __init__(self, records: list[ServerRecord]):
        self.records = records

    def get_servers(self, model: str, start: int, end: int) -> list[ServerRecord]:
        return self.records


@pytest.mark.parametrize("exact", [False, True])
def test_the_route_manager_plans_exactly_when_asked(exact):
    records = [rec("q", 0, 4, "int8", throughput=1000), rec("a", 0, 4)]
    routes = RouteManager(FakeDHT(records), pool=None, model="m", num_blocks=4,  # type: ignore[arg-type]
                          config=dataclasses.replace(ClientConfig(), exact=exact))
    routes.rtts.update({PeerId("q"): 0.001, PeerId("a"): 0.001})  # known: nothing to ping
    assert spans(routes.plan(0, 4)) == [("a" if exact else "q", 0, 4)]
    records.pop()
    if exact:
        with pytest.raises(QuantizedOnlyError):
            routes.plan(0, 4)
    else:
        assert spans(routes.plan(0, 4)) == [("q", 0, 4)]
