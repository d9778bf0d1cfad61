"""The BlobService interface: blobs (file contents) and their content-defined chunks.

Backends are sibling modules: `memory`, `objects` (over any `ObjectStore`: the embedded store,
a cache's near side), `grpc` (client of a remote), `cached` (a combinator of two services).
`tvix_store.compose` builds them from URLs. Every backend passes `tests/test_contract.py`.

Contract (all backends):
- A blob and a chunk are both addressed by the BLAKE3-256 of their bytes. Every chunk
  is itself a readable blob; `chunks(d)` of a chunk answers at least itself.
- `chunks(d)` is `None` when `d` is absent (not-found is a value); `[]` only for the
  empty blob. The concatenation of the chunks is the blob, so the blob's size is the
  sum of their sizes. A backend with no finer chunking answers `[ChunkMeta(d, size)]`.
- Bytes handed out (`read_chunk`, readers) are verified against their digest; a
  mismatch raises `IntegrityError` and no byte of the bad chunk is returned.
- A writer makes its blob visible only on `close()`, complete and with the digest it
  returns; an aborted writer (exception, `abort()`) stores nothing visible.
- `capabilities` declares what callers may rely on (`tvix_store.core.capabilities`).
- Methods are blocking and thread-safe; async callers (FUSE) run them in threads.
"""

from __future__ import annotations

import io
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import BinaryIO

from tvix_store.core.capabilities import LOCAL, Capabilities
from tvix_store.core.chunks import ChunkMeta, chunk_offsets
from tvix_store.core.digest import B3Digest, Hasher, new_hasher
from tvix_store.core.errors import IntegrityError, NotFoundError, StoreError, UnavailableError
from tvix_store.readahead import ReadAhead


class BlobWriter(ABC):
    """Accepts a blob's bytes; `close()` commits it and returns its digest.

    Use as a context manager: leaving the block by an exception aborts the write.
    """

    @abstractmethod
    def write(self, data: bytes | memoryview) -> int: ...

    @abstractmethod
    def close(self) -> B3Digest:
        """Commit the blob (idempotent: a second call returns the same digest)."""

    @abstractmethod
    def abort(self) -> None:
        """Drop everything written; nothing becomes visible."""

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()


class BlobService(ABC):
    """Store and retrieve blobs by BLAKE3 digest. See the module docstring for the contract."""

    capabilities: Capabilities = LOCAL

    @abstractmethod
    def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        """The blob's chunks in order, or None if the store does not have it."""

    @abstractmethod
    def read_chunk(self, digest: B3Digest) -> bytes | None:
        """The verified bytes of one chunk (or of a whole small blob), or None if absent.

        Raises IntegrityError if stored/fetched bytes do not hash to `digest`.
        """

    @abstractmethod
    def open_write(self) -> BlobWriter:
        """A writer for a new blob."""

    def has(self, digest: B3Digest) -> bool:
        return self.chunks(digest) is not None

    def read_many(self, digests: Sequence[B3Digest]) -> Iterator[tuple[B3Digest, bytes | None | StoreError]]:
        """`read_chunk` of many, each answered once, in any order (as they complete):
        `(digest, bytes)`, `(digest, None)` if absent, `(digest, error)` if that one failed. A
        backend that can keep many reads in flight does (a remote: about one round trip for the
        batch, not one each). An unavailable remote ends the iteration with UnavailableError."""
        for d in digests:
            try:
                yield d, self.read_chunk(d)
            except UnavailableError:
                raise
            except StoreError as e:
                yield d, e

    def has_many(self, digests: Sequence[B3Digest]) -> list[bool]:
        """`has` of many (a remote keeps the calls in flight together)."""
        return [self.has(d) for d in digests]

    def put_many(self, blobs: Sequence[bytes]) -> list[B3Digest]:
        """`put` of many blobs held in memory (a remote keeps the uploads in flight together)."""
        return [self.put(b) for b in blobs]

    def size(self, digest: B3Digest) -> int | None:
        cs = self.chunks(digest)
        return None if cs is None else sum(c.size for c in cs)

    def open_read(self, digest: B3Digest) -> BinaryIO | None:
        """A seekable reader over the blob (or chunk), fetching chunks as it goes; None if absent."""
        cs = self.chunks(digest)
        if cs is None:
            return None
        return ChunkedReader(self, cs, digest)

    def put(self, data: bytes) -> B3Digest:
        """Store `data` as one blob; returns its digest."""
        with self.open_write() as w:
            w.write(data)
        return w.close()

    def put_chunk(self, digest: B3Digest, data: bytes, *, verified: bool = False) -> bool:
        """Keep one chunk fetched elsewhere (`capabilities.accepts_chunks`); `data` must hash to
        `digest` (checked here unless `verified` says the caller did). True if newly stored."""
        raise StoreError(f"{type(self).__name__} does not take chunks fetched elsewhere")

    def put_chunk_list(self, digest: B3Digest, chunks: list[ChunkMeta]) -> None:
        """Keep the chunk list of a blob fetched elsewhere (`capabilities.accepts_chunks`); its
        chunks need not be present (a cache fetches them lazily)."""
        raise StoreError(f"{type(self).__name__} does not take chunk lists fetched elsewhere")

    def delete(self, digest: B3Digest) -> None:
        """Forget a blob (its chunk list, or the chunk itself); chunks shared by others stay."""
        raise StoreError(f"{type(self).__name__} cannot delete")

    def prefetch(self, digests: list[B3Digest]) -> None:
        """Hint: these chunks will be read soon. Backends with a cache may start fetching them
        in the background (bounded); must not block. Default: ignore."""

    def advise(self, digests: list[B3Digest]) -> None:
        """Hint: these blobs may be read soon (e.g. the files of a directory just listed).
        Unlike `prefetch`, only backends for which acting is free of network traffic act on
        it (local disk read-ahead); must not block. Default: ignore."""

    def available(self) -> bool:
        """False while the backend is known to be unreachable (a remote that is down)."""
        return True

    def iter_digests(self) -> Iterator[B3Digest]:
        """The blobs this backend can enumerate cheaply (may be none, e.g. a remote)."""
        return iter(())

    def close(self) -> None:
        """Release resources (connections, files)."""


