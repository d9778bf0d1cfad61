"""In-process BlobService (`memory://`): whole blobs in a dict, no finer chunking, lost at exit.

For tests and scratch use. A written blob is its own only chunk. It also takes chunks and
chunk lists fetched elsewhere (`put_chunk`, `put_chunk_list`), so it can be the near side of
a cache (`CachedBlobService(MemoryBlobService(), far)`); such a blob answers its list even
while some of its chunks are absent. Thread-safe.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from tvix_store.blobservice import BlobService, BlobWriter
from tvix_store.core.capabilities import Capabilities
from tvix_store.core.chunks import ChunkMeta, check_chunk_list
from tvix_store.core.digest import B3Digest, check_digest, new_hasher


class MemoryBlobService(BlobService):
    capabilities = Capabilities(accepts_chunks=True)

    def __init__(self) -> None:
        self._blobs: dict[B3Digest, bytes] = {}
        self._lists: dict[B3Digest, list[ChunkMeta]] = {}
        self._lock = threading.Lock()

    def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        data = self._blobs.get(digest)
        if data is None:
            cs = self._lists.get(digest)
            return None if cs is None else list(cs)
        return [ChunkMeta(digest, len(data))] if data else []

    def read_chunk(self, digest: B3Digest) -> bytes | None:
        return self._blobs.get(digest)

    def open_write(self) -> BlobWriter:
        return _MemoryWriter(self)

    def put_chunk(self, digest: B3Digest, data: bytes, *, verified: bool = False) -> bool:
        if not verified:
            check_digest("chunk", digest, data)
        with self._lock:
            return self._blobs.setdefault(digest, data) is data

    def put_chunk_list(self, digest: B3Digest, chunks: list[ChunkMeta]) -> None:
        check_chunk_list(digest, chunks)
        with self._lock:
            self._lists.setdefault(digest, list(chunks))

    def delete(self, digest: B3Digest) -> None:
        with self._lock:
            self._blobs.pop(digest, None)
            self._lists.pop(digest, None)

    def iter_digests(self) -> Iterator[B3Digest]:
        with self._lock:
            return iter(list(self._blobs.keys() | self._lists.keys()))

    def _insert(self, digest: B3Digest, data: bytes) -> None:
        with self._lock:
            self._blobs.setdefault(digest, data)


class _MemoryWriter(BlobWriter):
    def __init__(self, svc: MemoryBlobService) -> None:
        self._svc = svc
        self._buf = bytearray()
        self._hasher = new_hasher()
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
