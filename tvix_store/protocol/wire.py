"""The one place where `tvix.store.v1` (2022, "G1") wire messages (`tvix_store.protocol.g1`)
become domain objects and back, and where stored protobuf bytes are decoded; `G1` is this
generation's `Codec` (the newer generations: `wire_g2`, `wire_g3`).

Stored bytes (Directories, PathInfos, nar-bridge node URLs: `*_to_bytes`, `*_from_bytes`) are
read and written with G2's messages (bytes names, uint64 sizes), which are byte-identical to
G1's for UTF-8 names and sizes below 2^32: what earlier versions stored reads back unchanged.
Sent to a G1 peer, a name or target that is not UTF-8 or a size of 2^32 or more raises
UnrepresentableError (`G1`'s conversions check) instead of going out truncated.

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
from tvix_store.core.errors import UnrepresentableError, ValidationError
from tvix_store.core.pathinfo import NarInfo, PathInfo, Signature
from tvix_store.protocol.codec import Codec, digest_from_proto
from tvix_store.protocol.g1 import (
    castore_pb2,
    pathinfo_pb2,
    rpc_blobstore_pb2,
    rpc_blobstore_pb2_grpc,
    rpc_directory_pb2,
    rpc_directory_pb2_grpc,
    rpc_pathinfo_pb2,
    rpc_pathinfo_pb2_grpc,
)
from tvix_store.protocol.g2 import castore_pb2 as stored_castore_pb2
from tvix_store.protocol.g2 import pathinfo_pb2 as stored_pathinfo_pb2
from tvix_store.protocol.wire_g2 import G2

MAX_U32 = 0xFFFFFFFF


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
    """The message of a Directory: its canonical encoding parsed by the protobuf library (C speed).
    UnrepresentableError for a Directory G1 cannot carry (`check_g1_directory`)."""
    check_g1_directory(d)
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
    """The `Node` message; UnrepresentableError for a node G1 cannot carry (`check_g1_node`)."""
    check_g1_node(n)
    if isinstance(n, DirectoryNode):
        return pathinfo_pb2.Node(directory=_dnode(n))
    if isinstance(n, FileNode):
        return pathinfo_pb2.Node(file=_fnode(n))
    return pathinfo_pb2.Node(symlink=_snode(n))


def node_to_bytes(n: Node) -> bytes:
    """The deterministic encoding of a `Node` oneof message (the same bytes in every protocol
    generation: directory=1, file=2, symlink=3, the nodes' fields alike)."""
    return G2.node_to_proto(n).SerializeToString(deterministic=True)  # type: ignore[no-any-return]


def node_from_bytes(raw: bytes) -> Node:
    """Decode a `Node` oneof message; ValidationError for a malformed encoding or an unset oneof.
    The node's fields are converted (digest lengths) but its name is not validated (it may be
    empty, as in nar-bridge URLs)."""
    try:
        msg = stored_castore_pb2.Node.FromString(raw)
    except DecodeError as e:
        raise ValidationError(f"not a Node message: {e}") from None
    return G2.node_from_proto(msg)


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
    """The PathInfo message; UnrepresentableError for what G1 cannot carry."""
    assert p.node is not None
    if p.narinfo is not None:
        _g1_size(p.narinfo.nar_size, "NAR size")
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
        msg = stored_castore_pb2.Directory.FromString(raw)
    except DecodeError as e:
        raise ValidationError(f"not a Directory message: {e}") from None
    return G2.directory_from_proto(msg)


def pathinfo_from_bytes(raw: bytes) -> PathInfo:
    """Decode and validate a PathInfo's protobuf encoding."""
    try:
        msg = stored_pathinfo_pb2.PathInfo.FromString(raw)
    except DecodeError as e:
        raise ValidationError(f"not a PathInfo message: {e}") from None
    return G2.pathinfo_from_proto(msg)


def pathinfo_to_bytes(info: PathInfo) -> bytes:
    """The deterministic protobuf encoding of a PathInfo."""
    return G2.pathinfo_to_proto(info).SerializeToString(deterministic=True)  # type: ignore[no-any-return]


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


# --- the G1 codec ---------------------------------------------------------------------------

_G1 = "tvix.store.v1 (2022)"


def _g1_text(raw: bytes, what: str) -> None:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UnrepresentableError(
            f"{what} {raw!r} is not UTF-8: {_G1} cannot carry it (tvix.castore.v1 and snix.castore.v1 can)"
        ) from None


def _g1_size(value: int, what: str) -> None:
    if value > MAX_U32:
        raise UnrepresentableError(
            f"{what} {value} is 4 GiB or more: {_G1} cannot carry it (uint32; tvix.castore.v1 and snix.castore.v1 can)"
        )


def check_g1_node(n: Node) -> None:
    """UnrepresentableError if a G1 peer could not parse the node or would truncate it."""
    _g1_text(n.name, "name")
    if isinstance(n, SymlinkNode):
        _g1_text(n.target, f"target of symlink {n.name!r}")
    else:
        _g1_size(n.size, f"size of {n.name!r}")


def check_g1_directory(d: Directory) -> None:
    """UnrepresentableError if any entry of `d` is beyond G1 (see `check_g1_node`)."""
    for n in (*d.directories, *d.files, *d.symlinks):
        check_g1_node(n)


class G1Codec(Codec):
    """`tvix.store.v1` of 2022: Stat answers `BlobMeta` (chunks in field 1, only when asked),
    names and targets are strings, sizes uint32 (checked on the way out), no List."""

    tag = "g1"
    title = _G1
    blobstore = rpc_blobstore_pb2
    blobstore_grpc = rpc_blobstore_pb2_grpc
    directory = rpc_directory_pb2
    directory_grpc = rpc_directory_pb2_grpc
    pathinfo = rpc_pathinfo_pb2
    pathinfo_grpc = rpc_pathinfo_pb2_grpc
    has_list = False
    recursive_get_of_missing_root_is_empty = False

    def stat_request(self, digest: B3Digest, chunks: bool) -> rpc_blobstore_pb2.StatBlobRequest:
        return rpc_blobstore_pb2.StatBlobRequest(digest=bytes(digest), include_chunks=chunks)

    def stat_request_fields(self, msg: rpc_blobstore_pb2.StatBlobRequest) -> tuple[bytes, bool]:
        return bytes(msg.digest), msg.include_chunks

    def stat_response(self, chunks: Sequence[ChunkMeta], asked: bool) -> rpc_blobstore_pb2.BlobMeta:
        # PROTOCOL-V2.md §5.2: an empty BlobMeta unless the chunks were asked for
        if not asked:
            return rpc_blobstore_pb2.BlobMeta()
        for c in chunks:
            _g1_size(c.size, f"size of chunk {c.digest.hex()}")
        return chunks_to_proto(chunks)

    def chunks_from_stat(self, msg: rpc_blobstore_pb2.BlobMeta) -> list[ChunkMeta]:
        return chunks_from_proto(msg)

    def directory_from_proto(self, msg: castore_pb2.Directory) -> Directory:
        return directory_from_proto(msg)

    def directory_to_proto(self, d: Directory) -> castore_pb2.Directory:
        return directory_to_proto(d)

    def node_from_proto(self, msg: pathinfo_pb2.Node) -> Node:
        return node_from_proto(msg)

    def node_to_proto(self, n: Node) -> pathinfo_pb2.Node:
        return node_to_proto(n)

    def pathinfo_from_proto(self, msg: pathinfo_pb2.PathInfo) -> PathInfo:
        return pathinfo_from_proto(msg)

    def pathinfo_to_proto(self, p: PathInfo) -> pathinfo_pb2.PathInfo:
        return pathinfo_to_proto(p)

    def has_root(self, msg: pathinfo_pb2.PathInfo) -> bool:
        return msg.HasField("node") and msg.node.WhichOneof("node") is not None

    def calculate_nar_response(self, size: int, sha256: bytes) -> rpc_pathinfo_pb2.CalculateNARResponse:
        _g1_size(size, "NAR size")
        return rpc_pathinfo_pb2.CalculateNARResponse(nar_size=size, nar_sha256=sha256)


#: the codec of `tvix.store.v1` (2022)
G1 = G1Codec()
