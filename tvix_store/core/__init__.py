"""The core layer: validated domain types and the one codec or helper of each kind.

`digest` (B3Digest and the one BLAKE3 helper), `castore` (nodes, Directory), `pathinfo`
(StorePath, PathInfo), `nixbase32`, `chunks` (ChunkMeta and the one chunk-list codec),
`capabilities` (what a backend declares about itself) and `errors` (the domain exceptions).
No I/O, no protobuf, no gRPC: every other layer builds on this one, it imports none of them.
"""
