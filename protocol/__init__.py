"""Wire schema (gRPC/protobuf), tensor codec and protocol version. Pure: no sockets, no DHT."""
