"""Forged records over real DHT peers on loopback: an attacker stores records in another node's name
(unsigned under its subkey, under the old plain subkey, signed with the attacker's own key), with a later
expiration so that accepted ones would replace the real record; every other peer refuses them, readers
see the real record only, and the attacker's own correctly signed record goes through."""

from __future__ import annotations

from functools import partial

import pytest

from homeswarm.routing.dht import SwarmDHT, _store_many, block_key, dht_time
from homeswarm.routing.records import PeerId, ServerRecord, ServerState
from homeswarm.routing.signing import NodeKey

pytestmark = pytest.mark.timeout(180)
MODEL = "forged"


def record(peer_id: str, address: str) -> ServerRecord:
    return ServerRecord(peer_id=PeerId(peer_id), address=address, model=MODEL, start=0, end=2,
                        state=ServerState.ONLINE, protocol_version=1, dtype="float32", throughput=5.0,
                        cache_tokens_left=100)


def test_records_in_another_nodes_name_are_rejected():
    dhts: list[SwarmDHT] = []
    try:
        bootstrap = SwarmDHT.create()
        dhts.append(bootstrap)
        peers = bootstrap.visible_maddrs()
        victim = SwarmDHT.create(peers, key=NodeKey())
        dhts.append(victim)
        attacker_key = NodeKey()
        attacker = SwarmDHT.create(peers, key=attacker_key)
        dhts.append(attacker)
        reader = SwarmDHT.create(peers, client_mode=True)
        dhts.append(reader)
        assert victim.peer_id == victim.key.peer_id  # the libp2p identity is the signing key's

        victim.announce(record(victim.peer_id, "127.0.0.1:1111"), 2, dht_time() + 60)
        forged = record(victim.peer_id, "127.0.0.1:6666").to_dict()
        subkeys = [victim.key.subkey(), victim.peer_id, f"{victim.peer_id}{attacker_key.marker}"]
        for subkey in subkeys:  # the attacker's DHT peer sends them to the others, signing where it can
            store = partial(_store_many, [block_key(MODEL, 0), block_key(MODEL, 1)], [forged, forged],
                            [subkey, subkey], dht_time() + 120)
            attacker._wait(attacker._call(store), "storing a forgery")
        with pytest.raises(ValueError, match="own key"):
            attacker.announce(record(victim.peer_id, "127.0.0.1:6666"), 2, dht_time() + 120)
        attacker.announce(record(attacker.peer_id, "127.0.0.1:2222"), 2, dht_time() + 60)

        for peer in (reader, bootstrap, victim):
            found = {r.peer_id: r.address for r in peer.get_servers(MODEL, 0, 2)}
            assert found == {victim.peer_id: "127.0.0.1:1111", attacker.peer_id: "127.0.0.1:2222"}
    finally:
        for dht in reversed(dhts):
            dht.shutdown()
