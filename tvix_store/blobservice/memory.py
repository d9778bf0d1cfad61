"""In-process BlobService (`memory://`): whole blobs in a dict, no finer chunking, lost at exit.

For tests and scratch use. Every blob is its own only chunk.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import blake3

from tvix_store.blobservice import BlobService, BlobWriter, ChunkMeta
from tvix_store.digest import B3Digest


class MemoryBlobService(BlobService):
    def __init__(self) -> None:
        self._blobs: dict[B3Digest, bytes] = {}
        self._lock = threading.Lock()

    def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        data = self._blobs.get(digest)
        if data is None:
            return None
        return [ChunkMeta(digest, len(data))] if data else []

    def read_chunk(self, digest: B3Digest) -> bytes | None:
        return self._blobs.get(digest)

    def open_write(self) -> BlobWriter:
        return _MemoryWriter(self)

    def iter_digests(self) -> Iterator[B3Digest]:
        with self._lock:
            return iter(list(self._blobs))

    def _insert(self, digest: B3Digest, data: bytes) -> None:
        with self._lock:
            self._blobs.setdefault(digest, data)


class _MemoryWriter(BlobWriter):
    def __init__(self, svc: MemoryBlobService) -> None:
        self._svc = svc
        self._buf = bytearray()
        self._hasher = blake3.blake3()
        self._digest: B3Digest | None = None

    def write(self, data: bytes | memoryview) -> int:
        if self._digest is not None:
            raise ValueError("write to a closed blob writer")
        self._buf += data
        self._hasher.update(data)
        return len(data)

    def close(self) -> B3Digest:
        if self._digest is None:
            self._digest = B3Digest(self._hasher.digest())
            self._svc._insert(self._digest, bytes(self._buf))
            self._buf = bytearray()
        return self._digest

    def abort(self) -> None:
        self._buf = bytearray()
