"""Transport limits both sides of the wire agree on: gRPC channel and server options.

Hidden states of a long prefill exceed gRPC's 4 MiB default (1,000 tokens x 4,096 x float32 is
16 MiB), so clients and nodes raise the limit alike.
"""

from __future__ import annotations

MAX_MESSAGE_BYTES = 512 * 1024 * 1024
GRPC_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
