"""The one place where `tvix.store.v1` wire messages (`tvix_store.protocol.g1`) become domain
objects and back, and where stored protobuf bytes are decoded.

`*_from_proto`/`*_from_bytes` functions validate what they convert and raise ValidationError
with a message naming what is wrong (a malformed encoding too); `*_to_proto`/`*_to_bytes`
functions take validated domain objects. Nothing outside this module, the gRPC servicers and
the gRPC client backends needs protobuf types.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from google.protobuf.message import DecodeError
from google.protobuf.message_factory import GetMessageClass

from tvix_store.core.castore import Directory, DirectoryNode, FileNode, Node, SymlinkNode
from tvix_store.core.chunks import ChunkMeta
from tvix_store.core.digest import B3Digest
from tvix_store.core.errors import ValidationError
from tvix_store.core.pathinfo import NarInfo, PathInfo, Signature
from tvix_store.protocol.g1 import castore_pb2, pathinfo_pb2, rpc_blobstore_pb2


def digest_from_proto(raw: bytes, what: str = "digest") -> B3Digest:
    if len(raw) != 32:
        raise ValidationError(f"invalid {what}: expected 32 bytes, got {len(raw)}")
    return B3Digest(raw)


def _name(s: str) -> bytes:
    return s.encode("utf-8")


def directory_node_from_proto(m: castore_pb2.DirectoryNode) -> DirectoryNode:
    return DirectoryNode(_name(m.name), digest_from_proto(m.digest, f"digest of directory {m.name!r}"), m.size)


def file_node_from_proto(m: castore_pb2.FileNode) -> FileNode:
    return FileNode(_name(m.name), digest_from_proto(m.digest, f"digest of file {m.name!r}"), m.size, m.executable)


def symlink_node_from_proto(m: castore_pb2.SymlinkNode) -> SymlinkNode:
    return SymlinkNode(_name(m.name), _name(m.target))


def directory_from_proto(m: castore_pb2.Directory) -> Directory:
    """Convert and validate (names, order, uniqueness, targets, digest lengths).

    The Directory's canonical encoding (what its digest hashes) is taken from the protobuf
    library's deterministic serialization of the message without unknown fields (C speed),
    which equals `Directory.encoded` for every valid Directory (a test checks that)."""
    d = Directory(
        tuple(directory_node_from_proto(x) for x in m.directories),
        tuple(file_node_from_proto(x) for x in m.files),
        tuple(symlink_node_from_proto(x) for x in m.symlinks),
    )
    d.validate()
    m.DiscardUnknownFields()
    d.__dict__["encoded"] = m.SerializeToString(deterministic=True)
    return d


def _dnode(n: DirectoryNode) -> castore_pb2.DirectoryNode:
    return castore_pb2.DirectoryNode(name=n.name.decode(), digest=bytes(n.digest), size=n.size)


def _fnode(n: FileNode) -> castore_pb2.FileNode:
    return castore_pb2.FileNode(name=n.name.decode(), digest=bytes(n.digest), size=n.size, executable=n.executable)


def _snode(n: SymlinkNode) -> castore_pb2.SymlinkNode:
    return castore_pb2.SymlinkNode(name=n.name.decode(), target=n.target.decode())


def directory_to_proto(d: Directory) -> castore_pb2.Directory:
    """The message of a Directory: its canonical encoding parsed by the protobuf library (C speed)."""
    return castore_pb2.Directory.FromString(d.encoded)


def node_from_proto(m: pathinfo_pb2.Node) -> Node:
    """Convert a `Node` oneof; ValidationError if unset. Validates the node's own fields."""
    kind = m.WhichOneof("node")
    node: Node
    if kind == "directory":
        node = directory_node_from_proto(m.directory)
    elif kind == "file":
        node = file_node_from_proto(m.file)
    elif kind == "symlink":
        node = symlink_node_from_proto(m.symlink)
    else:
        raise ValidationError("node is not set")
    return node


def node_to_proto(n: Node) -> pathinfo_pb2.Node:
    if isinstance(n, DirectoryNode):
        return pathinfo_pb2.Node(directory=_dnode(n))
    if isinstance(n, FileNode):
        return pathinfo_pb2.Node(file=_fnode(n))
    return pathinfo_pb2.Node(symlink=_snode(n))


