"""`CachedBlobService(near, far)`: a persistent, bounded, verifying chunk cache in front of a remote.

Policy (details and numbers in docs/cache.md):
- Local first: chunk lists and chunks are looked up in the cache directory (`near`) before
  the remote (`far`) is asked. Content-addressed data never goes stale, so a hit is final.
- The remote is never written by reads; `open_write`/`put` write through to the remote only
  (the remote chunks the blob; nothing is inserted into the cache by a write).
- No negative cache: "absent" answers are never remembered (the remote may get it later).
- Only verified data enters the cache: a chunk's bytes must hash to its digest; a chunk list
  must be well formed (`check_chunk_list`). Cached chunks are re-verified on every read from
  disk; a corrupt or truncated file is discarded and fetched again.
- Bound: `ChunkLRU` keeps chunk bytes on disk (each file counted rounded up to 4 KiB) within
  `cache_size` at every moment: room is made (least recently used first) before a chunk is
  written, a background thread keeps usage below a low watermark so writes rarely wait for
  that, and a chunk larger than the whole cache is served but not cached. Chunks are written
  behind the reader's back by one writer thread (served from memory until written). Recency persists
  across restarts as file mtimes (touched on every hit).
- Concurrency: concurrent misses for one chunk share one fetch (single flight); `prefetch`
  starts background fetches on a bounded pool and never blocks; a read of a chunk whose
  prefetch is still queued takes the fetch over instead of waiting behind the queue.
- Failure: every remote call goes through a `CircuitBreaker`: while the remote is down, misses
  fail at once with UnavailableError and prefetches are skipped; hits keep working.

Not here: the directory layout and locking (`tvix_store.cachedir`), Directories and PathInfos
(their own `cached` modules), the wiring (`tvix_store.cached`).
"""

from __future__ import annotations

import bisect
import logging
import os
import struct
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import BinaryIO, TypeVar

import blake3

from tvix_store.blobservice import BlobService, BlobWriter, ChunkedReader, ChunkMeta
from tvix_store.breaker import CircuitBreaker, guarded_call
from tvix_store.cachedir import CacheDir, CacheStats
from tvix_store.digest import EMPTY_DIGEST, B3Digest
from tvix_store.errors import IntegrityError, UnavailableError

log = logging.getLogger("tvix_store.cache")

T = TypeVar("T")

BLOCK = 4096
_META = struct.Struct(">32sQ")

#: chunks fetched but not yet written to the cache (bytes); a fetch waits when more are queued
WRITE_BEHIND_BYTES = 64 << 20
#: a background eviction pass starts above HIGH and stops at LOW (fractions of the bound)
HIGH_WATERMARK = 0.95
LOW_WATERMARK = 0.85


def disk_charge(size: int) -> int:
    """What a chunk of `size` bytes is charged against the bound: its size rounded up to 4 KiB."""
    return (size + BLOCK - 1) // BLOCK * BLOCK


def check_chunk_list(digest: B3Digest, chunks: list[ChunkMeta], expected_size: int | None = None) -> None:
    """Raise IntegrityError if a chunk list cannot be the blob `digest`'s (checks what can be
    checked without the bytes): the empty blob and only it has no chunks; no chunk is empty;
    a single chunk is the blob itself; the sizes add up to `expected_size` when it is known
    (from a FileNode). That the chunks' concatenation hashes to `digest` can only be checked by
    reading all of them (`CachedBlobService.open_read` does, on a sequential read to the end)."""
    what = f"chunk list of blob {digest.hex()}"
    if not chunks:
        if digest != EMPTY_DIGEST:
            raise IntegrityError(f"{what}: no chunks, but the blob is not the empty blob")
    elif digest == EMPTY_DIGEST:
        raise IntegrityError(f"{what}: the empty blob has {len(chunks)} chunks")
    for i, c in enumerate(chunks):
        if c.size <= 0:
            raise IntegrityError(f"{what}: chunk {i} ({c.digest.hex()}) has size {c.size}")
    if len(chunks) == 1 and chunks[0].digest != digest:
        raise IntegrityError(f"{what}: a single chunk {chunks[0].digest.hex()} that is not the blob itself")
    if expected_size is not None:
        total = sum(c.size for c in chunks)
        if total != expected_size:
            raise IntegrityError(f"{what}: chunk sizes add up to {total}, expected {expected_size}")


