"""Signed records, checked by the validators every DHT peer runs (no network): a node's own signed record
passes; unsigned, re-signed, misnamed or malformed records in its name do not, and each drop logs a line."""

from __future__ import annotations

import dataclasses
import logging

import pytest
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import CompositeValidator, DHTRecord
from hivemind.utils import MSGPackSerializer

from homeswarm.routing.dht import MODELS_KEY, block_key
from homeswarm.routing.records import PeerId, ServerRecord, ServerState
from homeswarm.routing.signing import NodeKey, owner_of, peer_id_of


@pytest.fixture(scope="module")
def keys() -> tuple[NodeKey, NodeKey]:
    return NodeKey(), NodeKey()


def server_record(peer_id: str, address: str = "10.0.0.1:31330") -> dict:
    return ServerRecord(peer_id=PeerId(peer_id), address=address, model="m", start=0, end=2,
                        state=ServerState.ONLINE, protocol_version=1, dtype="float32", throughput=5.0,
                        cache_tokens_left=100).to_dict()


def stored(signer: NodeKey, subkey: str, value: object, key: str = block_key("m", 0)) -> DHTRecord:
    """The record as ``signer``'s DHT peer would send it (signed where the subkey names its key)."""
    record = DHTRecord(DHTID.generate(source=key).to_bytes(), MSGPackSerializer.dumps(subkey),
                       MSGPackSerializer.dumps(value), 1e12)
    return dataclasses.replace(record, value=CompositeValidator(signer.validators(MODELS_KEY)).sign_value(record))


def accepts(reader: NodeKey, record: DHTRecord) -> bool:
    return CompositeValidator(reader.validators(MODELS_KEY)).validate(record)


def test_peer_id_is_the_keys(keys):
    victim, _ = keys
    assert peer_id_of(victim.marker[len("[owner:"):-1]) == victim.peer_id
    assert owner_of(victim.subkey()) == victim.peer_id
    assert owner_of(victim.peer_id) is None


def test_own_signed_record_passes(keys):
    victim, other = keys
    assert accepts(other, stored(victim, victim.subkey(), server_record(victim.peer_id)))


def test_forgeries_are_dropped_with_one_log_line_each(keys, caplog):
    victim, attacker = keys
    forged = server_record(victim.peer_id, address="6.6.6.6:1")
    forgeries = {
        "unsigned, under the victim's subkey": stored(attacker, victim.subkey(), forged),
        "under the old plain subkey": stored(attacker, victim.peer_id, forged),
        "signed by the attacker, in the victim's name": stored(attacker, f"{victim.peer_id}{attacker.marker}", forged),
        "the attacker's record under the victim's name": stored(
            attacker, f"{victim.peer_id}{attacker.marker}", server_record(attacker.peer_id)),
        "the victim's signature on other bytes": dataclasses.replace(
            stored(victim, victim.subkey(), server_record(victim.peer_id)),
            value=stored(victim, victim.subkey(), server_record(victim.peer_id)).value.replace(
                b"10.0.0.1", b"6.6.6.6")),
        "malformed record, signed": stored(attacker, attacker.subkey(), {"peer_id": attacker.peer_id}),
        "not a record at all": stored(attacker, attacker.subkey(), [1, 2, 3]),
        "bad model index entry": stored(attacker, "m", {"num_blocks": -1}, key=MODELS_KEY),
    }
    for name, record in forgeries.items():
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="homeswarm.routing.signing"):
            assert not accepts(victim, record), name
        drops = [r.message for r in caplog.records if r.name == "homeswarm.routing.signing"]
        assert len(drops) == 1 and drops[0].startswith("dropping a DHT record"), (name, drops)


def test_model_index_entry_passes(keys):
    victim, other = keys
    assert accepts(other, stored(victim, "m", {"num_blocks": 12}, key=MODELS_KEY))
