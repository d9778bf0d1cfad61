"""The read path of the mount: a read of a file handle → the chunks covering it, verified, from a
small in-memory LRU or the store, with read-ahead by the one policy (`tvix_store.readahead`).

- A file's chunk index (`BlobService.chunks` once, cumulative offsets) lives on its inode
  (`FileData`); a read bisects it and fetches only the chunks covering `[off, off+size)`,
  several at once when a request spans chunks. Never a whole-blob load.
- Small files (≤ `WHOLE_READ_MAX`) are read as one piece with `read_chunk(file digest)`
  (backends serve whole small blobs), without asking for their chunk list: one store call
  per small file instead of two. The length is still checked against the FileNode.
- `ChunkBuffer`: a small LRU of verified chunk bytes (bounded in bytes) in front of
  `read_chunk`; kernel requests (128 KiB – 1 MiB) and chunks do not line up, so the next
  request usually needs the chunk again. Concurrent misses share one fetch.
- Sequential readers (the policy decides): the chunks ahead go to `BlobService.prefetch` (a
  non-blocking hint: a remote cache starts fetching), and the next `READAHEAD_CHUNKS` are
  fetched into the LRU by background tasks (at most half the offload threads), so the
  store's read + hash overlaps the kernel's copying.

Runs on the trio thread only (no locks); store calls go through the `Offloader`. No pyfuse3.
"""

from __future__ import annotations

import bisect
import logging
from collections import OrderedDict
from dataclasses import dataclass

import trio

from tvix_fuse.inodes import FileData, Inode
from tvix_fuse.offload import Offloader
from tvix_store.blobservice import BlobService
from tvix_store.core.chunks import ChunkMeta, chunk_offsets
from tvix_store.core.digest import EMPTY_DIGEST, B3Digest
from tvix_store.core.errors import IntegrityError, NotFoundError, UnavailableError
from tvix_store.readahead import ReadAhead
from tvix_store.util.counters import Counters
from tvix_store.util.singleflight import SingleFlight

log = logging.getLogger("tvix_fuse")

DEFAULT_BUFFER_BYTES = 32 << 20
#: files of a tree up to this size are read as one piece, without asking for their chunk list
WHOLE_READ_MAX = 256 << 10
#: chunks fetched into the LRU ahead of a sequential reader by background tasks
READAHEAD_CHUNKS = 4


def _cancelled() -> BaseException:
    return UnavailableError("fetch cancelled (the mount is shutting down)")


@dataclass(slots=True)
class FileHandle:
    """An open file: its inode and its reader's read-ahead state (once the chunk index is known)."""

    inode: Inode
    ahead: ReadAhead | None = None


