"""BlobService of the on-disk store (`local:///path`): content-defined chunks in files.

Files and their format are described in `tvix_store.local` (this module only uses
`StoreDir`). Not a cache and not remote-aware.

- `open_write()` cuts the stream into content-defined chunks (`tvix_store.chunker`) as
  it arrives, hashes each chunk and the whole blob (BLAKE3), skips chunks already
  stored (deduplication) and stages new ones in `tmp/`. `close()` renames the staged
  chunks into `chunks/`, then writes the blob record if there is more than one chunk.
  Memory per writer: at most one unfinished chunk (≤ 1 MiB) plus the chunk list.
- `chunks(d)`: a chunk file answers itself, a blob record its list, else None.
- `read_chunk(d)`: a chunk file's bytes, verified against `d` every time. For the digest
  of a multi-chunk blob it returns the whole blob (each chunk verified; meant for small
  blobs, read big ones chunk by chunk or with `open_read`).
- `iter_digests()` lists the blobs that were written: every multi-chunk blob, and every
  chunk that is not part of one (a one-chunk blob). Chunks of multi-chunk blobs are
  still blobs (look-up and read work), they are just not listed.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import blake3

from tvix_store.blobservice import BlobService, BlobWriter, ChunkMeta
from tvix_store.chunker import DEFAULT, Chunker, ChunkParams
from tvix_store.digest import B3Digest
from tvix_store.errors import StoreError
from tvix_store.local import StoreDir, b3, check_digest, decode_record, encode_record

_AUTO = blake3.blake3.AUTO


class LocalBlobService(BlobService):
    """Blobs of a store directory. Thread-safe (no shared mutable state besides the files)."""

    def __init__(self, sd: StoreDir, params: ChunkParams = DEFAULT) -> None:
        self._sd = sd
        self.params = params

    def _record(self, digest: B3Digest) -> list[tuple[B3Digest, int]] | None:
        hexd = digest.hex()
        raw = self._sd.read(self._sd.path("blobs", hexd))
        return None if raw is None else decode_record(raw, hexd)

    def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        digest = B3Digest(digest)
        try:
            st = os.stat(self._sd.path("chunks", digest.hex()))
        except FileNotFoundError:
            rec = self._record(digest)
            return None if rec is None else [ChunkMeta(d, s) for d, s in rec]
        return [ChunkMeta(digest, st.st_size)]

    def advise(self, digests: list[B3Digest]) -> None:
        """Ask the kernel to read these chunk files into the page cache (POSIX_FADV_WILLNEED),
        from a background thread, so cold reads of many small files overlap their disk I/O.
        Dropped when _MAX_ADVISED files are already waiting (bounded; never blocks)."""
        global _advised
        with _pool_lock:
            if _advised + len(digests) > _MAX_ADVISED or not digests:
                return
            _advised += len(digests)
        paths = [self._sd.path("chunks", d.hex()) for d in digests]
        pool = _advise_pool()
        for i in range(0, len(paths), 16):  # small batches, so the threads share big directories
            pool.submit(_willneed, paths[i : i + 16])

    def read_chunk(self, digest: B3Digest) -> bytes | None:
        digest = B3Digest(digest)
        data = self._sd.read_verified("chunks", digest)
        if data is not None:
            return data
        rec = self._record(digest)
        if rec is None:
            return None
        parts = []
        for cd, _size in rec:
            part = self._sd.read_verified("chunks", cd)
            if part is None:
                raise StoreError(f"chunk {cd.hex()} of blob {digest.hex()} is missing from the store")
            parts.append(part)
        out = b"".join(parts)
        check_digest("blob", digest, out)
        return out

    def open_write(self) -> BlobWriter:
        return LocalBlobWriter(self._sd, self.params)

    def iter_digests(self) -> Iterator[B3Digest]:
        in_records: set[bytes] = set()
        for name in self._sd.iter_names("blobs"):
            raw = self._sd.read(self._sd.path("blobs", name))
            if raw is None:
                continue
            try:
                in_records.update(d for d, _ in decode_record(raw, name))
                yield B3Digest.from_hex(name)
            except StoreError:
                continue
        for name in self._sd.iter_names("chunks"):
            try:
                d = B3Digest.from_hex(name)
            except StoreError:
                continue
            if d not in in_records:
                yield d


_pool: ThreadPoolExecutor | None = None
_pool_pid = 0
_pool_lock = threading.Lock()
_MAX_INFLIGHT = 6  # chunks handed to the pool per writer (bounds memory: ≤ 6 MiB)


_advise: ThreadPoolExecutor | None = None
_advise_pid = 0
_advised = 0  # files hinted and not yet handled
_MAX_ADVISED = 4096
_ADVISE_THREADS = 4


def _advise_pool() -> ThreadPoolExecutor:
    """Threads that issue read-ahead hints (`LocalBlobService.advise`): several at once keep
    the disk's queue full while the reader waits on one file at a time."""
    global _advise, _advise_pid
    with _pool_lock:
        if _advise is None or _advise_pid != os.getpid():
            _advise = ThreadPoolExecutor(max_workers=_ADVISE_THREADS, thread_name_prefix="tvix-advise")
            _advise_pid = os.getpid()
        return _advise


