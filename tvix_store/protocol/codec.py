"""`Codec`: what differs between the protocol generations, as one interface the gRPC servicers
and clients use without knowing which generation they speak.

Three generations (PROTOCOL-V2.md): G1 `tvix.store.v1` (2022, `tvix_store.protocol.wire`), G2
`tvix.castore.v1` + `tvix.store.v1` (2024, `wire_g2`), G3 `snix.castore.v1` + `snix.store.v1`
(2025, `wire_g3`). Each has its own generated modules and its own codec instance; all convert
to and from the same domain objects (`tvix_store.core`). What a codec carries:

- the service descriptors (method paths, request and response types) and generated modules of
  its generation, for handler registration and client stubs;
- the conversions whose shape differs: the Stat request's field names and response
  (`BlobMeta`, chunks in field 1, vs `StatBlobResponse`, chunks in field 2), the root
  `Node`/`Entry` and its oneof name, and G1's limits: a name or target that is not UTF-8 or a
  size of 2^32 or more raises UnrepresentableError instead of going out truncated;
- per-generation answers that differ (`recursive_get_of_missing_root_is_empty`).

Not here: calls (the servicers and `tvix_store.*.grpc` clients make them), status codes (one
map, `tvix_store.remote.status`), stored bytes (`wire.py`: always the G1-compatible encoding).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from google.protobuf.descriptor import ServiceDescriptor

from tvix_store.core.castore import Directory, Node
from tvix_store.core.chunks import ChunkMeta
from tvix_store.core.digest import B3Digest
from tvix_store.core.errors import ValidationError
from tvix_store.core.pathinfo import PathInfo

#: the generations, oldest first (their `Codec.tag`s)
TAGS = ("g1", "g2", "g3")


def digest_from_proto(raw: bytes, what: str = "digest") -> B3Digest:
    """A BLAKE3 digest field; ValidationError naming `what` unless it is 32 bytes."""
    if len(raw) != 32:
        raise ValidationError(f"invalid {what}: expected 32 bytes, got {len(raw)}")
    return B3Digest(raw)


class Codec(ABC):
    """The conversions and descriptors of one protocol generation (see the module docstring).

    Message arguments and results are the generation's generated protobuf messages (typed
    `Any`: each generation has its own classes)."""

    #: "g1", "g2" or "g3"
    tag: str
    #: a human name for messages, e.g. "tvix.store.v1 (2022)"
    title: str
    #: generated modules: rpc_blobstore_pb2(_grpc), rpc_directory_pb2(_grpc), rpc_pathinfo_pb2(_grpc)
    blobstore: ModuleType
    blobstore_grpc: ModuleType
    directory: ModuleType
    directory_grpc: ModuleType
    pathinfo: ModuleType
    pathinfo_grpc: ModuleType
    #: whether PathInfoService has List
    has_list: bool
    #: a recursive Directory Get of a missing root answers an empty stream (G2, G3), not NOT_FOUND
    recursive_get_of_missing_root_is_empty: bool

    @property
    def blob_service(self) -> ServiceDescriptor:
        return self.blobstore.DESCRIPTOR.services_by_name["BlobService"]  # type: ignore[no-any-return]

    @property
    def directory_service(self) -> ServiceDescriptor:
        return self.directory.DESCRIPTOR.services_by_name["DirectoryService"]  # type: ignore[no-any-return]

    @property
    def pathinfo_service(self) -> ServiceDescriptor:
        return self.pathinfo.DESCRIPTOR.services_by_name["PathInfoService"]  # type: ignore[no-any-return]

    # --- BlobService -------------------------------------------------------------------------

    @abstractmethod
    def stat_request(self, digest: B3Digest, chunks: bool) -> Any:
        """A Stat request (asking for the chunk list if `chunks`)."""

    @abstractmethod
    def stat_request_fields(self, msg: Any) -> tuple[bytes, bool]:
        """(raw digest, whether the chunk list was asked for) of a Stat request."""

    @abstractmethod
    def stat_response(self, chunks: Sequence[ChunkMeta], asked: bool) -> Any:
        """The Stat response of a present blob with these chunks."""

    @abstractmethod
    def chunks_from_stat(self, msg: Any) -> list[ChunkMeta]:
        """The chunk list of a Stat response (validated digests); may be empty."""

    # --- DirectoryService and nodes -----------------------------------------------------------

    @abstractmethod
    def directory_from_proto(self, msg: Any) -> Directory:
        """Convert and validate a Directory message."""

    @abstractmethod
    def directory_to_proto(self, d: Directory) -> Any:
        """The Directory message of a validated Directory."""

    @abstractmethod
    def node_from_proto(self, msg: Any) -> Node:
        """Convert the root `Node`/`Entry` message (ValidationError if unset)."""

    @abstractmethod
    def node_to_proto(self, n: Node) -> Any:
        """The root `Node`/`Entry` message of a node."""

    # --- PathInfoService -----------------------------------------------------------------------

    @abstractmethod
    def pathinfo_from_proto(self, msg: Any) -> PathInfo:
        """Convert and validate a PathInfo message."""

    @abstractmethod
    def pathinfo_to_proto(self, p: PathInfo) -> Any:
        """The PathInfo message of a validated PathInfo."""

    @abstractmethod
    def has_root(self, msg: Any) -> bool:
        """Whether a PathInfo message carries its root node/entry."""

    @abstractmethod
    def calculate_nar_response(self, size: int, sha256: bytes) -> Any:
        """The CalculateNAR response."""