class ChunkedReader(io.RawIOBase):
    """A seekable, read-only stream over a blob, chunk by chunk via `read_chunk`.

    Keeps one decoded chunk. A `read(n)` asks the service to prefetch every further chunk it
    covers, and the chunks the read-ahead policy (`tvix_store.readahead`) names while reads
    are sequential. With `verify_whole`, a blob read in order from its start to its end is
    hashed as it goes, and a mismatch with `digest` (a chunk list that lies) raises
    IntegrityError before the last chunk's bytes are returned; the reader then stays failed.
    """

    def __init__(
        self, service: BlobService, chunks: list[ChunkMeta], digest: B3Digest, *, verify_whole: bool = False
    ) -> None:
        super().__init__()
        self._svc = service
        self._chunks = chunks
        self._digest = digest
        self._offsets, self._size = chunk_offsets(chunks)
        self._ahead = ReadAhead(chunks, offsets=self._offsets)
        self._pos = 0
        self._cur: tuple[int, bytes] | None = None
        self._last = -1  # index of the last chunk loaded
        self._hasher: Hasher | None = new_hasher() if verify_whole else None
        self._failed: IntegrityError | None = None

    @property
    def size(self) -> int:
        return self._size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        pos = base + offset
        if pos < 0:
            raise ValueError("negative seek position")
        self._pos = pos
        return pos

    def _chunk_at(self, idx: int) -> bytes:
        if self._failed is not None:
            raise self._failed
        if self._cur is not None and self._cur[0] == idx:
            return self._cur[1]
        meta = self._chunks[idx]
        data = self._svc.read_chunk(meta.digest)
        if data is None:
            raise NotFoundError(f"chunk {meta.digest.hex()} of blob {self._digest.hex()} is missing")
        if len(data) != meta.size:
            raise IntegrityError(f"chunk {meta.digest.hex()} has {len(data)} bytes, chunk list says {meta.size}")
        if self._hasher is not None:
            if idx == self._last + 1:
                self._hasher.update(data)
                if idx == len(self._chunks) - 1 and self._hasher.digest() != self._digest:
                    self._hasher = None
                    self._failed = IntegrityError(
                        f"chunks of blob {self._digest.hex()} do not add up to the blob: its chunk list is wrong"
                    )
                    raise self._failed
            else:
                self._hasher = None  # not read in order: the whole cannot be checked
        self._last = idx
        self._cur = (idx, data)
        return data

    def readinto(self, buf: bytearray | memoryview) -> int:  # type: ignore[override]
        if self._pos >= self._size or not len(buf):
            return 0
        idx = self._ahead.index(self._pos)
        data = self._chunk_at(idx)
        start = self._pos - self._offsets[idx]
        n = min(len(buf), len(data) - start)
        buf[:n] = data[start : start + n]
        self._pos += n
        return n

    def read(self, size: int = -1) -> bytes:  # type: ignore[override]
        if self._failed is not None:
            raise self._failed
        if size is None or size < 0:
            size = self._size - self._pos
        end = min(self._pos + size, self._size)
        if end > self._pos:
            first = self._ahead.index(self._pos)
            covered = self._ahead.index(end - 1)
            ahead = self._ahead.after(self._pos, end)
            stop = max(covered + 1, ahead.stop)
            if stop > first + 1:  # the chunks after the one read right away
                self._svc.prefetch([c.digest for c in self._chunks[first + 1 : stop]])
        out = bytearray()
        while len(out) < size and self._pos < self._size:
            b = bytearray(min(size - len(out), 1 << 20))
            n = self.readinto(b)
            out += b[:n]
        return bytes(out)
