"""Generated protobuf and gRPC modules of `tvix.store.v1` (do not edit; run scripts/gen-protos).

This package is the wire format only. Code outside `tvix_store.protocol.wire` and the gRPC
server/client modules should not import it: domain objects live in `tvix_store.core.castore`
and `tvix_store.core.pathinfo`.
"""
