"""qaserve: a gRPC inference server for extractive question answering."""
