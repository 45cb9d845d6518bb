"""Server records: what a node announces about the blocks it serves.

A record travels through the DHT as a plain dict of primitives. Records come from other peers and
are untrusted: ``ServerRecord.from_dict`` validates every field and raises ``InvalidRecord`` on
anything malformed, so the planner only ever sees well-formed data. Optional fields (``public_name``,
``queue``, ``quant``, ``relays``, ``weights``, ``tls_cert``, ``adapters``) may be absent (records from older nodes) but are validated when present; unknown
keys are ignored, so newer nodes can add fields.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import asdict, dataclass
from typing import Any, NewType

from homeswarm.routing.tls import fingerprint

PeerId = NewType("PeerId", str)

_ADDRESS_RE = re.compile(
    r"[A-Za-z0-9.\-_:\[\]]{1,253}:(\d{1,5})"
)  # used with fullmatch: "$" accepts a trailing "\n"
_MAX_BLOCKS = 100_000
_DIGEST_RE = re.compile(r"[0-9a-f]{64}")
_DTYPES = frozenset({"float32", "bfloat16", "float16"})
_MAX_QUEUE = 1_000_000
_MAX_PUBLIC_NAME = 64
_MAX_RELAYS = 8
_MAX_MADDR = 512
# a LoRA adapter's name (its folder's name on the node); a record lists at most _MAX_ADAPTERS
ADAPTER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_MAX_ADAPTERS = 64
# weight formats a node may announce: "none" is the checkpoint's own weights in the record's dtype;
# "int4-experts" a checkpoint shipped with 4-bit routed experts, the rest in the record's dtype (model.
# weight_format). Nodes that predate a format drop such records as malformed, which routes around them.
# A node serving a GGUF file announces its type ("gguf-q4_k_m", llama.cpp's file type names); the float
# ones (f32, f16, bf16) compute with the file's own floats and count as exact.
GGUF_TYPES = ("f32", "f16", "bf16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q8_1", "q2_k", "q2_k_s", "q3_k",
              "q3_k_s", "q3_k_m", "q3_k_l", "q4_k", "q4_k_s", "q4_k_m", "q5_k", "q5_k_s", "q5_k_m", "q6_k", "q8_k",
              "iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "iq3_xs", "iq3_s", "iq3_m",
              "iq4_nl", "iq4_xs", "tq1_0", "tq2_0", "q1_0", "mxfp4", "mxfp4_moe", "nvfp4", "other")
QUANT_FORMATS = ("none", "int8", "int4", "int4-experts", *(f"gguf-{t}" for t in GGUF_TYPES))
EXACT_FORMATS = ("none", "gguf-f32", "gguf-f16", "gguf-bf16")


class InvalidRecord(ValueError):
    """A record from the DHT that does not pass validation."""


class ServerState(str, enum.Enum):
    JOINING = "joining"  # loading its span: counted by block choice, not routed to
    ONLINE = "online"
    OFFLINE = "offline"
    # stepped aside for the machine's owner (--idle-only), back when the machine is idle again; not routed
    # to. Nodes that predate this state drop such records as malformed, which routes around them just the same.
    BUSY = "busy"


@dataclass(frozen=True)
class ServerRecord:
    peer_id: PeerId
    address: str  # host:port of the node's gRPC service
    model: str
    start: int  # first block served
    end: int  # one past the last block served
    state: ServerState
    protocol_version: int
    dtype: str
    throughput: float  # decoding steps per second through one block (batch 1)
    cache_tokens_left: int  # free KV cache, tokens of batch size 1
    public_name: str = ""
    queue: int = 0  # requests waiting in the node's compute queue when it announced (optional field)
    quant: str = "none"  # weight format: none (exact), int8, int4, int4-experts, gguf-TYPE (optional field)
    # multiaddrs (/ip4/.../tcp/.../p2p/RELAY_ID) of the libp2p relays through which a node that cannot be
    # dialled is reached; empty: clients dial ``address`` directly (optional field)
    relays: tuple[str, ...] = ()

    @property
    def relayed(self) -> bool:
        """Whether the node is reached through a relay rather than by dialling ``address``."""
        return bool(self.relays)
    weights: str = ""  # sha256 of the span's checkpoint tensors (model.digest), hex; "" if not announced
    # the node's self-signed TLS certificate (PEM), pinned by this signed record (routing.tls); "": --insecure
    tls_cert: str = ""
    adapters: tuple[str, ...] = ()  # names of the LoRA adapters the node serves beside its base weights

    @property
    def exact(self) -> bool:
        """Whether the node computes with the checkpoint's own weights (no quantization): a float GGUF's too."""
        return self.quant in EXACT_FORMATS

    @property
    def num_blocks(self) -> int:
        return self.end - self.start

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = self.state.value
        if self.relays:
            data["relays"] = list(self.relays)
        else:
            del data["relays"]  # direct nodes announce what nodes without the field announce
        if not self.tls_cert:
            del data["tls_cert"]  # an --insecure node: absent, as older nodes send it
        if not self.weights:
            del data["weights"]  # not announced (a joining node's record): absent, as older nodes send it
        if self.adapters:
            data["adapters"] = list(self.adapters)
        else:
            del data["adapters"]  # none served: absent, as older nodes send it
        return data

    @classmethod
    def from_dict(cls, data: Any) -> ServerRecord:
        if not isinstance(data, dict):
            raise InvalidRecord(f"a record must be a dict, got {type(data).__name__}")
        try:
            record = cls(
                peer_id=PeerId(_str(data, "peer_id", 128)),
                address=_str(data, "address", 260),
                model=_str(data, "model", 256),
                start=_int(data, "start", 0, _MAX_BLOCKS),
                end=_int(data, "end", 1, _MAX_BLOCKS),
                state=ServerState(_str(data, "state", 16)),
                protocol_version=_int(data, "protocol_version", 0, 2**31),
                dtype=_str(data, "dtype", 16),
                throughput=_float(data, "throughput"),
                cache_tokens_left=_int(data, "cache_tokens_left", 0, 2**53),
                public_name=_optional_str(data, "public_name")[:_MAX_PUBLIC_NAME],
                queue=_int(data, "queue", 0, _MAX_QUEUE) if "queue" in data else 0,
                quant=_choice(data, "quant", QUANT_FORMATS) if "quant" in data else "none",
                relays=_relays(data) if "relays" in data else (),
                weights=_digest(data, "weights") if "weights" in data else "",
                tls_cert=_certificate(data) if "tls_cert" in data else "",
                adapters=_adapters(data) if "adapters" in data else (),
            )
        except ValueError as e:
            raise InvalidRecord(str(e)) from None
        if record.start >= record.end:
            raise InvalidRecord(f"empty span [{record.start}, {record.end})")
        if not is_valid_address(record.address):
            raise InvalidRecord(f"bad address {record.address!r}")
        if record.dtype not in _DTYPES:
            raise InvalidRecord(f"unknown dtype {record.dtype!r}")
        return record


def _str(data: dict, key: str, max_len: int) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value or len(value) > max_len:
        raise InvalidRecord(f"field {key!r} must be a non-empty string of at most {max_len} chars")
    return value


def _choice(data: dict, key: str, allowed: tuple[str, ...]) -> str:
    value = data.get(key)
    if not isinstance(value, str) or value not in allowed:
        raise InvalidRecord(f"field {key!r} must be one of {', '.join(allowed)}")
    return value


def _relays(data: dict) -> tuple[str, ...]:
    value = data.get("relays")
    if (
        not isinstance(value, (list, tuple))
        or len(value) > _MAX_RELAYS
        or not all(isinstance(m, str) and m.startswith("/") and "/p2p/" in m and len(m) <= _MAX_MADDR for m in value)
    ):
        raise InvalidRecord(f"field 'relays' must be a list of at most {_MAX_RELAYS} multiaddrs ending in /p2p/ID")
    return tuple(value)


def _adapters(data: dict) -> tuple[str, ...]:
    value = data.get("adapters")
    if (
        not isinstance(value, (list, tuple))
        or len(value) > _MAX_ADAPTERS
        or not all(isinstance(name, str) and ADAPTER_NAME_RE.fullmatch(name) for name in value)
        or len(set(value)) != len(value)
    ):
        raise InvalidRecord(f"field 'adapters' must be a list of at most {_MAX_ADAPTERS} distinct names of "
                            f"1-64 letters, digits, '.', '_' or '-'")
    return tuple(value)


def _digest(data: dict, key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not _DIGEST_RE.fullmatch(value):
        raise InvalidRecord(f"field {key!r} must be 64 lowercase hex digits")
    return value


def _certificate(data: dict) -> str:
    value = data.get("tls_cert")
    try:
        fingerprint(value) if isinstance(value, str) else None
    except ValueError:
        value = None
    if not isinstance(value, str):
        raise InvalidRecord("field 'tls_cert' must be one PEM certificate")
    return value


def _optional_str(data: dict, key: str) -> str:
    value = data.get(key, "")
    if not isinstance(value, str):
        raise InvalidRecord(f"field {key!r} must be a string")
    return value


def _int(data: dict, key: str, low: int, high: int) -> int:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidRecord(f"field {key!r} must be an integer in [{low}, {high}]")
    return value


def _float(data: dict, key: str) -> float:
    value = data.get(key)
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise InvalidRecord(f"field {key!r} must be a finite non-negative number")
    return float(value)


def is_valid_address(address: str) -> bool:
    """Whether ``address`` is a HOST:PORT that records may carry (what peers will accept)."""
    return bool(_ADDRESS_RE.fullmatch(address)) and 0 < int(address.rsplit(":", 1)[1]) < 65536
