"""The protobuf descriptor pool of the G3 generated modules (snix.castore.v1 + snix.store.v1
of 2025): one pool per generation, like G2's, so no generation's names can collide with
another's (or with code generated from upstream's own files in the default pool). Not
generated."""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
