"""ServerRecord validation: records come from other peers, so every malformed field is rejected."""

from __future__ import annotations

import math

import pytest

from homeswarm.routing.records import QUANT_FORMATS, InvalidRecord, PeerId, ServerRecord, ServerState


def good() -> dict:
    return {
        "peer_id": "QmPeer",
        "address": "192.168.1.20:31337",
        "model": "llama-3-8b",
        "start": 4,
        "end": 12,
        "state": "online",
        "protocol_version": 3,
        "dtype": "bfloat16",
        "throughput": 42.5,
        "cache_tokens_left": 8192,
        "public_name": "alice's pc",
        "queue": 2,
        "quant": "int8",
    }


def test_from_dict_reads_every_field():
    r = ServerRecord.from_dict(good())
    assert r == ServerRecord(
        peer_id=PeerId("QmPeer"),
        address="192.168.1.20:31337",
        model="llama-3-8b",
        start=4,
        end=12,
        state=ServerState.ONLINE,
        protocol_version=3,
        dtype="bfloat16",
        throughput=42.5,
        cache_tokens_left=8192,
        public_name="alice's pc",
        queue=2,
        quant="int8",
    )
    assert r.num_blocks == 8 and not r.exact


def test_round_trip():
    r = ServerRecord.from_dict(good())
    d = r.to_dict()
    assert d == good()
    assert d["state"] == "online" and isinstance(d["state"], str)
    assert ServerRecord.from_dict(d) == r


@pytest.mark.parametrize("state", list(ServerState))
def test_round_trip_every_state(state):
    r = ServerRecord.from_dict({**good(), "state": state.value})
    assert r.state is state
    assert ServerRecord.from_dict(r.to_dict()) == r


def test_optional_fields_default():
    data = good()
    del data["public_name"], data["queue"], data["quant"]
    r = ServerRecord.from_dict(data)
    assert r.public_name == "" and r.queue == 0
    assert r.quant == "none" and r.exact  # an older node's record: its weights are the checkpoint's


@pytest.mark.parametrize("quant", QUANT_FORMATS)
def test_every_weight_format_round_trips(quant):
    r = ServerRecord.from_dict({**good(), "quant": quant})
    # a float GGUF's node computes with the file's own floats: exact
    assert r.quant == quant and r.exact == (quant in ("none", "gguf-f32", "gguf-f16", "gguf-bf16"))
    assert ServerRecord.from_dict(r.to_dict()) == r


def test_weight_formats_are_the_ones_nodes_announce():
    from homeswarm.model.quant import QUANT_FORMATS as MODEL_FORMATS
    from homeswarm.model.weight_format import WEIGHT_FORMATS

    assert set(MODEL_FORMATS) <= set(WEIGHT_FORMATS) <= set(QUANT_FORMATS)


def test_unknown_keys_ignored_and_long_name_truncated():
    r = ServerRecord.from_dict({**good(), "future_field": [1, 2], "public_name": "x" * 100})
    assert r.public_name == "x" * 64


def test_accepts_integer_throughput_and_ipv6_and_hostnames():
    assert ServerRecord.from_dict({**good(), "throughput": 7}).throughput == 7.0
    assert ServerRecord.from_dict({**good(), "address": "[::1]:8080"}).address == "[::1]:8080"
    assert (
        ServerRecord.from_dict({**good(), "address": "node-1.example.org:1"}).address
        == "node-1.example.org:1"
    )
    assert ServerRecord.from_dict({**good(), "address": "h:65535"}).address == "h:65535"


@pytest.mark.parametrize("not_a_dict", [None, [], "record", 1, ("a", 1)])
def test_rejects_non_dict(not_a_dict):
    with pytest.raises(InvalidRecord, match="must be a dict"):
        ServerRecord.from_dict(not_a_dict)


