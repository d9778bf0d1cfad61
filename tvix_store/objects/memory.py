"""`MemoryObjectStore`: objects in a dict, lost at exit. For tests, scratch stores and as a
bounded in-memory near side. Thread-safe."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

from tvix_store.objects import ObjectInfo, ObjectStore, split_key


class MemoryObjectStore(ObjectStore):
    def __init__(self) -> None:
        self._objects: dict[str, tuple[bytes, float]] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        entry = self._objects.get(key)
        return None if entry is None else entry[0]

    def stat(self, key: str) -> int | None:
        entry = self._objects.get(key)
        return None if entry is None else len(entry[0])

    def put(self, key: str, data: bytes | bytearray | memoryview, *, replace: bool = False) -> bool:
        split_key(key)
        with self._lock:
            if not replace and key in self._objects:
                return False
            self._objects[key] = (bytes(data), time.time())
        return True

    def delete(self, key: str) -> bool:
        with self._lock:
            return self._objects.pop(key, None) is not None

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        with self._lock:
            items = [(k, len(d), t) for k, (d, t) in self._objects.items() if k.startswith(prefix)]
        return iter(ObjectInfo(k, n, t) for k, n, t in items)

    def touch(self, key: str) -> None:
        with self._lock:
            entry = self._objects.get(key)
            if entry is not None:
                self._objects[key] = (entry[0], time.time())
