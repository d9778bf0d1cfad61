"""BlobService over an `ObjectStore`: content-defined chunks and chunk lists as objects.

The embedded store (`local:///path`: over `objects.files`) and a persistent cache's near side
(over `objects.bounded`) are this one class. Keys are `chunks/<hex>` (a chunk's bytes) and
`blobs/<hex>` (a multi-chunk blob's chunk list, `tvix_store.core.chunks` record). Not
remote-aware and not a cache policy: that is `cached`.

- `open_write()` cuts the stream into content-defined chunks (`tvix_store.chunking`) as it
  arrives, hashes each chunk and the whole blob (BLAKE3), skips chunks already stored
  (deduplication: they are `touch`ed instead, so gc's grace period counts from this use) and
  stages new ones (`ObjectStore.stage`). `close()` commits the staged
  chunks, then writes the chunk list if there is more than one chunk. An aborted or killed
  writer leaves nothing visible. Memory per writer: at most one unfinished chunk (≤ 1 MiB)
  plus `MAX_INFLIGHT` chunks being hashed and written by the shared pool.
- `chunks(d)`: a chunk object answers itself, a chunk list its list, else None.
- `read_chunk(d)`: a chunk's bytes, verified against `d` on every read. For the digest of a
  multi-chunk blob it returns the whole blob (each chunk verified; meant for small blobs,
  read big ones chunk by chunk or with `open_read`).
- `put_chunk`/`put_chunk_list`: what a cache inserts (the chunk verified first unless the
  caller did). A list may be kept before its chunks are.
- `iter_digests()` lists the blobs that were written: every multi-chunk blob, and every
  chunk that is not part of one (a one-chunk blob). Chunks of multi-chunk blobs are still
  blobs (look-up and read work), they are just not listed.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from tvix_store.blobservice import BlobService, BlobWriter
from tvix_store.chunking import DEFAULT, Chunker, ChunkParams
from tvix_store.core.capabilities import Capabilities
from tvix_store.core.chunks import ChunkMeta, check_chunk_list, decode_chunk_list, encode_chunk_list
from tvix_store.core.digest import B3Digest, blake3_of, check_digest, new_hasher
from tvix_store.core.errors import NotFoundError, StoreError
from tvix_store.objects import ObjectStore, Staged

#: chunks handed to the pool per writer (bounds memory: ≤ 6 MiB)
MAX_INFLIGHT = 6


def chunk_key(digest: bytes) -> str:
    return f"chunks/{digest.hex()}"


def list_key(digest: bytes) -> str:
    return f"blobs/{digest.hex()}"


class ObjectBlobService(BlobService):
    """Blobs in an object store. Thread-safe (no shared mutable state besides the objects)."""

    def __init__(self, objects: ObjectStore, params: ChunkParams = DEFAULT) -> None:
        self.objects = objects
        self.params = params
        self.capabilities = Capabilities(
            is_remote=objects.capabilities.is_remote, can_list=objects.capabilities.can_list, accepts_chunks=True
        )

    def _list(self, digest: B3Digest) -> list[ChunkMeta] | None:
        raw = self.objects.get(list_key(digest))
        return None if raw is None else decode_chunk_list(raw, digest.hex())

    def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        digest = B3Digest(digest)
        size = self.objects.stat(chunk_key(digest))
        if size is None:
            return self._list(digest)
        return [ChunkMeta(digest, size)]

    def read_chunk(self, digest: B3Digest) -> bytes | None:
        digest = B3Digest(digest)
        data = self.objects.get(chunk_key(digest))
        if data is not None:
            check_digest("chunk", digest, data)
            return data
        cs = self._list(digest)
        if cs is None:
            return None
        parts = []
        for c in cs:
            part = self.objects.get(chunk_key(c.digest))
            if part is None:
                raise NotFoundError(f"chunk {c.digest.hex()} of blob {digest.hex()} is missing from the store")
            check_digest("chunk", c.digest, part)
            parts.append(part)
        out = b"".join(parts)
        check_digest("blob", digest, out)
        return out

    def open_write(self) -> BlobWriter:
        return ObjectBlobWriter(self.objects, self.params)

    def put_chunk(self, digest: B3Digest, data: bytes, *, verified: bool = False) -> bool:
        if not verified:
            check_digest("chunk", digest, data)
        return self.objects.put(chunk_key(digest), data)

    def put_chunk_list(self, digest: B3Digest, chunks: list[ChunkMeta]) -> None:
        check_chunk_list(digest, chunks)
        if len(chunks) == 1 and self.objects.has(chunk_key(digest)):
            return  # a one-chunk blob is its chunk
        self.objects.put(list_key(digest), encode_chunk_list(chunks))

    def delete(self, digest: B3Digest) -> None:
        self.objects.delete(list_key(digest))
        self.objects.delete(chunk_key(digest))

    def advise(self, digests: list[B3Digest]) -> None:
        """Local disk read-ahead of these (small, one-chunk) blobs; a no-op for other object stores."""
        self.objects.advise([chunk_key(d) for d in digests])

    def iter_digests(self) -> Iterator[B3Digest]:
        in_lists: set[bytes] = set()
        for o in self.objects.list("blobs/"):
            raw = self.objects.get(o.key)
            if raw is None:
                continue
            name = o.key[len("blobs/") :]
            try:
                in_lists.update(c.digest for c in decode_chunk_list(raw, name))
                yield B3Digest.from_hex(name)
            except StoreError:
                continue
        for o in self.objects.list("chunks/"):
            try:
                d = B3Digest.from_hex(o.key[len("chunks/") :])
            except StoreError:
                continue
            if d not in in_lists:
                yield d

    def close(self) -> None:
        self.objects.close()


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()

_Stored = tuple[bytes, int, Staged | None]  # (digest, size, staged object or None: already stored)


def _chunk_pool() -> ThreadPoolExecutor:
    """Threads that hash and write chunks while the writer's thread chunks the next bytes."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tvix-chunk-writer")
        return _pool


