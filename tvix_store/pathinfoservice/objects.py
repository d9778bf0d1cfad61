"""PathInfoService over an `ObjectStore`: one object per store path.

A PathInfo is kept as its protobuf message under `pathinfos/<nixbase32 of the 20-byte hash>`;
a later put of the same path replaces it atomically. `get` parses and validates it and
checks it is filed under its own hash (IntegrityError otherwise). NARs are calculated by
rendering from the given blob and directory services (`tvix_store.nar`).
"""

from __future__ import annotations

from collections.abc import Iterator

from tvix_store import nar
from tvix_store.blobservice import BlobService
from tvix_store.core import nixbase32
from tvix_store.core.capabilities import Capabilities
from tvix_store.core.castore import Node
from tvix_store.core.errors import IntegrityError
from tvix_store.core.pathinfo import PathInfo
from tvix_store.directoryservice import DirectoryService
from tvix_store.objects import ObjectStore
from tvix_store.pathinfoservice import PathInfoService, check_output_hash
from tvix_store.protocol import wire


def pathinfo_key(output_hash: bytes) -> str:
    return f"pathinfos/{nixbase32.encode(output_hash)}"


class ObjectPathInfoService(PathInfoService):
    """PathInfos in an object store. Thread-safe."""

    def __init__(self, objects: ObjectStore, blobs: BlobService, directories: DirectoryService) -> None:
        self.objects = objects
        self._blobs = blobs
        self._dirs = directories
        self.capabilities = Capabilities(
            is_remote=objects.capabilities.is_remote, can_list=objects.capabilities.can_list
        )

    def _load(self, key: str) -> PathInfo | None:
        raw = self.objects.get(key)
        if raw is None:
            return None
        name = key[len("pathinfos/") :]
        try:
            info = wire.pathinfo_from_bytes(raw)
        except Exception as e:  # noqa: BLE001 - any parse/validation failure means a damaged object
            raise IntegrityError(f"path info {name} is damaged: {e}") from None
        if nixbase32.encode(info.store_path.digest) != name:
            raise IntegrityError(f"path info {name} holds {info.store_path}, a different store path")
        return info

    def get(self, output_hash: bytes) -> PathInfo | None:
        check_output_hash(output_hash)
        return self._load(pathinfo_key(output_hash))

    def put(self, info: PathInfo) -> PathInfo:
        sp = info.validate()
        self.objects.put(pathinfo_key(sp.digest), wire.pathinfo_to_bytes(info), replace=True)
        return info

    def delete(self, output_hash: bytes) -> None:
        check_output_hash(output_hash)
        self.objects.delete(pathinfo_key(output_hash))

    def calculate_nar(self, node: Node) -> tuple[int, bytes]:
        return nar.calculate(node, self._blobs, self._dirs)

    def iter_all(self) -> Iterator[PathInfo]:
        for o in self.objects.list("pathinfos/"):
            try:
                info = self._load(o.key)
            except IntegrityError:
                continue
            if info is not None:
                yield info

    def close(self) -> None:
        self.objects.close()