def encode_chunk_list(chunks: list[ChunkMeta]) -> bytes:
    return b"".join(_META.pack(bytes(c.digest), c.size) for c in chunks)


def decode_chunk_list(raw: bytes) -> list[ChunkMeta] | None:
    """The chunk list of a cache file, or None if the file is malformed."""
    if len(raw) % _META.size:
        return None
    return [ChunkMeta(B3Digest(d), s) for d, s in _META.iter_unpack(raw)]


class ChunkLRU:
    """The chunk files of a cache directory, with least-recently-used eviction under a hard bound.

    `get` re-verifies what it reads; `put` makes room first. Accounting (`used`) counts every
    chunk file on disk plus reservations for files being written, so the bound holds at every
    moment: a writer that finds the room held by concurrent writers or evictions in progress
    waits for them (≤ 1 s), then gives up caching rather than overshoot.
    """

    def __init__(self, cdir: CacheDir, limit: int | None, stats: CacheStats) -> None:
        self._dir = cdir
        self.limit = limit
        self._stats = stats
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._index: OrderedDict[B3Digest, int] = OrderedDict()  # digest -> charge, LRU first
        self.used = 0  # bytes of chunk files on disk + reservations of files being written
        self._pending = 0  # of which: victims taken from the index, not yet unlinked
        self._evicting: set[B3Digest] = set()  # those victims
        self._writing = 0  # of which: reservations of files being written
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._evictor: threading.Thread | None = None
        # write-behind: fetched chunks are written by one thread, off the readers' path
        self._wcond = threading.Condition()
        self._wq: deque[tuple[B3Digest, bytes]] = deque()
        self._wq_bytes = 0
        self._unwritten: dict[B3Digest, bytes] = {}
        self._writer: threading.Thread | None = None
        self._writer_busy = False
        if cdir.writable:
            self._scan()
            self._evict_to(self.limit if self.limit is not None else None)
            if self.limit is not None:
                self._evictor = threading.Thread(target=self._evict_loop, name="tvix-cache-evict", daemon=True)
                self._evictor.start()
        stats.set("cache_limit", -1 if limit is None else limit)
        self._publish()

    def _scan(self) -> None:
        found: list[tuple[int, B3Digest, int]] = []
        base = self._dir.root / "chunks"
        for sub in os.scandir(base):
            if not sub.is_dir():
                continue
            for e in os.scandir(sub.path):
                try:
                    st = e.stat()
                    d = B3Digest.from_hex(e.name)
                except (OSError, ValueError):
                    continue
                found.append((st.st_mtime_ns, d, disk_charge(st.st_size)))
        found.sort(key=lambda t: t[0])
        for _, d, charge in found:
            self._index[d] = charge
            self.used += charge

    def _publish(self) -> None:
        with self._lock:  # under the lock, so a stale value can never overwrite a newer one
            self._stats.set("cache_bytes", self.used)
            self._stats.set("cache_chunks", len(self._index))

    def _path(self, digest: B3Digest) -> str:
        h = digest.hex()
        return os.path.join(self._dir.root, "chunks", h[:2], h)

    def contains(self, digest: B3Digest) -> bool:
        if self._dir.writable:
            return digest in self._index or digest in self._unwritten
        return os.path.exists(self._path(digest))

    def put_later(self, digest: B3Digest, data: bytes) -> None:
        """Queue verified bytes for `put` by the writer thread (so a reader never waits for the
        disk); until written they are served from memory. Blocks only while more than
        WRITE_BEHIND_BYTES are queued."""
        if not self._dir.writable:
            return
        with self._wcond:
            if digest in self._unwritten or self._stop.is_set():
                return
            while self._wq and self._wq_bytes + len(data) > WRITE_BEHIND_BYTES and not self._stop.is_set():
                self._wcond.wait(1.0)
            self._unwritten[digest] = data
            self._wq.append((digest, data))
            self._wq_bytes += len(data)
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_loop, name="tvix-cache-write", daemon=True)
                self._writer.start()
            self._wcond.notify_all()

    def _write_loop(self) -> None:
        while True:
            with self._wcond:
                while not self._wq and not self._stop.is_set():
                    self._wcond.wait()
                if not self._wq:
                    return
                digest, data = self._wq.popleft()
                self._writer_busy = True
            try:
                self.put(digest, data)
            except Exception as e:  # a cache may miss; never lose the writer thread
                log.warning("cannot cache chunk %s: %s", digest.hex(), e)
            finally:
                with self._wcond:
                    self._unwritten.pop(digest, None)
                    self._wq_bytes -= len(data)
                    self._writer_busy = False
                    self._wcond.notify_all()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every queued chunk is written (or dropped); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._wcond:
            while self._wq or self._writer_busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._wcond.wait(left)
        return True

    def get(self, digest: B3Digest) -> bytes | None:
        """The verified bytes of a cached chunk, or None (absent, or corrupt and now discarded)."""
        data = self._unwritten.get(digest)
        if data is not None:
            return data
        path = self._path(digest)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            self._forget(digest)
            return None
        except OSError as e:
            log.warning("cannot read cached chunk %s: %s", digest.hex(), e)
            return None
        if B3Digest.of(data) != digest:
            log.error("cached chunk %s is corrupt (%d bytes): discarded, will fetch again", digest.hex(), len(data))
            self._stats.add("cache_corrupt")
            if self._dir.writable:
                try:
                    os.unlink(path)
                except OSError:
                    pass
                self._forget(digest)
            return None
        if self._dir.writable:
            with self._lock:
                if digest in self._index:
                    self._index.move_to_end(digest)
            try:
                os.utime(path)  # recency survives restarts
            except OSError:
                pass
        return data

    def _forget(self, digest: B3Digest) -> None:
        with self._lock:
            charge = self._index.pop(digest, None)
            if charge is not None:
                self.used -= charge
        if charge is not None:
            self._publish()

    def put(self, digest: B3Digest, data: bytes) -> bool:
        """Insert verified bytes (making room first); False if not cached (too big, read-only, I/O error)."""
        if not self._dir.writable:
            return False
        charge = disk_charge(len(data))
        victims: list[tuple[B3Digest, int]] = []
        with self._cond:
            # a chunk being evicted must be gone before it is written again (else the unlink
            # would remove the new file)
            deadline = time.monotonic() + 1.0
            while digest in self._evicting and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            if digest in self._index or digest in self._evicting:
                if digest in self._index:
                    self._index.move_to_end(digest)
                return digest in self._index
            if self.limit is not None:
                if charge > self.limit:
                    self._stats.add("cache_uncacheable")
                    return False
                deadline = time.monotonic() + 1.0
                while True:
                    freed = 0
                    while self.used - freed + charge > self.limit and self._index:
                        d, c = self._index.popitem(last=False)
                        victims.append((d, c))
                        freed += c
                    if self.used - freed + charge <= self.limit:
                        break
                    # the rest is held by concurrent writers or evictions in progress: put the
                    # victims back (still on disk) and wait for those to finish, never overshoot
                    for d, c in reversed(victims):
                        self._index[d] = c
                        self._index.move_to_end(d, last=False)
                    victims = []
                    left = deadline - time.monotonic()
                    if (self._pending or self._writing) and left > 0:
                        self._cond.wait(left)
                        continue
                    self._stats.add("cache_uncacheable")
                    return False
                self._pending += freed
                self._evicting.update(d for d, _ in victims)
            self.used += charge  # reservation for the file about to be written
            self._writing += charge
        self._unlink(victims)
        try:
            self._dir.write_atomic(self._path(digest), data, prefix="c-")
        except OSError as e:
            log.warning("cannot write chunk %s to the cache: %s", digest.hex(), e)
            with self._cond:
                self.used -= charge
                self._writing -= charge
                self._cond.notify_all()
            self._publish()
            return False
        with self._cond:
            self._writing -= charge
            if digest in self._index:  # a concurrent put of the same chunk won
                self.used -= charge
            else:
                self._index[digest] = charge
            over_high = self.limit is not None and self.used > self.limit * HIGH_WATERMARK
            self._cond.notify_all()
        self._publish()
        if over_high:
            self._wake.set()
        return True

    def _unlink(self, victims: list[tuple[B3Digest, int]]) -> None:
        """Remove victims popped from the index (and counted in `_pending`) from disk."""
        for d, c in victims:
            try:
                os.unlink(self._path(d))
            except FileNotFoundError:
                pass
            except OSError as e:  # still on disk: keep counting it (and remember it again)
                log.warning("cannot evict cached chunk %s: %s", d.hex(), e)
                with self._cond:
                    self._pending -= c
                    self._evicting.discard(d)
                    self._index[d] = c
                    self._index.move_to_end(d, last=False)
                    self._cond.notify_all()
                continue
            with self._cond:
                self.used -= c
                self._pending -= c
                self._evicting.discard(d)
                self._cond.notify_all()
            self._stats.add("cache_evictions")
        if victims:
            self._publish()

    def _evict_to(self, target: float | None) -> None:
        if target is None:
            return
        while True:
            with self._lock:
                if self.used <= target or not self._index:
                    return
                batch = []
                excess = self.used - target
                while excess > 0 and self._index and len(batch) < 256:
                    d, c = self._index.popitem(last=False)
                    batch.append((d, c))
                    excess -= c
                self._pending += sum(c for _, c in batch)
                self._evicting.update(d for d, _ in batch)
            self._unlink(batch)

    def _evict_loop(self) -> None:
        assert self.limit is not None
        while not self._stop.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            if self._stop.is_set():
                return
            if self.used > self.limit * HIGH_WATERMARK:
                self._evict_to(self.limit * LOW_WATERMARK)

    def close(self) -> None:
        if not self.flush(timeout=10):
            log.warning("cache close: %d chunks not written", len(self._wq))
        with self._wcond:
            self._stop.set()
            self._wq.clear()
            self._wcond.notify_all()
        self._wake.set()
        for t in (self._evictor, self._writer):
            if t is not None:
                t.join(timeout=1)


