"""In-process PathInfoService (`memory://`), NAR calculation over the given blob/directory services."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from tvix_store import nar
from tvix_store.blobservice import BlobService
from tvix_store.core.castore import Node
from tvix_store.core.pathinfo import PathInfo
from tvix_store.directoryservice import DirectoryService
from tvix_store.pathinfoservice import PathInfoService, check_output_hash


class MemoryPathInfoService(PathInfoService):
    def __init__(self, blobs: BlobService, directories: DirectoryService) -> None:
        self._blobs = blobs
        self._dirs = directories
        self._infos: dict[bytes, PathInfo] = {}
        self._lock = threading.Lock()

    def get(self, output_hash: bytes) -> PathInfo | None:
        check_output_hash(output_hash)
        return self._infos.get(output_hash)

    def put(self, info: PathInfo) -> PathInfo:
        sp = info.validate()
        with self._lock:
            self._infos[sp.digest] = info
        return info

    def delete(self, output_hash: bytes) -> None:
        check_output_hash(output_hash)
        with self._lock:
            self._infos.pop(output_hash, None)

    def calculate_nar(self, node: Node) -> tuple[int, bytes]:
        return nar.calculate(node, self._blobs, self._dirs)

    def iter_all(self) -> Iterator[PathInfo]:
        with self._lock:
            return iter(list(self._infos.values()))