class ChunkBuffer:
    """Verified chunk bytes by digest: LRU bounded in bytes, single-flight misses."""

    def __init__(self, blobs: BlobService, offload: Offloader, counters: Counters, max_bytes: int) -> None:
        self._blobs = blobs
        self._offload = offload
        self._counters = counters
        self._lru: OrderedDict[B3Digest, bytes] = OrderedDict()
        self._bytes = 0
        self.max_bytes = max_bytes
        self._flights: SingleFlight[B3Digest, bytes] = SingleFlight(on_join=lambda: counters.add("single_flight_joins"))

    def __contains__(self, digest: B3Digest) -> bool:
        return digest in self._lru

    def fetching(self, digest: B3Digest) -> bool:
        return digest in self._flights

    @property
    def cached_bytes(self) -> int:
        return self._bytes

    async def get(self, chunk: ChunkMeta, blob: B3Digest) -> bytes:
        """The chunk's verified bytes (`blob` names the blob it belongs to, for messages)."""
        data = self._lru.get(chunk.digest)
        if data is not None:
            self._lru.move_to_end(chunk.digest)
            self._counters.add("chunk_cache_hits")
            return data
        return await self._flights.arun(chunk.digest, lambda: self._fetch(chunk, blob), _cancelled)

    async def _fetch(self, chunk: ChunkMeta, blob: B3Digest) -> bytes:
        data = await self._offload.run(self._blobs.read_chunk, chunk.digest)
        if data is None:
            raise NotFoundError(f"chunk {chunk.digest.hex()} of blob {blob.hex()} is missing from the store")
        if len(data) != chunk.size:
            raise IntegrityError(
                f"chunk {chunk.digest.hex()} of blob {blob.hex()} has {len(data)} bytes, "
                f"its chunk list says {chunk.size}"
            )
        self._counters.add("chunks_fetched")
        self._counters.add("chunk_bytes_fetched", len(data))
        self._insert(chunk.digest, data)
        return data

    def _insert(self, digest: B3Digest, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        old = self._lru.pop(digest, None)
        if old is not None:
            self._bytes -= len(old)
        self._lru[digest] = data
        self._bytes += len(data)
        while self._bytes > self.max_bytes:
            _, dropped = self._lru.popitem(last=False)
            self._bytes -= len(dropped)


class ReadPath:
    """Reads of the mount's files over one BlobService (see the module docstring)."""

    def __init__(self, blobs: BlobService, offload: Offloader, counters: Counters, buffer_bytes: int) -> None:
        self.blobs = blobs
        self.offload = offload
        self.counters = counters
        self.buffer = ChunkBuffer(blobs, offload, counters, buffer_bytes)
        self._chunk_lists: SingleFlight[B3Digest, list[ChunkMeta] | None] = SingleFlight(
            on_join=lambda: counters.add("single_flight_joins")
        )
        self._background: trio.Nursery | None = None
        self._readaheads = 0

    def start_background(self, nursery: trio.Nursery | None) -> None:
        """Enable read-ahead tasks in `nursery` (the mount's); None disables them."""
        self._background = nursery

    async def chunk_list(self, digest: B3Digest) -> list[ChunkMeta] | None:
        """A blob's chunk list from the store (single-flight)."""
        return await self._chunk_lists.arun(digest, lambda: self.offload.run(self.blobs.chunks, digest), _cancelled)

    @staticmethod
    def set_chunks(f: FileData, chunks: list[ChunkMeta]) -> None:
        """Attach a chunk index to a file; IntegrityError if it disagrees with the file's size."""
        offsets, total = chunk_offsets(chunks)
        if total != f.size:
            raise IntegrityError(
                f"blob {f.digest.hex()}: its chunks add up to {total} bytes, the file node says {f.size}"
            )
        f.chunks = chunks
        f.offsets = offsets

    async def chunk_index(self, f: FileData) -> tuple[list[ChunkMeta], list[int]]:
        if f.chunks is None:
            chunks: list[ChunkMeta] | None
            if f.size == 0 and f.digest == EMPTY_DIGEST:
                chunks = []
            elif 0 < f.size <= WHOLE_READ_MAX:
                chunks = [ChunkMeta(f.digest, f.size)]  # a small file: the blob itself as its one chunk
            else:
                chunks = await self.chunk_list(f.digest)
            if chunks is None:
                raise NotFoundError(f"blob {f.digest.hex()} is missing from the store")
            if f.chunks is None:
                self.set_chunks(f, chunks)
        assert f.chunks is not None and f.offsets is not None
        return f.chunks, f.offsets

    async def read(self, h: FileHandle, off: int, size: int) -> bytes:
        """`size` bytes at `off` (fewer at EOF); fetches only the chunks covering the range."""
        f = h.inode.data
        assert isinstance(f, FileData)
        self.counters.add("reads")
        end = min(off + size, f.size)
        if off >= end:
            return b""
        chunks, offsets = await self.chunk_index(f)
        first = bisect.bisect_right(offsets, off) - 1
        last = bisect.bisect_left(offsets, end) - 1
        if h.ahead is None:
            h.ahead = ReadAhead(chunks, offsets=offsets)
        self._ahead(h.ahead, chunks, off, end, last, f.digest)
        wanted = chunks[first : last + 1]
        if len(wanted) == 1:
            datas = [await self.buffer.get(wanted[0], f.digest)]
        else:
            datas = await self._get_many(wanted, f.digest)
        if len(datas) == 1:
            start = off - offsets[first]
            out = datas[0][start : start + (end - off)]
        else:
            parts = []
            for i, data in enumerate(datas, first):
                lo = max(off - offsets[i], 0)
                hi = min(end - offsets[i], len(data))
                parts.append(data[lo:hi] if lo or hi < len(data) else data)
            out = b"".join(parts)
        self.counters.add("bytes_read", len(out))
        return out

    async def _get_many(self, wanted: list[ChunkMeta], blob: B3Digest) -> list[bytes]:
        """Several chunks, the missing ones fetched concurrently; the first failure is raised
        (after the other fetches finish, so what they fetched is kept)."""
        results: list[bytes] = [b""] * len(wanted)
        errors: list[Exception] = []

        async def one(i: int) -> None:
            try:
                results[i] = await self.buffer.get(wanted[i], blob)
            except Exception as e:
                errors.append(e)

        async with trio.open_nursery() as nursery:
            for i in range(len(wanted)):
                nursery.start_soon(one, i)
        if errors:
            raise errors[0]
        return results

    def _ahead(self, policy: ReadAhead, chunks: list[ChunkMeta], off: int, end: int, last: int, blob: B3Digest) -> None:
        """Act on the read-ahead policy's answer: hint `BlobService.prefetch` (non-blocking, so
        called on the loop) with the chunks it names, and fetch the next READAHEAD_CHUNKS into
        the LRU in the background."""
        ahead = policy.after(off, end)
        if not ahead.sequential:
            return
        self._read_ahead(chunks, last, blob)
        if ahead:
            todo = [c.digest for c in chunks[ahead.start : ahead.stop] if c.digest not in self.buffer]
            if todo:
                self.counters.add("prefetch_hints", len(todo))
                self.blobs.prefetch(todo)

    def _read_ahead(self, chunks: list[ChunkMeta], last: int, blob: B3Digest) -> None:
        if self._background is None:
            return
        for c in chunks[last + 1 : last + 1 + READAHEAD_CHUNKS]:
            if self._readaheads >= max(1, self.offload.limit // 2):
                return
            if c.digest in self.buffer or self.buffer.fetching(c.digest):
                continue
            self._readaheads += 1
            self.counters.add("readahead_chunks")
            self.counters.add("readahead_pending")
            self._background.start_soon(self._read_ahead_one, c, blob)

    async def _read_ahead_one(self, c: ChunkMeta, blob: B3Digest) -> None:
        try:
            await self.buffer.get(c, blob)
        except Exception as e:  # the reader that needs it will see (and log) the error
            log.debug("read-ahead of chunk %s failed: %s", c.digest.hex(), e)
        finally:
            self._readaheads -= 1
            self.counters.add("readahead_pending", -1)