class _Flight:
    """One fetch of one chunk, shared by every reader that wants it meanwhile."""

    __slots__ = ("future", "started")

    def __init__(self) -> None:
        self.future: Future[bytes | None] = Future()
        self.started = False


class CachedBlobService(BlobService):
    """Chunk lists and chunks from `far`, kept in the cache directory `near` (see module docstring)."""

    def __init__(
        self,
        near: CacheDir,
        far: BlobService,
        *,
        cache_size: int | None,
        breaker: CircuitBreaker,
        stats: CacheStats | None = None,
        timeout: float = 10.0,
        prefetch_workers: int = 6,
        prefetch_queue: int = 64,
        ready_bytes: int = 64 << 20,
        readahead_bytes: int = 8 << 20,
        verify_far: bool | None = None,
    ) -> None:
        """`verify_far`: hash chunks `far` returns before caching them. By default only when `far`
        is not one of this package's backends: those honour the BlobService contract (bytes
        handed out are verified; the gRPC client hashes every chunk it receives), so hashing
        again would only cost time on the hot path."""
        self._near = near
        self._far = far
        self._breaker = breaker
        self.stats = stats or CacheStats()
        self._lru = ChunkLRU(near, cache_size, self.stats)
        self._wait_timeout = 3 * timeout + 5
        if verify_far is None:  # this package's backends honour the contract; anything else is checked
            verify_far = not type(far).__module__.startswith("tvix_store.")
        self._verify_far = verify_far
        self._lock = threading.Lock()
        self._flights: dict[B3Digest, _Flight] = {}
        self._queued = 0
        self._max_queued = prefetch_queue
        self._pool = ThreadPoolExecutor(max_workers=prefetch_workers, thread_name_prefix="tvix-prefetch")
        # verified chunks fetched by prefetch, waiting for their first read (saves a disk read + hash)
        self._ready: OrderedDict[B3Digest, bytes] = OrderedDict()
        self._ready_used = 0
        self._ready_max = ready_bytes
        self.readahead_bytes = readahead_bytes
        self._closed = False

    # --- chunk lists ---------------------------------------------------------------------

    def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        name = digest.hex()
        raw = self._near.get("blobs", name)
        if raw is not None:
            cs = decode_chunk_list(raw)
            try:
                if cs is None:
                    raise IntegrityError("malformed file")
                check_chunk_list(digest, cs)
            except IntegrityError as e:
                log.error("cached chunk list of %s is corrupt, discarded: %s", name, e)
                self.stats.add("cache_corrupt")
                self._near.discard("blobs", name)
            else:
                self.stats.add("meta_hits")
                return cs
        cs = self._remote(self._far.chunks, digest)
        if cs is None:
            return None
        try:
            check_chunk_list(digest, cs)
        except IntegrityError as e:
            self.stats.add("verify_failures")
            log.error("remote sent a bad chunk list for blob %s: %s", name, e)
            raise
        self.stats.add("meta_fetched")
        self._near.put("blobs", name, encode_chunk_list(cs))
        return cs

    # --- chunks --------------------------------------------------------------------------

    def read_chunk(self, digest: B3Digest) -> bytes | None:
        data = self._take_ready(digest)
        if data is not None:
            self.stats.add("prefetch_hits")
            self.stats.add("cache_hits")
            return data
        data = self._lru.get(digest)
        if data is not None:
            self.stats.add("cache_hits")
            return data
        self.stats.add("cache_misses")
        with self._lock:
            fl = self._flights.get(digest)
            if fl is None:
                fl = self._flights[digest] = _Flight()
                owner = True
            else:
                owner = not fl.started  # a queued prefetch: take it over
            if owner:
                fl.started = True
        if not owner:
            self.stats.add("single_flight_joins")
            try:
                return fl.future.result(timeout=self._wait_timeout)
            except FutureTimeout:
                raise UnavailableError(f"fetch of chunk {digest.hex()} did not finish in time") from None
        return self._run_flight(digest, fl, foreground=True)

    def _run_flight(self, digest: B3Digest, fl: _Flight, foreground: bool) -> bytes | None:
        try:
            # a concurrent flight may have filled the cache between our miss and our claim
            data = self._take_ready(digest) if foreground else None
            if data is None and self._lru.contains(digest):
                data = self._lru.get(digest)
            if data is None:
                data = self._fetch(digest)
        except BaseException as e:
            fl.future.set_exception(e)
            raise
        else:
            fl.future.set_result(data)
            return data
        finally:
            with self._lock:
                if self._flights.get(digest) is fl:
                    del self._flights[digest]

    def _fetch(self, digest: B3Digest) -> bytes | None:
        self.stats.add("in_flight")
        try:  # `in_flight` drops only once the counters of this fetch are final
            data = self._remote(self._far.read_chunk, digest)
            if data is None:
                return None
            if self._verify_far and B3Digest.of(data) != digest:
                self.stats.add("verify_failures")
                log.error("remote sent chunk %s with wrong bytes (%d bytes): rejected", digest.hex(), len(data))
                raise IntegrityError(f"chunk {digest.hex()} from the remote does not match its digest")
            self.stats.add("chunks_fetched")
            self.stats.add("bytes_fetched", len(data))
        finally:
            self.stats.add("in_flight", -1)
        self._lru.put_later(digest, data)
        return data

    def _remote(self, fn: Callable[..., T], *args: object) -> T:
        """Call the remote through the breaker (see `tvix_store.breaker.guarded_call`)."""
        return guarded_call(self._breaker, self.stats, "data", fn, *args)

    def _take_ready(self, digest: B3Digest) -> bytes | None:
        if not self._ready:
            return None
        with self._lock:
            data = self._ready.pop(digest, None)
            if data is not None:
                self._ready_used -= len(data)
            return data

    # --- prefetch ------------------------------------------------------------------------

    def prefetch(self, digests: list[B3Digest]) -> None:
        """Start background fetches of these chunks (bounded queue and pool); never blocks.
        Skips chunks cached, already in flight, or while the remote is down."""
        if self._closed or self._breaker.is_down:
            return
        for d in digests:
            if d in self._ready or self._lru.contains(d):
                continue
            with self._lock:
                if d in self._flights:
                    continue
                if self._queued >= self._max_queued:
                    self.stats.add("prefetch_dropped")
                    return
                fl = self._flights[d] = _Flight()
                self._queued += 1
            self.stats.add("prefetch_started")
            try:
                self._pool.submit(self._prefetch_one, d, fl)
            except RuntimeError:  # pool shut down
                with self._lock:
                    self._queued -= 1
                    self._flights.pop(d, None)
                return

    def _prefetch_one(self, digest: B3Digest, fl: _Flight) -> None:
        with self._lock:
            self._queued -= 1
            if fl.started:
                return
            fl.started = True
        if self._closed or self._breaker.is_down:
            fl.future.set_exception(UnavailableError("prefetch skipped: the remote is down"))
            with self._lock:
                if self._flights.get(digest) is fl:
                    del self._flights[digest]
            return
        try:
            data = self._run_flight(digest, fl, foreground=False)
        except Exception as e:  # the reader that wants it will see the error itself
            log.debug("prefetch of chunk %s failed: %s", digest.hex(), e)
            return
        if data is not None and len(data) <= self._ready_max:
            with self._lock:
                if digest not in self._ready:
                    self._ready[digest] = data
                    self._ready_used += len(data)
                while self._ready_used > self._ready_max:
                    _, old = self._ready.popitem(last=False)
                    self._ready_used -= len(old)

    # --- readers, writers, listing ---------------------------------------------------------

    def open_read(self, digest: B3Digest) -> BinaryIO | None:
        """A reader that prefetches ahead on sequential reads and, when the whole blob is read
        in order, checks that the chunks add up to `digest` before handing out the last bytes."""
        cs = self.chunks(digest)
        if cs is None:
            return None
        return _PrefetchingReader(self, digest, cs)

    def open_write(self) -> BlobWriter:
        """Write-through to the remote (nothing is cached by a write)."""
        return self._remote(self._far.open_write)

    def iter_digests(self) -> Iterator[B3Digest]:
        """Blobs whose chunk lists are cached (cheap); the remote's own listing is not asked."""
        out = []
        for name in self._near.names("blobs"):
            try:
                out.append(B3Digest.from_hex(name))
            except ValueError:
                continue
        return iter(out)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until the chunks fetched so far are written to the cache directory."""
        return self._lru.flush(timeout)

    def close(self) -> None:
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            for fl in self._flights.values():
                if not fl.started and not fl.future.done():
                    fl.future.set_exception(UnavailableError("cache closed"))
        self._lru.close()


class _PrefetchingReader(ChunkedReader):
    """`ChunkedReader` that asks for the chunks a `read(n)` covers all at once (fetched in
    parallel), reads ahead while reads continue where the last one ended, and checks the whole
    blob's digest when it was read in order from start to end."""

    def __init__(self, svc: CachedBlobService, digest: B3Digest, chunks: list[ChunkMeta]) -> None:
        super().__init__(svc, chunks)
        self._csvc = svc
        self._digest = digest
        self._last = -1  # last chunk index loaded
        self._hinted = -1  # highest chunk index passed to prefetch
        self._next_pos = 0  # where the previous read() ended
        self._run_start = 0  # where the current sequential run of read() calls started
        self._hasher: blake3.blake3 | None = blake3.blake3()
        self._failed: IntegrityError | None = None

    def read(self, size: int = -1) -> bytes:  # type: ignore[override]
        if self._failed is not None:
            raise self._failed
        pos = self._pos
        if size is None or size < 0:
            size = self._size - pos
        end = min(pos + size, self._size)
        if pos < end:
            if pos != self._next_pos:  # a seek: a new run
                self._run_start = pos
                self._hinted = -1
            window = self._csvc.readahead_bytes
            if self._run_start > 0:  # a run that began with a seek: grow with what it read
                window = min(window, 2 * (pos - self._run_start))
            self._hint(pos, end, window)
        try:
            return super().read(size)
        finally:
            self._next_pos = self._pos

    def _hint(self, pos: int, end: int, window: int) -> None:
        first = bisect.bisect_right(self._offsets, pos) - 1
        last = bisect.bisect_right(self._offsets, end - 1) - 1
        j = last + 1
        ahead = 0
        while j < len(self._chunks) and ahead < window:
            ahead += self._chunks[j].size
            j += 1
        start = max(first + 1, self._hinted + 1)  # the first chunk is read right away
        if start < j:
            self._hinted = j - 1
            self._csvc.prefetch([c.digest for c in self._chunks[start:j]])

    def _chunk_at(self, idx: int) -> bytes:
        if self._failed is not None:
            raise self._failed
        data = super()._chunk_at(idx)
        if idx != self._last:
            if self._hasher is not None and idx == self._last + 1:
                self._hasher.update(data)
                if idx == len(self._chunks) - 1:
                    got = B3Digest(self._hasher.digest())
                    self._hasher = None
                    if got != self._digest:
                        self._csvc.stats.add("verify_failures")
                        log.error("chunks of blob %s add up to %s: chunk list is wrong", self._digest.hex(), got.hex())
                        self._cur = None
                        self._failed = IntegrityError(f"chunks of blob {self._digest.hex()} do not add up to the blob")
                        raise self._failed
            else:
                self._hasher = None
            self._last = idx
        return data
