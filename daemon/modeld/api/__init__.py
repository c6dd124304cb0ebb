"""gRPC servicers: protobuf <-> domain translation and the one error-to-status mapping."""
