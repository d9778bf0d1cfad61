"""The `tvix.castore.v1` + `tvix.store.v1` (2024, "G2") wire messages (`tvix_store.protocol.g2`)
as domain objects and back: `G2`, this generation's `Codec`, and `CastoreV1Codec`, the class
G3 (`wire_g3`) instantiates too (G3 is G2 renamed: the same bytes, other type names, oneof
`entry` instead of `node`).

Against G1 (`wire.py`): names and targets are bytes, sizes uint64; Stat answers
`StatBlobResponse` (chunks in field 2, always sent, whatever `send_chunks` says; empty means
"no finer chunking"); `PathInfoService.List` exists. A Directory's canonical encoding is the
same bytes in every generation, so its digest is too.

`NARInfo.deriver` and `NARInfo.ca` (fields 5, 6) have no place in the domain `NarInfo`: they
are dropped when a PathInfo comes in and never sent. Not here: calls, status codes, stored
bytes (`wire.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import Any

from tvix_store.core.castore import Directory, DirectoryNode, FileNode, Node, SymlinkNode
from tvix_store.core.chunks import ChunkMeta
from tvix_store.core.digest import B3Digest
from tvix_store.core.errors import ValidationError
from tvix_store.core.pathinfo import NarInfo, PathInfo, Signature
from tvix_store.protocol.codec import Codec, digest_from_proto
from tvix_store.protocol.g2 import (
    castore_pb2,
    pathinfo_pb2,
    rpc_blobstore_pb2,
    rpc_blobstore_pb2_grpc,
    rpc_directory_pb2,
    rpc_directory_pb2_grpc,
    rpc_pathinfo_pb2,
    rpc_pathinfo_pb2_grpc,
)


class CastoreV1Codec(Codec):
    """The codec of a `*.castore.v1` generation (G2 or G3; see the module docstring).

    `castore`/`pathinfo_msgs` are the generation's castore_pb2/pathinfo_pb2; `kind` the suffix
    of its node types ("Node" or "Entry"), which is also the root message's name; `oneof` the
    name of the root's oneof and of PathInfo field 1 ("node" or "entry")."""

    has_list = True
    recursive_get_of_missing_root_is_empty = True

    def __init__(
        self,
        tag: str,
        title: str,
        *,
        castore: ModuleType,
        pathinfo_msgs: ModuleType,
        blobstore: ModuleType,
        blobstore_grpc: ModuleType,
        directory: ModuleType,
        directory_grpc: ModuleType,
        pathinfo: ModuleType,
        pathinfo_grpc: ModuleType,
        kind: str,
        oneof: str,
    ) -> None:
        self.tag = tag
        self.title = title
        self.blobstore = blobstore
        self.blobstore_grpc = blobstore_grpc
        self.directory = directory
        self.directory_grpc = directory_grpc
        self.pathinfo = pathinfo
        self.pathinfo_grpc = pathinfo_grpc
        self._oneof = oneof
        self._Directory: Any = castore.Directory
        self._DirNode: Any = getattr(castore, "Directory" + kind)
        self._FileNode: Any = getattr(castore, "File" + kind)
        self._SymNode: Any = getattr(castore, "Symlink" + kind)
        self._Root: Any = getattr(castore, kind)
        self._PathInfo: Any = pathinfo_msgs.PathInfo
        self._NARInfo: Any = pathinfo_msgs.NARInfo

    # --- BlobService ---------------------------------------------------------------------------

    def stat_request(self, digest: B3Digest, chunks: bool) -> Any:
        return self.blobstore.StatBlobRequest(digest=bytes(digest), send_chunks=chunks)

    def stat_request_fields(self, msg: Any) -> tuple[bytes, bool]:
        return bytes(msg.digest), msg.send_chunks

    def stat_response(self, chunks: Sequence[ChunkMeta], asked: bool) -> Any:
        # like tvix and snix: the chunk list whatever send_chunks says (PROTOCOL-V2.md §3)
        meta = self.blobstore.StatBlobResponse.ChunkMeta
        return self.blobstore.StatBlobResponse(chunks=[meta(digest=bytes(c.digest), size=c.size) for c in chunks])

    def chunks_from_stat(self, msg: Any) -> list[ChunkMeta]:
        return [ChunkMeta(digest_from_proto(c.digest, "chunk digest"), c.size) for c in msg.chunks]

    # --- nodes and Directories -------------------------------------------------------------------

    def _dnode(self, m: Any) -> DirectoryNode:
        return DirectoryNode(bytes(m.name), digest_from_proto(m.digest, f"digest of directory {m.name!r}"), m.size)

    def _fnode(self, m: Any) -> FileNode:
        return FileNode(bytes(m.name), digest_from_proto(m.digest, f"digest of file {m.name!r}"), m.size, m.executable)

    def _snode(self, m: Any) -> SymlinkNode:
        return SymlinkNode(bytes(m.name), bytes(m.target))

    def directory_from_proto(self, msg: Any) -> Directory:
        """Convert and validate; the canonical encoding is the library's deterministic
        serialization without unknown fields (as in `wire.directory_from_proto`)."""
        d = Directory(
            tuple(self._dnode(x) for x in msg.directories),
            tuple(self._fnode(x) for x in msg.files),
            tuple(self._snode(x) for x in msg.symlinks),
        )
        d.validate()
        msg.DiscardUnknownFields()
        d.__dict__["encoded"] = msg.SerializeToString(deterministic=True)
        return d

    def directory_to_proto(self, d: Directory) -> Any:
        return self._Directory.FromString(d.encoded)

    def node_from_proto(self, msg: Any) -> Node:
        kind = msg.WhichOneof(self._oneof)
        if kind == "directory":
            return self._dnode(msg.directory)
        if kind == "file":
            return self._fnode(msg.file)
        if kind == "symlink":
            return self._snode(msg.symlink)
        raise ValidationError(f"{self._oneof} is not set")

    def node_to_proto(self, n: Node) -> Any:
        if isinstance(n, DirectoryNode):
            return self._Root(directory=self._DirNode(name=n.name, digest=bytes(n.digest), size=n.size))
        if isinstance(n, FileNode):
            return self._Root(
                file=self._FileNode(name=n.name, digest=bytes(n.digest), size=n.size, executable=n.executable)
            )
        return self._Root(symlink=self._SymNode(name=n.name, target=n.target))

    # --- PathInfo --------------------------------------------------------------------------------

    def has_root(self, msg: Any) -> bool:
        return bool(msg.HasField(self._oneof)) and getattr(msg, self._oneof).WhichOneof(self._oneof) is not None

    def pathinfo_from_proto(self, msg: Any) -> PathInfo:
        if not self.has_root(msg):
            raise ValidationError(f"path info has no root {self._oneof}")
        narinfo = None
        if msg.HasField("narinfo"):
            ni = msg.narinfo
            narinfo = NarInfo(
                ni.nar_size,
                bytes(ni.nar_sha256),
                tuple(Signature(s.name, bytes(s.data)) for s in ni.signatures),
                tuple(ni.reference_names),
            )
        info = PathInfo(
            self.node_from_proto(getattr(msg, self._oneof)), tuple(bytes(r) for r in msg.references), narinfo
        )
        info.validate()
        return info

    def pathinfo_to_proto(self, p: PathInfo) -> Any:
        assert p.node is not None
        m = self._PathInfo(references=list(p.references))
        getattr(m, self._oneof).CopyFrom(self.node_to_proto(p.node))
        if p.narinfo is not None:
            ni = p.narinfo
            m.narinfo.CopyFrom(
                self._NARInfo(
                    nar_size=ni.nar_size,
                    nar_sha256=ni.nar_sha256,
                    signatures=[self._NARInfo.Signature(name=s.name, data=s.data) for s in ni.signatures],
                    reference_names=list(ni.reference_names),
                )
            )
        return m

    def calculate_nar_response(self, size: int, sha256: bytes) -> Any:
        return self.pathinfo.CalculateNARResponse(nar_size=size, nar_sha256=sha256)


#: the codec of `tvix.castore.v1` + `tvix.store.v1` (2024)
G2 = CastoreV1Codec(
    "g2",
    "tvix.castore.v1 (2024)",
    castore=castore_pb2,
    pathinfo_msgs=pathinfo_pb2,
    blobstore=rpc_blobstore_pb2,
    blobstore_grpc=rpc_blobstore_pb2_grpc,
    directory=rpc_directory_pb2,
    directory_grpc=rpc_directory_pb2_grpc,
    pathinfo=rpc_pathinfo_pb2,
    pathinfo_grpc=rpc_pathinfo_pb2_grpc,
    kind="Node",
    oneof="node",
)
