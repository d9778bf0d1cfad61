"""The protobuf descriptor pool of the G2 generated modules (tvix.castore.v1 + tvix.store.v1
of 2024): a pool of its own, because G1 (in the default pool) defines `tvix.store.v1.PathInfo`,
`NARInfo`, `PathInfoService` and more with other shapes. Not generated."""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
