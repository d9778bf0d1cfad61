"""BlobService in the tvix/snix bucket layout (`objectstore+…` URLs), over any `ObjectStore`.

Layout and encodings: `tvix_store.protocol.bucket` (chunks zstd-compressed under
`chunks/b3/…`, a chunk index under `blobs/b3/…`, empty for a blob of one chunk). Chunks are
cut by FastCDC 2020 with tvix/snix's parameters (`tvix_store.chunking.v2020`), so blobs
written here and by snix share chunks.

- Writing: chunks are hashed as they are cut; each is uploaded with a put-if-absent (one
  request; snix HEADs first), several in flight (`INFLIGHT`) to hide the round trip; the index goes last,
  after every chunk it names. A blob's first chunk waits until a second one exists or the
  writer closes: an aborted one-chunk blob leaves nothing behind, and an aborted bigger one
  at most chunks (never its index: the blob stays absent).
- Reading: every chunk is BLAKE3-verified after decompression (IntegrityError otherwise).
  `chunks(d)` of a one-chunk blob needs the chunk's size, which the layout does not record:
  it is read from the zstd frame header when the writer put it there (this one does), else by
  fetching the chunk; sizes are remembered (a small LRU of digests).
- Not a cache's near side (`put_chunk` is refused), never deletes (the layout has no gc).
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed

from tvix_store.blobservice import BlobService, BlobWriter
from tvix_store.chunking.v2020 import BUCKET, Params2020, Stream2020
from tvix_store.core.capabilities import Capabilities
from tvix_store.core.chunks import ChunkMeta
from tvix_store.core.digest import EMPTY_DIGEST, B3Digest, blake3_of, check_digest, new_hasher
from tvix_store.core.errors import IntegrityError, NotFoundError, StoreError, UnavailableError
from tvix_store.objects import ObjectStore
from tvix_store.protocol import bucket

#: chunk uploads in flight per writer (and reads per `read_many`)
INFLIGHT = 8
_SIZES = 65536  # remembered one-chunk sizes


class BucketBlobService(BlobService):
    """Blobs in the tvix/snix bucket layout (see the module docstring). Thread-safe."""

    def __init__(self, objects: ObjectStore, params: Params2020 = BUCKET) -> None:
        self.objects = objects
        self.params = params
        oc = objects.capabilities
        self.capabilities = Capabilities(is_remote=oc.is_remote, can_list=oc.can_list)
        self._sizes: OrderedDict[B3Digest, int] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=INFLIGHT, thread_name_prefix="tvix-bucket")
        self._outer = ThreadPoolExecutor(max_workers=INFLIGHT, thread_name_prefix="tvix-bucket-put")

    # --- reads ------------------------------------------------------------------------------

    def _remember(self, digest: B3Digest, size: int) -> None:
        with self._lock:
            self._sizes[digest] = size
            self._sizes.move_to_end(digest)
            while len(self._sizes) > _SIZES:
                self._sizes.popitem(last=False)

    def _index(self, digest: B3Digest) -> list[ChunkMeta] | None:
        raw = self.objects.get(bucket.blob_key(digest))
        return None if raw is None else bucket.decode_index(raw, digest.hex())

    def _chunk_size(self, digest: B3Digest) -> int | None:
        with self._lock:
            size = self._sizes.get(digest)
        if size is not None:
            return size
        head = self.objects.get_range(bucket.chunk_key(digest), 0, 18)
        if head is None:
            return None
        size = bucket.chunk_size_hint(head)
        if size is None:  # written without a content size (snix): the chunk itself tells
            data = self.read_chunk(digest)
            if data is None:
                return None
            size = len(data)
        self._remember(digest, size)
        return size

    def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        digest = B3Digest(digest)
        index = self._index(digest)
        if index:
            return index
        if index is not None and digest == EMPTY_DIGEST:
            return []
        size = self._chunk_size(digest)  # a one-chunk blob, or a chunk of a bigger one
        if size is None:
            if index is not None:
                raise NotFoundError(f"blob {digest.hex()} has an index but its chunk is missing")
            return None
        return [ChunkMeta(digest, size)]

    def has(self, digest: B3Digest) -> bool:
        digest = B3Digest(digest)
        return self.objects.has(bucket.blob_key(digest)) or self.objects.has(bucket.chunk_key(digest))

    def _read_one(self, digest: B3Digest) -> bytes | None:
        raw = self.objects.get(bucket.chunk_key(digest))
        if raw is None:
            return None
        data = bucket.decompress(raw, bucket.MAX_CHUNK, f"chunk {digest.hex()}")
        check_digest("chunk", digest, data)
        self._remember(digest, len(data))
        return data

    def read_chunk(self, digest: B3Digest) -> bytes | None:
        digest = B3Digest(digest)
        data = self._read_one(digest)
        if data is not None:
            return data
        index = self._index(digest)
        if index is None:
            return None
        if not index:
            if digest == EMPTY_DIGEST:
                return b""
            raise NotFoundError(f"blob {digest.hex()} has an index but its chunk is missing")
        parts = []
        for c, part in zip(index, self._pool.map(self._read_one, [c.digest for c in index]), strict=True):
            if part is None:
                raise NotFoundError(f"chunk {c.digest.hex()} of blob {digest.hex()} is missing from the store")
            if len(part) != c.size:
                raise IntegrityError(f"chunk {c.digest.hex()} has {len(part)} bytes, the index says {c.size}")
            parts.append(part)
        out = b"".join(parts)
        check_digest("blob", digest, out)
        return out

    def read_many(self, digests: Sequence[B3Digest]) -> Iterator[tuple[B3Digest, bytes | None | StoreError]]:
        """Many chunks read in parallel (`INFLIGHT` at a time), answered as they complete."""
        # on the outer pool: `read_chunk` of a multi-chunk blob fans out on the chunk pool
        futures = {self._outer.submit(self.read_chunk, d): d for d in digests}
        for fut in as_completed(futures):
            d = futures[fut]
            try:
                yield d, fut.result()
            except UnavailableError:
                for f in futures:
                    f.cancel()
                raise
            except StoreError as e:
                yield d, e

    def has_many(self, digests: Sequence[B3Digest]) -> list[bool]:
        return list(self._pool.map(self.has, digests))

    # --- writes -----------------------------------------------------------------------------

    def open_write(self) -> BlobWriter:
        return BucketBlobWriter(self)

    def _upload(self, digest: bytes, chunk: bytes) -> None:
        # put-if-absent: one request; a chunk already there is not replaced (snix HEADs first:
        # a round trip more per new chunk, and the importer asks `has` of whole blobs anyway)
        self.objects.put(bucket.chunk_key(digest), bucket.compress(chunk))
        self._remember(B3Digest(digest), len(chunk))

    def put_many(self, blobs: Sequence[bytes]) -> list[B3Digest]:
        """Many small blobs uploaded in parallel (`INFLIGHT` at a time, on their own threads:
        each writer uses the chunk pool)."""
        return list(self._outer.map(self.put, blobs))

    def iter_digests(self) -> Iterator[B3Digest]:
        """Every blob with an index object (snix writes one for every blob)."""
        for o in self.objects.list("blobs/b3/"):
            d = bucket.digest_of_key(o.key)
            if d is not None:
                yield d

    def close(self) -> None:
        self._outer.shutdown(wait=True)
        self._pool.shutdown(wait=True)
        self.objects.close()


class BucketBlobWriter(BlobWriter):
    """One blob into the bucket (see the module docstring). One thread at a time."""

    def __init__(self, svc: BucketBlobService) -> None:
        self._svc = svc
        self._cdc = Stream2020(svc.params)
        self._hasher = new_hasher()
        self._first: tuple[bytes, bytes] | None = None  # (digest, bytes) held back
        self._chunks: list[ChunkMeta] = []
        self._inflight: deque[Future[None]] = deque()
        self._digest: B3Digest | None = None
        self._aborted = False

    def write(self, data: bytes | memoryview) -> int:
        if self._digest is not None or self._aborted:
            raise ValueError("write to a closed blob writer")
        try:
            self._hasher.update(data)
            for chunk in self._cdc.feed(data):
                self._add(chunk)
        except BaseException:
            self.abort()
            raise
        return len(data)

    def _add(self, chunk: bytes) -> None:
        d = blake3_of(chunk)
        self._chunks.append(ChunkMeta(B3Digest(d), len(chunk)))
        if len(self._chunks) == 1:
            self._first = (d, chunk)
            return
        if self._first is not None:
            self._send(*self._first)
            self._first = None
        self._send(d, chunk)

    def _send(self, digest: bytes, chunk: bytes) -> None:
        self._inflight.append(self._svc._pool.submit(self._svc._upload, digest, chunk))
        while len(self._inflight) > INFLIGHT:
            self._inflight.popleft().result()

    def close(self) -> B3Digest:
        if self._digest is not None:
            return self._digest
        if self._aborted:
            raise ValueError("close of an aborted blob writer")
        try:
            for chunk in self._cdc.finish():
                self._add(chunk)
            if self._first is not None:
                self._send(*self._first)
                self._first = None
            while self._inflight:
                self._inflight.popleft().result()
            digest = B3Digest(self._hasher.digest())
            objects = self._svc.objects
            objects.put(bucket.blob_key(digest), bucket.encode_index(self._chunks))  # if absent
        except BaseException:
            self.abort()
            raise
        self._digest = digest
        return digest

    def abort(self) -> None:
        if self._digest is not None:
            return
        self._aborted = True
        self._first = None
        while self._inflight:
            fut = self._inflight.popleft()
            if not fut.cancel():
                try:
                    fut.result()
                except BaseException:  # noqa: BLE001, S110 - the writer is being dropped anyway
                    pass
