"""The join-swarm daemon: gRPC service, sessions within a KV memory budget, announcer."""
