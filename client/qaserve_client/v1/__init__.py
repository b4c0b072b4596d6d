"""Generated protobuf messages and gRPC stubs for qaserve.v1 (make proto)."""
