"""Generated protobuf and gRPC modules of the 2025 generation, `snix.castore.v1` +
`snix.store.v1` (do not edit; run scripts/gen-protos), in a descriptor pool of their own
(`_pool`). Wire format only: `tvix_store.protocol.wire_g3` converts to domain objects.
"""