def _store_chunk(objects: ObjectStore, chunk: bytes | bytearray | memoryview) -> _Stored:
    digest = blake3_of(chunk)
    key = chunk_key(digest)
    if objects.has(key):
        objects.touch(key)  # relied on: young again for gc's grace period (docs/storage.md)
        return digest, len(chunk), None  # deduplicated: already stored
    return digest, len(chunk), objects.stage(chunk)


class ObjectBlobWriter(BlobWriter):
    """Streams one blob into an object store (see the module docstring). One thread at a time.

    Chunk hashing and staging run in a small shared thread pool (BLAKE3 and os.write release
    the GIL), at most `MAX_INFLIGHT` chunks ahead; results are collected in order.
    """

    def __init__(self, objects: ObjectStore, params: ChunkParams) -> None:
        self._objects = objects
        self._chunker = Chunker(params)
        self._hasher = new_hasher()  # 1 MiB pieces: one thread is faster (measured)
        self._pending = bytearray()
        self._inflight: deque[Future[_Stored]] = deque()
        self._chunks: list[ChunkMeta] = []
        self._staged: list[tuple[Staged, bytes]] = []  # (staged chunk, its digest)
        self._digest: B3Digest | None = None
        self._aborted = False

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._digest is not None or self._aborted:
            raise ValueError("write to a closed blob writer")
        mv = memoryview(data).cast("B")
        n = len(mv)
        if not n:
            return 0
        # views of immutable bytes may be handed to the pool as they are; others are copied
        immutable = isinstance(mv.obj, bytes)
        try:
            self._hasher.update(mv)
            start = 0
            for cut in self._chunker.feed(mv):
                if self._pending:
                    self._pending += mv[start:cut]
                    self._emit(self._pending)
                    self._pending = bytearray()
                else:
                    self._emit(mv[start:cut] if immutable else bytes(mv[start:cut]))
                start = cut
            if start < n:
                self._pending += mv[start:]
        except BaseException:
            self.abort()
            raise
        return n

    def _emit(self, chunk: bytes | bytearray | memoryview) -> None:
        self._inflight.append(_chunk_pool().submit(_store_chunk, self._objects, chunk))
        while len(self._inflight) > MAX_INFLIGHT:
            self._collect(self._inflight.popleft().result())

    def _collect(self, res: _Stored) -> None:
        digest, size, staged = res
        self._chunks.append(ChunkMeta(B3Digest(digest), size))
        if staged is not None:
            self._staged.append((staged, digest))

    def close(self) -> B3Digest:
        if self._digest is not None:
            return self._digest
        if self._aborted:
            raise ValueError("close of an aborted blob writer")
        try:
            if self._pending:
                if not self._inflight and not self._chunks:
                    self._collect(_store_chunk(self._objects, self._pending))  # a small blob: no thread hop
                else:
                    self._emit(self._pending)
                self._pending = bytearray()
            while self._inflight:
                self._collect(self._inflight.popleft().result())
            while self._staged:  # chunks first, then the list that names them
                staged, digest = self._staged[0]
                staged.commit(chunk_key(digest))
                self._staged.pop(0)
            digest = B3Digest(self._hasher.digest())
            if len(self._chunks) != 1:
                if not self._objects.put(list_key(digest), encode_chunk_list(self._chunks)):
                    self._objects.touch(list_key(digest))  # present already: relied on, so young again
            elif self._chunks[0].digest != digest:  # pragma: no cover - a one-chunk blob is its chunk
                raise StoreError("internal error: the single chunk's digest differs from the blob's")
        except BaseException:
            self.abort()
            raise
        self._digest = digest
        self._chunks = []
        return digest

    def abort(self) -> None:
        if self._digest is not None:
            return
        self._aborted = True
        while self._inflight:
            fut = self._inflight.popleft()
            if fut.cancel():
                continue
            try:
                self._collect(fut.result())
            except BaseException:  # noqa: BLE001, S110 - the writer is being dropped anyway
                pass
        for staged, _ in self._staged:
            staged.discard()
        self._staged = []
        self._pending = bytearray()

    def __del__(self) -> None:
        if (
            self._digest is None
            and not self._aborted
            and (getattr(self, "_staged", None) or getattr(self, "_inflight", None))
        ):
            self.abort()
