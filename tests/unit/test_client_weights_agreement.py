"""Weights checks of a client whose folder lacks some blocks' shards: spans it holds are checked against its
own digests, the others by the nodes of each span against each other (a strict majority); said once in
the log. A fake DHT, no sockets."""

from __future__ import annotations

import logging

from homeswarm.client.config import ClientConfig
from homeswarm.client.route import RouteManager, agreed_digests
from homeswarm.model.digest import span_digest
from homeswarm.routing.records import PeerId, ServerRecord, ServerState


def rec(peer: str, start: int, end: int, weights: str, state: ServerState = ServerState.ONLINE) -> ServerRecord:
    return ServerRecord(peer_id=PeerId(peer), address=f"{peer}:1", model="m", start=start, end=end, state=state,
                        protocol_version=1, dtype="float32", throughput=10.0, cache_tokens_left=100, weights=weights)


class FakeDHT:
    def __init__(self, records: list[ServerRecord]):
        self.records = records

    def get_servers(self, model: str, start: int, end: int) -> list[ServerRecord]:
        return self.records


def peers(records: list[ServerRecord]) -> list[str]:
    return sorted(r.peer_id for r in records)


def test_agreed_digests_need_a_strict_majority_of_online_announcing_nodes():
    records = [rec("a", 0, 2, "x"), rec("b", 0, 2, "x"), rec("c", 0, 2, "y"),
               rec("d", 2, 4, "x"), rec("e", 2, 4, "y"),  # a tie
               rec("f", 4, 6, "z"), rec("g", 4, 6, ""), rec("h", 4, 6, "w", ServerState.OFFLINE)]
    assert agreed_digests(records) == {(0, 2): "x", (4, 6): "z"}


def test_a_client_without_block_shards_refuses_the_odd_node_out_and_says_why(caplog):
    records = [rec("a", 0, 2, "x"), rec("b", 0, 2, "x"), rec("odd", 0, 2, "y"), rec("c", 2, 4, "v"),
               rec("mute", 0, 2, "")]
    with caplog.at_level(logging.INFO, logger="homeswarm.client.route"):
        routes = RouteManager(FakeDHT(records), pool=None, model="m", num_blocks=4,  # type: ignore[arg-type]
                              config=ClientConfig(), weights={})
        assert peers(routes.records()) == ["a", "b", "c", "mute"]
        routes.records(refresh=True)
    said = [r.getMessage() for r in caplog.records]
    assert sum("holds no block's tensors" in m for m in said) == 1
    assert sum("refusing node odd:1" in m and "most nodes of these blocks" in m for m in said) == 1
    assert routes.refused == {PeerId("odd"): "y"}


def test_own_digests_win_over_a_majority_where_the_folder_has_the_blocks(caplog):
    own = {0: "d0", 1: "d1"}  # the client's folder holds blocks 0 and 1 in full
    good = span_digest(own, 0, 2)
    records = [rec("fake1", 0, 2, "bad"), rec("fake2", 0, 2, "bad"), rec("honest", 0, 2, good),
               rec("p", 2, 4, "x"), rec("q", 2, 4, "y")]  # blocks 2..3: a tie, all kept with a warning
    with caplog.at_level(logging.INFO, logger="homeswarm.client.route"):
        routes = RouteManager(FakeDHT(records), pool=None, model="m", num_blocks=4,  # type: ignore[arg-type]
                              config=ClientConfig(), weights=own)
        assert peers(routes.records()) == ["honest", "p", "q"]
    said = [r.getMessage() for r in caplog.records]
    assert any("holds the tensors of 2 of its 4 blocks" in m for m in said)
    assert sum("blocks 2:4 announce 2 different weights, none by a majority" in m for m in said) == 1


def test_no_check_when_disabled():
    records = [rec("a", 0, 2, "x"), rec("odd", 0, 2, "y"), rec("b", 0, 2, "x")]
    routes = RouteManager(FakeDHT(records), pool=None, model="m", num_blocks=2,  # type: ignore[arg-type]
                          config=ClientConfig(), weights=None)
    assert peers(routes.records()) == ["a", "b", "odd"]
