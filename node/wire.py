"""Registers the node's service with a gRPC server, with request parsing that never escapes as UNKNOWN.

gRPC's generated registration parses each request with ``FromString``; bytes that are not a valid
message then make gRPC answer UNKNOWN ("Unexpected DecodeError") before any handler runs. Here a request
that does not parse becomes a ``MalformedRequest``, which the service answers with INVALID_ARGUMENT like
any other bad input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from homeswarm.protocol import node_pb2

SERVICE_NAME = "homeswarm.v1.Node"


@dataclass(frozen=True)
class MalformedRequest:
    """Bytes that did not parse as the request message ``kind``."""

    kind: str
    error: str

    def __str__(self) -> str:
        return f"malformed {self.kind}: {self.error}"


def _parser(message_type: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except DecodeError as e:
            return MalformedRequest(message_type.DESCRIPTOR.name, str(e))

    return parse


def add_node_service(servicer: Any, server: grpc.aio.Server) -> None:
    """``node_pb2_grpc.add_NodeServicer_to_server``, with requests parsed by ``_parser``."""
    unary = grpc.unary_unary_rpc_method_handler
    handlers = {
        "Info": unary(servicer.Info, request_deserializer=_parser(node_pb2.InfoRequest),
                      response_serializer=node_pb2.InfoResponse.SerializeToString),
        "Forward": unary(servicer.Forward, request_deserializer=_parser(node_pb2.ForwardRequest),
                         response_serializer=node_pb2.ForwardResponse.SerializeToString),
        "Backward": unary(servicer.Backward, request_deserializer=_parser(node_pb2.BackwardRequest),
                          response_serializer=node_pb2.BackwardResponse.SerializeToString),
        "Inference": grpc.stream_stream_rpc_method_handler(
            servicer.Inference, request_deserializer=_parser(node_pb2.InferenceRequest),
            response_serializer=node_pb2.InferenceResponse.SerializeToString),
        "Push": unary(servicer.Push, request_deserializer=_parser(node_pb2.PushRequest),
                      response_serializer=node_pb2.PushResponse.SerializeToString),
        "Weights": grpc.unary_stream_rpc_method_handler(
            servicer.Weights, request_deserializer=_parser(node_pb2.WeightsRequest),
            response_serializer=node_pb2.WeightsChunk.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
