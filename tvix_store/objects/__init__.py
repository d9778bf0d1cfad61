"""The byte layer: `ObjectStore`, immutable byte objects by key, under every stored service.

The blob, directory and path-info services of a store (`…service.objects`) keep everything
they own in one ObjectStore, named by keys of the form `KIND/NAME` (`KINDS`):

    chunks/<64 hex>        the raw bytes of one chunk (a chunk is also a one-chunk blob)
    blobs/<64 hex>         the chunk list of a blob (`tvix_store.core.chunks` record)
    directories/<64 hex>   a Directory's deterministic protobuf encoding
    pathinfos/<nixbase32>  a PathInfo protobuf message, by store path hash
    narbridge/<name>       nar-bridge's records: an uploaded NAR's root node by sha256
                           (`nar-<nixbase32>`), a store path's Deriver and CA (`path-<nixbase32>`)

Backends are siblings: `packs` (pack files + a SQLite index: the embedded store), `files` (one
file per object: the persistent cache), `memory`; the size-bounded LRU wrapper `bounded` turns
any of them into a cache's near side. S3 and friends plug in here later, below the services,
without them changing.

Contract (every backend):
- `put` is put-if-absent (unless `replace`), atomic: an object is visible whole or not at all.
- `stage(data)` writes bytes that stay invisible until `Staged.commit(key)`; an aborted writer
  `discard`s them (a killed one leaves nothing visible either).
- Objects are not verified here (the services hash what they read): a backend returns what
  it holds, or None for an absent key.
- Methods are blocking and thread-safe.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

from tvix_store.core.capabilities import LOCAL, Capabilities

KINDS = ("chunks", "blobs", "directories", "pathinfos", "narbridge")


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """An object found by `list`: its key, size, and last write or use (seconds since the epoch)."""

    key: str
    size: int
    mtime: float


class Staged(ABC):
    """Bytes written but not yet visible under any key."""

    size: int

    @abstractmethod
    def commit(self, key: str) -> bool:
        """Make the bytes visible as `key` unless it exists; True if this call published it."""

    @abstractmethod
    def discard(self) -> None:
        """Drop the bytes (idempotent)."""


class ObjectStore(ABC):
    """Immutable byte objects by key (see the module docstring for the contract)."""

    capabilities: Capabilities = LOCAL
    #: False when this process may only read (a cache directory owned by another process)
    writable: bool = True

    @abstractmethod
    def get(self, key: str) -> bytes | None:
        """The whole object, or None if absent."""

    def get_range(self, key: str, offset: int, length: int) -> bytes | None:
        """`length` bytes from `offset` (fewer at the end), or None if absent."""
        data = self.get(key)
        return None if data is None else data[offset : offset + length]

    @abstractmethod
    def stat(self, key: str) -> int | None:
        """The object's size, or None if absent."""

    def has(self, key: str) -> bool:
        return self.stat(key) is not None

    @abstractmethod
    def put(self, key: str, data: bytes | bytearray | memoryview, *, replace: bool = False) -> bool:
        """Store an object atomically; unless `replace`, keep an existing one. True if written."""

    def stage(self, data: bytes | bytearray | memoryview) -> Staged:
        """Write bytes that become visible only on `commit(key)` (default: kept in memory)."""
        return _MemoryStaged(self, bytes(data))

    @abstractmethod
    def delete(self, key: str) -> bool:
        """Remove an object; True if it existed."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """The objects whose key starts with `prefix` (a snapshot as it goes, unordered)."""

    def touch(self, key: str) -> None:
        """Record a use of `key` (recency for LRU wrappers; persisted where the backend can)."""

    def advise(self, keys: list[str]) -> None:
        """Hint: these objects will be read soon (local disks warm them; must not block)."""

    def reclaim(self) -> int:
        """Give back the disk space of deleted objects where `delete` itself does not (pack
        files: rewrite those whose live fraction is low); returns the bytes freed. Safe with
        concurrent readers and writers. Default: nothing to do (deleting freed the space)."""
        return 0

    def close(self) -> None:
        """Release resources."""


class _MemoryStaged(Staged):
    def __init__(self, store: ObjectStore, data: bytes) -> None:
        self._store = store
        self._data: bytes | None = data
        self.size = len(data)

    def commit(self, key: str) -> bool:
        if self._data is None:
            raise ValueError("commit of a discarded staged object")
        data, self._data = self._data, None
        return self._store.put(key, data)

    def discard(self) -> None:
        self._data = None


def split_key(key: str) -> tuple[str, str]:
    """(kind, name) of a key; ValueError if it is not `KIND/NAME` with a known kind."""
    kind, sep, name = key.partition("/")
    if not sep or kind not in KINDS or not name or "/" in name or name.startswith("."):
        raise ValueError(f"invalid object key {key!r}")
    return kind, name
