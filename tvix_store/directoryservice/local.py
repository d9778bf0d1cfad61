"""DirectoryService of the on-disk store (`local:///path`): one file per Directory.

A Directory is stored as its deterministic protobuf encoding (`Directory.encoded`) in
`directories/<2 hex>/<64 hex>` (layout: `tvix_store.local`), written atomically. `get`
re-hashes the file and parses it back (IntegrityError if either fails). Validation of
what is put is the interface's (`put_graph` validates the whole graph before storing).
No cache: the FUSE layer and callers keep what they need.
"""

from __future__ import annotations

from collections.abc import Iterator

from tvix_store import wire
from tvix_store.castore import Directory
from tvix_store.digest import B3Digest
from tvix_store.directoryservice import DirectoryService
from tvix_store.errors import IntegrityError, StoreError
from tvix_store.local import StoreDir
from tvix_store.proto import castore_pb2


class LocalDirectoryService(DirectoryService):
    """Directories of a store directory. Thread-safe."""

    def __init__(self, sd: StoreDir) -> None:
        self._sd = sd

    def get(self, digest: B3Digest) -> Directory | None:
        digest = B3Digest(digest)
        raw = self._sd.read_verified("directories", digest)
        if raw is None:
            return None
        try:
            d = wire.directory_from_proto(castore_pb2.Directory.FromString(raw))
        except Exception as e:  # noqa: BLE001 - the bytes hash right but do not parse: damaged store
            raise IntegrityError(f"directory {digest.hex()} does not parse: {e}") from None
        if d.digest != digest:
            raise IntegrityError(f"directory {digest.hex()} re-encodes to {d.digest.hex()} (non-canonical file)")
        return d

    def has(self, digest: B3Digest) -> bool:
        import os

        return os.path.exists(self._sd.path("directories", B3Digest(digest).hex()))

    def _store(self, directory: Directory) -> None:
        self._sd.write_atomic(self._sd.path("directories", directory.digest.hex()), directory.encoded)

    def iter_digests(self) -> Iterator[B3Digest]:
        for name in self._sd.iter_names("directories"):
            try:
                yield B3Digest.from_hex(name)
            except StoreError:
                continue