def node_to_bytes(n: Node) -> bytes:
    """The deterministic encoding of a `Node` oneof message (the same bytes in every protocol
    generation: directory=1, file=2, symlink=3, the nodes' fields alike)."""
    return node_to_proto(n).SerializeToString(deterministic=True)


def node_from_bytes(raw: bytes) -> Node:
    """Decode a `Node` oneof message; ValidationError for a malformed encoding or an unset oneof.
    The node's fields are converted (digest lengths) but its name is not validated (it may be
    empty, as in nar-bridge URLs)."""
    try:
        msg = pathinfo_pb2.Node.FromString(raw)
    except DecodeError as e:
        raise ValidationError(f"not a Node message: {e}") from None
    return node_from_proto(msg)


def pathinfo_from_proto(m: pathinfo_pb2.PathInfo) -> PathInfo:
    """Convert and validate per PROTOCOL.md (root node, store path name, references, narinfo)."""
    if not m.HasField("node") or m.node.WhichOneof("node") is None:
        raise ValidationError("path info has no root node")
    narinfo = None
    if m.HasField("narinfo"):
        ni = m.narinfo
        narinfo = NarInfo(
            ni.nar_size,
            bytes(ni.nar_sha256),
            tuple(Signature(s.name, bytes(s.data)) for s in ni.signatures),
            tuple(ni.reference_names),
        )
    info = PathInfo(node_from_proto(m.node), tuple(bytes(r) for r in m.references), narinfo)
    info.validate()
    return info


def pathinfo_to_proto(p: PathInfo) -> pathinfo_pb2.PathInfo:
    assert p.node is not None
    m = pathinfo_pb2.PathInfo(node=node_to_proto(p.node), references=list(p.references))
    if p.narinfo is not None:
        ni = p.narinfo
        m.narinfo.CopyFrom(
            pathinfo_pb2.NARInfo(
                nar_size=ni.nar_size,
                nar_sha256=ni.nar_sha256,
                signatures=[pathinfo_pb2.NARInfo.Signature(name=s.name, data=s.data) for s in ni.signatures],
                reference_names=list(ni.reference_names),
            )
        )
    return m


def chunks_from_proto(meta: rpc_blobstore_pb2.BlobMeta) -> list[ChunkMeta]:
    return [ChunkMeta(digest_from_proto(c.digest, "chunk digest"), c.size) for c in meta.chunks]


def chunks_to_proto(chunks: Sequence[ChunkMeta]) -> rpc_blobstore_pb2.BlobMeta:
    return rpc_blobstore_pb2.BlobMeta(
        chunks=[rpc_blobstore_pb2.BlobMeta.ChunkMeta(digest=bytes(c.digest), size=c.size) for c in chunks]
    )


def directory_from_bytes(raw: bytes) -> Directory:
    """Decode and validate a Directory's protobuf encoding."""
    try:
        msg = castore_pb2.Directory.FromString(raw)
    except DecodeError as e:
        raise ValidationError(f"not a Directory message: {e}") from None
    return directory_from_proto(msg)


def pathinfo_from_bytes(raw: bytes) -> PathInfo:
    """Decode and validate a PathInfo's protobuf encoding."""
    try:
        msg = pathinfo_pb2.PathInfo.FromString(raw)
    except DecodeError as e:
        raise ValidationError(f"not a PathInfo message: {e}") from None
    return pathinfo_from_proto(msg)


def pathinfo_to_bytes(info: PathInfo) -> bytes:
    """The deterministic protobuf encoding of a PathInfo."""
    return pathinfo_to_proto(info).SerializeToString(deterministic=True)


class Malformed:
    """What the server's request deserializer hands on for bytes that are no valid message
    (instead of raising inside grpc, which logs a traceback and answers INTERNAL): the servicer
    side turns it into INVALID_ARGUMENT (`tvix_store.remote.status.map_errors`)."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def message_class(descriptor: Any) -> type[Any]:
    """The generated message class of a message descriptor (for handler registration)."""
    return GetMessageClass(descriptor)


def safe_deserializer(message_class: type[Any]) -> Callable[[bytes], Any]:
    """A request deserializer that never raises: a message, or `Malformed`."""
    parse = message_class.FromString
    name = message_class.DESCRIPTOR.full_name

    def deserialize(raw: bytes) -> Any:
        try:
            return parse(raw)
        except DecodeError as e:
            return Malformed(f"not a valid {name} message ({len(raw)} bytes): {e}")

    return deserialize
