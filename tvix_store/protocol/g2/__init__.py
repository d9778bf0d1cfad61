"""Generated protobuf and gRPC modules of the 2024 generation, `tvix.castore.v1` +
`tvix.store.v1` (do not edit; run scripts/gen-protos), in a descriptor pool of their own
(`_pool`). Wire format only: `tvix_store.protocol.wire_g2` converts to domain objects.
"""