def _willneed(paths: list[str]) -> None:
    global _advised
    try:
        for p in paths:
            try:
                fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue  # not a single-chunk blob, or absent: nothing to warm
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)
    finally:
        with _pool_lock:
            _advised -= len(paths)


def _chunk_pool() -> ThreadPoolExecutor:
    """Threads that hash and write chunks while the writer's thread chunks the next bytes."""
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():  # a forked child has none of the parent's threads
            _pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tvix-chunk-writer")
            _pool_pid = os.getpid()
        return _pool


_Stored = tuple[bytes, int, str | None, str]  # (digest, size, staged temp path or None, final path)


def _store_chunk(sd: StoreDir, chunk: bytes | bytearray | memoryview) -> _Stored:
    digest = b3(chunk)
    final = sd.path("chunks", digest.hex())
    if os.path.exists(final):
        return digest, len(chunk), None, final  # deduplicated: already stored
    return digest, len(chunk), sd.write_tmp(chunk), final


class LocalBlobWriter(BlobWriter):
    """Streams one blob into a store directory (see the module docstring). One thread at a time.

    Chunk hashing and writing run in a small shared thread pool (BLAKE3 and os.write release
    the GIL), at most `_MAX_INFLIGHT` chunks ahead; results are collected in order.
    """

    def __init__(self, sd: StoreDir, params: ChunkParams) -> None:
        self._sd = sd
        self._chunker = Chunker(params)
        self._hasher = blake3.blake3(max_threads=_AUTO)
        self._pending = bytearray()
        self._inflight: deque[Future[_Stored]] = deque()
        self._chunks: list[tuple[bytes, int]] = []
        self._staged: list[tuple[str, str]] = []  # (temp path, final path)
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
        self._inflight.append(_chunk_pool().submit(_store_chunk, self._sd, chunk))
        while len(self._inflight) > _MAX_INFLIGHT:
            self._collect(self._inflight.popleft().result())

    def _collect(self, res: _Stored) -> None:
        digest, size, tmp, final = res
        self._chunks.append((digest, size))
        if tmp is not None:
            self._staged.append((tmp, final))

    def close(self) -> B3Digest:
        if self._digest is not None:
            return self._digest
        if self._aborted:
            raise ValueError("close of an aborted blob writer")
        try:
            if self._pending:
                if not self._inflight and not self._chunks:
                    self._collect(_store_chunk(self._sd, self._pending))  # a small blob: no thread hop
                else:
                    self._emit(self._pending)
                self._pending = bytearray()
            while self._inflight:
                self._collect(self._inflight.popleft().result())
            sd = self._sd
            for tmp, final in self._staged:
                sd.publish(tmp, final)
            sd.sync_dirs({final for _, final in self._staged})
            self._staged = []
            digest = B3Digest(self._hasher.digest())
            if len(self._chunks) != 1:
                sd.write_atomic(sd.path("blobs", digest.hex()), encode_record(self._chunks))
            elif self._chunks[0][0] != digest:  # pragma: no cover - a one-chunk blob is its chunk
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
        for tmp, _ in self._staged:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        self._staged = []
        self._pending = bytearray()

    def __del__(self) -> None:
        if (
            self._digest is None
            and not self._aborted
            and (getattr(self, "_staged", None) or getattr(self, "_inflight", None))
        ):
            self.abort()
