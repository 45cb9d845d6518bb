"""The pure parts of relayed connections: circuit multiaddrs, the reachability verdict, the channel pool."""

from __future__ import annotations

import pytest

from homeswarm.client.transport import ChannelPool
from homeswarm.node.reachability import is_reachable
from homeswarm.routing.relay import RelayError, circuit_maddr

RELAY_ID = "12D3KooWCksSUkqXhXK5QzeYA3SQ8biVy5jJRDtYeuWZmRACVVkt"
RELAY = f"/ip4/10.1.2.3/tcp/4001/p2p/{RELAY_ID}"


def test_circuit_maddr_is_what_go_multiaddr_reads():
    from hivemind.p2p import PeerID
    from hivemind.utils.multiaddr import Multiaddr

    raw = circuit_maddr(RELAY).to_bytes()
    multihash = PeerID.from_base58(RELAY_ID).to_bytes()
    # transport part, then p2p (code 421) with the bare multihash (not a CID), then p2p-circuit (code 290)
    assert raw == Multiaddr("/ip4/10.1.2.3/tcp/4001").to_bytes() + b"\xa5\x03" + bytes([len(multihash)]) \
        + multihash + b"\xa2\x02"
    assert str(circuit_maddr(RELAY)) == RELAY + "/p2p-circuit"


@pytest.mark.parametrize("relay", ["/ip4/10.1.2.3/tcp/4001", f"/p2p/{RELAY_ID}", "/ip4/10.1.2.3/tcp/4001/p2p/nope!",
                                   f"/ip4/999.1.2.3/tcp/4001/p2p/{RELAY_ID}"])
def test_malformed_relays_are_refused(relay):
    with pytest.raises(RelayError):
        circuit_maddr(relay)


@pytest.mark.parametrize(("answers", "reachable"), [
    ([True, False, False], True),  # one peer got through: the others may be firewalled themselves
    ([False, False], False),
    ([False, None, None], False),
    ([None, None], True),  # nobody answered: nothing says the node is unreachable
    ([], True),  # a new swarm: nobody to ask
])
def test_reachability_verdict(answers, reachable):
    assert is_reachable(answers) is reachable


def test_channel_pool_dials_relayed_nodes_through_the_forwarder():
    calls = []

    def forwarder(peer_id, relays):
        calls.append((peer_id, tuple(relays)))
        return "127.0.0.1:9"

    pool = ChannelPool(forwarder)
    try:
        direct = pool.get("10.0.0.5:31330", "QmDirect")
        pool.note_relays("QmHidden", [RELAY])
        relayed = pool.get("192.168.1.20:31330", "QmHidden")
        assert pool.get("192.168.1.20:31330", "QmHidden") is relayed  # one forwarder and channel per peer
        assert calls == [("QmHidden", (RELAY,))]
        assert pool.relays("QmHidden") == (RELAY,) and pool.relays("QmDirect") == ()
        assert direct is not relayed
        pool.note_relays("QmHidden", [])  # became reachable directly: dialled at its address again
        assert pool.get("192.168.1.20:31330", "QmHidden") is not relayed
    finally:
        pool.close()


def test_channel_pool_without_a_forwarder_fails_relayed_nodes_clearly():
    from homeswarm.client.transport import HopFailed

    pool = ChannelPool()
    pool.note_relays("QmHidden", [RELAY])
    with pytest.raises(HopFailed, match="through relays"):
        pool.get("192.168.1.20:31330", "QmHidden")
