"""PathInfoService of the on-disk store (`local:///path`): one file per store path.

A PathInfo is stored as its protobuf message (`tvix_store.wire.pathinfo_to_proto`) in
`pathinfos/<nixbase32 of the 20-byte hash>` (layout: `tvix_store.local`), written
atomically; a later put of the same path replaces it atomically. `get` parses and
validates it and checks it is filed under its own hash (IntegrityError otherwise).
NARs are calculated by rendering from the blob and directory services (`tvix_store.nar`).
"""

from __future__ import annotations

from collections.abc import Iterator

from tvix_store import nar, nixbase32, wire
from tvix_store.blobservice import BlobService
from tvix_store.castore import Node
from tvix_store.directoryservice import DirectoryService
from tvix_store.errors import IntegrityError
from tvix_store.local import StoreDir
from tvix_store.pathinfo import PathInfo
from tvix_store.pathinfoservice import PathInfoService, check_output_hash
from tvix_store.proto import pathinfo_pb2


class LocalPathInfoService(PathInfoService):
    """PathInfos of a store directory. Thread-safe."""

    def __init__(self, sd: StoreDir, blobs: BlobService, directories: DirectoryService) -> None:
        self._sd = sd
        self._blobs = blobs
        self._dirs = directories

    def _load(self, name: str) -> PathInfo | None:
        raw = self._sd.read(self._sd.path("pathinfos", name))
        if raw is None:
            return None
        try:
            info = wire.pathinfo_from_proto(pathinfo_pb2.PathInfo.FromString(raw))
        except Exception as e:  # noqa: BLE001 - any parse/validation failure means a damaged file
            raise IntegrityError(f"path info {name} is damaged: {e}") from None
        if nixbase32.encode(info.store_path.digest) != name:
            raise IntegrityError(f"path info {name} holds {info.store_path}, a different store path")
        return info

    def get(self, output_hash: bytes) -> PathInfo | None:
        check_output_hash(output_hash)
        return self._load(nixbase32.encode(output_hash))

    def put(self, info: PathInfo) -> PathInfo:
        sp = info.validate()
        data = wire.pathinfo_to_proto(info).SerializeToString(deterministic=True)
        self._sd.write_atomic(self._sd.path("pathinfos", nixbase32.encode(sp.digest)), data, replace=True)
        return info

    def calculate_nar(self, node: Node) -> tuple[int, bytes]:
        return nar.calculate(node, self._blobs, self._dirs)

    def iter_all(self) -> Iterator[PathInfo]:
        for name in self._sd.iter_names("pathinfos"):
            try:
                info = self._load(name)
            except IntegrityError:
                continue
            if info is not None:
                yield info
