"""In-process DirectoryService (`memory://`): Directories in a dict, lost at exit."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from tvix_store.core.castore import Directory
from tvix_store.core.digest import B3Digest
from tvix_store.directoryservice import DirectoryService


class MemoryDirectoryService(DirectoryService):
    def __init__(self) -> None:
        self._dirs: dict[B3Digest, Directory] = {}
        self._lock = threading.Lock()

    def get(self, digest: B3Digest) -> Directory | None:
        return self._dirs.get(digest)

    def _store(self, directory: Directory) -> None:
        with self._lock:
            self._dirs.setdefault(directory.digest, directory)

    def delete(self, digest: B3Digest) -> None:
        with self._lock:
            self._dirs.pop(digest, None)

    def iter_digests(self) -> Iterator[B3Digest]:
        with self._lock:
            return iter(list(self._dirs))