BAD_FIELDS = [
    # strings
    ("peer_id", None), ("peer_id", ""), ("peer_id", 5), ("peer_id", "p" * 129),
    ("address", 31337), ("address", ""), ("address", "no-port"), ("address", "h:"), ("address", ":80"),
    ("address", "h:0"), ("address", "h:70000"), ("address", "h:123456"), ("address", "h:-1"),
    ("address", "h o st:80"), ("address", "h:8o"), ("address", "h:80\n"),
    ("model", None), ("model", ""), ("model", ["m"]),
    # integers (bools are not integers here)
    ("start", True), ("start", False), ("start", -1), ("start", 1.0), ("start", "4"), ("start", None),
    ("end", True), ("end", 0), ("end", 100_001), ("end", 12.0), ("end", "12"),
    ("protocol_version", True), ("protocol_version", -1), ("protocol_version", 2**31 + 1), ("protocol_version", 3.0),
    ("cache_tokens_left", True), ("cache_tokens_left", -1), ("cache_tokens_left", 2**53 + 1), ("cache_tokens_left", 1.5),
    ("queue", True), ("queue", -1), ("queue", 1.0), ("queue", "2"), ("queue", None), ("queue", 10**7),
    # throughput
    ("throughput", math.nan), ("throughput", math.inf), ("throughput", -math.inf), ("throughput", -0.5),
    ("throughput", True), ("throughput", "42"), ("throughput", None),
    # enums
    ("state", "ONLINE"), ("state", "up"), ("state", 1), ("state", None),
    ("dtype", "int8"), ("dtype", "float64"), ("dtype", ""), ("dtype", 16),
    # optional string
    ("public_name", 5), ("public_name", None), ("public_name", {"a": 1}),
    # weight format: present, it must be one that nodes announce
    ("quant", "int3"), ("quant", "INT8"), ("quant", ""), ("quant", None), ("quant", 8), ("quant", ["int8"]),
    ("quant", "none "), ("quant", "gguf-"), ("quant", "gguf-q9_9"), ("quant", "GGUF-Q4_0"), ("quant", "gguf-f32 "),
]  # fmt: skip


@pytest.mark.parametrize(("key", "value"), BAD_FIELDS, ids=[f"{k}={v!r}" for k, v in BAD_FIELDS])
def test_rejects_malformed_field(key, value):
    with pytest.raises(InvalidRecord):
        ServerRecord.from_dict({**good(), key: value})


@pytest.mark.parametrize(
    "key", ["peer_id", "address", "model", "start", "end", "state", "protocol_version", "dtype", "throughput",
            "cache_tokens_left"]
)  # fmt: skip
def test_rejects_missing_required_field(key):
    data = good()
    del data[key]
    with pytest.raises(InvalidRecord):
        ServerRecord.from_dict(data)


@pytest.mark.parametrize(("start", "end"), [(5, 5), (6, 5), (0, 0)])
def test_rejects_empty_span(start, end):
    with pytest.raises(InvalidRecord):
        ServerRecord.from_dict({**good(), "start": start, "end": end})


def test_invalid_record_is_a_value_error():
    with pytest.raises(ValueError):
        ServerRecord.from_dict({**good(), "start": "x"})


RELAY = "/ip4/203.0.113.7/tcp/31337/p2p/12D3KooWCksSUkqXhXK5QzeYA3SQ8biVy5jJRDtYeuWZmRACVVkt"


def test_relays_round_trip_and_direct_records_omit_them():
    relayed = ServerRecord.from_dict({**good(), "relays": [RELAY]})
    assert relayed.relayed and relayed.relays == (RELAY,)
    assert ServerRecord.from_dict(relayed.to_dict()) == relayed
    direct = ServerRecord.from_dict(good())
    assert not direct.relayed and "relays" not in direct.to_dict()


@pytest.mark.parametrize("relays", ["/ip4/1.2.3.4/tcp/1/p2p/X", [RELAY] * 9, ["ip4/1.2.3.4/tcp/1/p2p/X"],
                                    ["/ip4/1.2.3.4/tcp/1"], [7], ["/p2p/" + "x" * 600]])
def test_rejects_malformed_relays(relays):
    with pytest.raises(InvalidRecord, match="relays"):
        ServerRecord.from_dict({**good(), "relays": relays})
