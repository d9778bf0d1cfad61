"""The `snix.castore.v1` + `snix.store.v1` (2025, "G3") wire messages (`tvix_store.protocol.g3`)
as domain objects and back: `G3`, this generation's `Codec`.

G3 is G2 renamed (snix `36e4d017` "s/tvix/snix/", `06ffeec4` "rename proto node to entry":
"no change in the wire representation"): the conversions are G2's (`wire_g2.CastoreV1Codec`)
over G3's generated modules, with `Entry`/`DirectoryEntry`/`FileEntry`/`SymlinkEntry` and the
oneof and PathInfo field `entry`. Not here: calls, status codes, stored bytes (`wire.py`).
"""

from __future__ import annotations

from tvix_store.protocol.g3 import (
    castore_pb2,
    pathinfo_pb2,
    rpc_blobstore_pb2,
    rpc_blobstore_pb2_grpc,
    rpc_directory_pb2,
    rpc_directory_pb2_grpc,
    rpc_pathinfo_pb2,
    rpc_pathinfo_pb2_grpc,
)
from tvix_store.protocol.wire_g2 import CastoreV1Codec

#: the codec of `snix.castore.v1` + `snix.store.v1` (2025)
G3 = CastoreV1Codec(
    "g3",
    "snix.castore.v1 (2025)",
    castore=castore_pb2,
    pathinfo_msgs=pathinfo_pb2,
    blobstore=rpc_blobstore_pb2,
    blobstore_grpc=rpc_blobstore_pb2_grpc,
    directory=rpc_directory_pb2,
    directory_grpc=rpc_directory_pb2_grpc,
    pathinfo=rpc_pathinfo_pb2,
    pathinfo_grpc=rpc_pathinfo_pb2_grpc,
    kind="Entry",
    oneof="entry",
)
