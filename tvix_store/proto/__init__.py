"""Generated protobuf and gRPC modules of `tvix.store.v1` (do not edit; run scripts/gen-protos).

This package is the wire format only. Code outside `tvix_store.wire` and the gRPC
server/client modules should not import it: domain objects live in `tvix_store.castore`
and `tvix_store.pathinfo`.
"""
