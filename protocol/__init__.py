"""Wire schema (gRPC/protobuf), tensor codec and protocol version. Pure: no sockets, no DHT.

- `node.proto` is the schema; `node_pb2*.py` are generated from it by `regenerate.py`
  (`make proto`) and committed; a unit test fails when they are stale.
- `codec` turns torch tensors into `node_pb2.Tensor` and back (lossless or compressed) and
  rejects malformed messages with `CodecError`.
- `version` holds `PROTOCOL_VERSION` and the rule for accepting a peer's version.

Importing this package has no side effects beyond registering the schema with protobuf.
"""

from homeswarm.protocol import node_pb2, node_pb2_grpc
from homeswarm.protocol.codec import (
    CodecError,
    Compression,
    deserialize_tensor,
    parse_compression,
    serialize_tensor,
)
from homeswarm.protocol.version import PROTOCOL_VERSION, check_protocol_version

__all__ = [
    "PROTOCOL_VERSION",
    "CodecError",
    "Compression",
    "check_protocol_version",
    "deserialize_tensor",
    "node_pb2",
    "node_pb2_grpc",
    "parse_compression",
    "serialize_tensor",
]
