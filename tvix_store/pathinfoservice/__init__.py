"""The PathInfoService interface: Nix store paths → PathInfo (root node + Nix metadata).

Backends are sibling modules (`memory`, `objects`, `grpc`, `cached`). Contract:
- `get(h)` takes the 20-byte hash part of a store path; None when absent.
- `put(info)` validates (ValidationError) and stores, returning what was stored.
- `calculate_nar(node)` is the NAR size and sha256 of a node; NotFoundError if a blob or
  Directory it needs is missing. Local backends render the NAR from their blob and
  directory services; the gRPC client asks the server.
- `capabilities` declares what callers may rely on (`tvix_store.core.capabilities`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator

from tvix_store.core.capabilities import LOCAL, Capabilities
from tvix_store.core.castore import Node
from tvix_store.core.errors import StoreError, ValidationError
from tvix_store.core.pathinfo import HASH_LEN, PathInfo


class PathInfoService(ABC):
    capabilities: Capabilities = LOCAL

    @abstractmethod
    def get(self, output_hash: bytes) -> PathInfo | None:
        """The PathInfo whose store path has this 20-byte hash, or None."""

    @abstractmethod
    def put(self, info: PathInfo) -> PathInfo:
        """Validate and store; returns the stored PathInfo."""

    @abstractmethod
    def calculate_nar(self, node: Node) -> tuple[int, bytes]:
        """(NAR size, NAR sha256) of the node's NAR serialisation."""

    def keep(self, info: PathInfo) -> None:
        """Keep a PathInfo fetched and verified elsewhere (a cache's near side)."""
        self.put(info)

    def delete(self, output_hash: bytes) -> None:
        """Forget a store path's PathInfo (what it references stays)."""
        raise StoreError(f"{type(self).__name__} cannot delete")

    def available(self) -> bool:
        """False while the backend is known to be unreachable (a remote that is down)."""
        return True

    def iter_all(self) -> Iterator[PathInfo]:
        """The PathInfos this backend can enumerate cheaply (may be none)."""
        return iter(())

    def close(self) -> None:
        """Release resources."""


def check_output_hash(output_hash: bytes) -> None:
    if len(output_hash) != HASH_LEN:
        raise ValidationError(f"invalid output hash length: expected {HASH_LEN} bytes, got {len(output_hash)}")
