"""DirectoryService over an `ObjectStore`: one object per Directory.

A Directory is kept as its deterministic protobuf encoding (`Directory.encoded`) under
`directories/<hex>`. `get` re-hashes the object and parses it back (IntegrityError if either
fails). Validation of what is put is the interface's (`put_graph` validates the whole graph
before storing any of it). No cache: callers keep what they need.
"""

from __future__ import annotations

from collections.abc import Iterator

from tvix_store.core.capabilities import Capabilities
from tvix_store.core.castore import Directory
from tvix_store.core.digest import B3Digest, check_digest
from tvix_store.core.errors import IntegrityError, StoreError
from tvix_store.directoryservice import DirectoryService
from tvix_store.objects import ObjectStore
from tvix_store.protocol import wire


def directory_key(digest: bytes) -> str:
    return f"directories/{digest.hex()}"


class ObjectDirectoryService(DirectoryService):
    """Directories in an object store. Thread-safe."""

    def __init__(self, objects: ObjectStore) -> None:
        self.objects = objects
        self.capabilities = Capabilities(
            is_remote=objects.capabilities.is_remote, can_list=objects.capabilities.can_list
        )

    def get(self, digest: B3Digest) -> Directory | None:
        digest = B3Digest(digest)
        raw = self.objects.get(directory_key(digest))
        if raw is None:
            return None
        check_digest("directory", digest, raw)
        try:
            d = wire.directory_from_bytes(raw)
        except Exception as e:  # noqa: BLE001 - the bytes hash right but do not parse: damaged store
            raise IntegrityError(f"directory {digest.hex()} does not parse: {e}") from None
        if d.digest != digest:
            raise IntegrityError(f"directory {digest.hex()} re-encodes to {d.digest.hex()} (non-canonical object)")
        return d

    def has(self, digest: B3Digest) -> bool:
        return self.objects.has(directory_key(digest))

    def _store(self, directory: Directory) -> None:
        key = directory_key(directory.digest)
        if not self.objects.put(key, directory.encoded):
            self.objects.touch(key)  # present already: relied on, so young again for gc's grace period

    def delete(self, digest: B3Digest) -> None:
        self.objects.delete(directory_key(digest))

    def iter_digests(self) -> Iterator[B3Digest]:
        for o in self.objects.list("directories/"):
            try:
                yield B3Digest.from_hex(o.key[len("directories/") :])
            except StoreError:
                continue

    def close(self) -> None:
        self.objects.close()
