"""`CachedBlobService(near, far)`: chunk lists and chunks from `far`, kept in `near`.

`near` is an ordinary BlobService that takes chunks fetched elsewhere
(`capabilities.accepts_chunks`): for `--cache-dir`, an `ObjectBlobService` over a
`BoundedObjectStore` (the bound, LRU eviction and persistence are the object layer's); in tests
and for scratch use a `MemoryBlobService`. `far` is any BlobService: the gRPC client today, a
bucket tomorrow.

Policy (docs/cache.md):
- Local first: chunk lists and chunks are looked up in `near` before `far` is asked.
  Content-addressed data never goes stale, so a hit is final.
- `far` is never written by reads; `open_write`/`put` write through to `far` only (it chunks
  the blob; nothing is inserted into `near` by a write).
- No negative cache: "absent" answers are never remembered (`far` may get it later).
- Only verified data enters `near`: a chunk's bytes must hash to its digest (hashed here unless
  `far.capabilities.verifies_reads`); a chunk list must pass `check_chunk_list`. `near`
  re-verifies on every read; an entry that fails is discarded (`near.delete`), counted
  (`cache_corrupt`) and fetched again.
- Write-behind: a fetched chunk is handed to the reader at once and queued for one writer
  thread (at most `WRITE_BEHIND_BYTES`; a fetch waits when more is queued); until written it
  is served from memory. So a reader never waits for the disk.
- Concurrency: concurrent misses for one chunk share one fetch (`tvix_store.util.singleflight`);
  `prefetch` queues background fetches (FIFO, bounded) and never blocks; a few workers fetch
  the queue in batches, each batch with one `far.read_many` (a remote keeps the whole batch
  in flight: one round trip for many chunks, not one each); a read of a chunk whose prefetch
  is still queued takes the fetch over instead of waiting behind the queue. Prefetched chunks
  are kept in memory (≤ `ready_bytes`) until their first read.
- Failure: while `far` is down (`far.available()` False) prefetch hints are ignored and
  misses fail fast (the remote's breaker); hits keep working.

Counters: `chunks_fetched`, `bytes_fetched`, `cache_hits`, `cache_misses`, `prefetch_hits`,
`prefetch_started`, `prefetch_dropped`, `prefetch_skipped` (the remote was down),
`prefetch_failed`, `single_flight_joins`, `verify_failures`,
`cache_corrupt`, `in_flight`, `meta_hits`, `meta_fetched`; and two gauges that say when the
background work is done: `prefetch_pending` (prefetches queued or running), `write_pending`
(fetched chunks not yet written to `near`).

Not here: Directories and PathInfos (their own `cached` modules), the bound (the object layer),
the wiring (`tvix_store.compose`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO, TypeVar

from tvix_store.blobservice import BlobService, BlobWriter, ChunkedReader
from tvix_store.core.capabilities import Capabilities
from tvix_store.core.chunks import ChunkMeta, check_chunk_list
from tvix_store.core.digest import B3Digest, blake3_of
from tvix_store.core.errors import IntegrityError, NotFoundError, StoreError, UnavailableError
from tvix_store.util.counters import Counters
from tvix_store.util.singleflight import Flight, SingleFlight

log = logging.getLogger("tvix_store.cache")

T = TypeVar("T")

#: chunks fetched but not yet written to `near` (bytes); a fetch waits when more are queued
WRITE_BEHIND_BYTES = 64 << 20

COUNTER_NAMES = (
    "chunks_fetched",
    "bytes_fetched",
    "cache_hits",
    "cache_misses",
    "prefetch_hits",
    "prefetch_started",
    "prefetch_dropped",
    "prefetch_skipped",
    "prefetch_failed",
    "single_flight_joins",
    "verify_failures",
    "cache_corrupt",
    "in_flight",
    "meta_hits",
    "meta_fetched",
    "prefetch_pending",
    "write_pending",
)


def far_call(counters: Counters, what: str, fn: Callable[..., T], *args: object) -> T:
    """Call `far`: data that fails verification there is counted (`verify_failures`) and logged
    naming `what`. (Deadlines and fail-fast are the remote's own: `tvix_store.remote`.)"""
    try:
        return fn(*args)
    except IntegrityError as e:
        counters.add("verify_failures")
        log.error("remote %s failed verification: %s", what, e)
        raise


class _WriteBehind:
    """Verified chunks queued for `near.put_chunk` by one writer thread, served from memory
    until written; at most `limit` bytes queued (`put` waits for room)."""

    def __init__(self, near: BlobService, counters: Counters, limit: int = WRITE_BEHIND_BYTES) -> None:
        self._near = near
        self._counters = counters
        self._limit = limit
        self._cond = threading.Condition()
        self._queue: deque[tuple[B3Digest, bytes]] = deque()
        self._bytes = 0
        self.unwritten: dict[B3Digest, bytes] = {}
        self._thread: threading.Thread | None = None
        self._busy = False
        self._stop = False

    def put(self, digest: B3Digest, data: bytes) -> None:
        with self._cond:
            if digest in self.unwritten or self._stop:
                return
            while self._queue and self._bytes + len(data) > self._limit and not self._stop:
                self._cond.wait(1.0)
            self.unwritten[digest] = data
            self._queue.append((digest, data))
            self._bytes += len(data)
            self._counters.add("write_pending")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="tvix-cache-write", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stop:
                    self._cond.wait()
                if not self._queue:
                    return
                digest, data = self._queue.popleft()
                self._busy = True
            try:
                self._near.put_chunk(digest, data, verified=True)
            except Exception as e:  # a cache may miss; never lose the writer thread
                log.warning("cannot cache chunk %s: %s", digest.hex(), e)
            finally:
                with self._cond:
                    self.unwritten.pop(digest, None)
                    self._bytes -= len(data)
                    self._busy = False
                    self._counters.add("write_pending", -1)
                    self._cond.notify_all()

    def flush(self, timeout: float) -> bool:
        """Wait until everything queued is written (or dropped); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self) -> None:
        if not self.flush(10.0):
            log.warning("cache close: %d chunks not written", len(self._queue))
        with self._cond:
            self._stop = True
            self._counters.add("write_pending", -len(self._queue))
            self._queue.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=1)


class CachedBlobService(BlobService):
    """`far` behind `near` (see the module docstring)."""

    def __init__(
        self,
        near: BlobService,
        far: BlobService,
        *,
        counters: Counters | None = None,
        timeout: float = 10.0,
        prefetch_workers: int = 4,
        prefetch_queue: int = 4096,
        batch: int = 16,
        ready_bytes: int = 64 << 20,
    ) -> None:
        """`timeout`: the remote's call deadline (bounds how long a reader waits for a fetch
        another reader started: `3 × timeout + 5 s`)."""
        if not near.capabilities.accepts_chunks:
            raise StoreError(f"{type(near).__name__} cannot be the near side of a cache (it takes no chunks)")
        self.near = near
        self.far = far
        self.capabilities = Capabilities(is_remote=far.capabilities.is_remote, can_list=False)
        self.counters = counters if counters is not None else Counters()
        self.counters.declare(COUNTER_NAMES)
        self._wait_timeout = 3 * timeout + 5
        self._verify_far = not far.capabilities.verifies_reads
        self._lock = threading.Lock()
        self._flights: SingleFlight[B3Digest, bytes | None] = SingleFlight(
            on_join=lambda: self.counters.add("single_flight_joins")
        )
        self._queue: deque[tuple[B3Digest, Flight[bytes | None]]] = deque()
        self._max_queued = prefetch_queue
        self._batch = batch
        self._workers = 0
        self._max_workers = prefetch_workers
        self._pool = ThreadPoolExecutor(max_workers=prefetch_workers, thread_name_prefix="tvix-prefetch")
        self._writes = _WriteBehind(near, self.counters)
        # verified chunks fetched by prefetch, waiting for their first read (saves a disk read + hash)
        self._ready: OrderedDict[B3Digest, bytes] = OrderedDict()
        self._ready_used = 0
        self._ready_max = ready_bytes
        self._closed = False

    def _corrupt(self, digest: B3Digest, e: IntegrityError) -> None:
        log.error("cached copy of %s is corrupt, discarded (will fetch again): %s", digest.hex(), e)
        self.counters.add("cache_corrupt")
        try:
            self.near.delete(digest)
        except StoreError as err:
            log.warning("cannot discard corrupt cache entry %s: %s", digest.hex(), err)

    # --- chunk lists -----------------------------------------------------------------------

    def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        try:
            cs = self.near.chunks(digest)
        except IntegrityError as e:
            self._corrupt(digest, e)
            cs = None
        if cs is not None:
            self.counters.add("meta_hits")
            return cs
        cs = far_call(self.counters, "chunk list", self.far.chunks, digest)
        if cs is None:
            return None
        try:
            check_chunk_list(digest, cs)
        except IntegrityError as e:
            self.counters.add("verify_failures")
            log.error("remote sent a bad chunk list for blob %s: %s", digest.hex(), e)
            raise
        self.counters.add("meta_fetched")
        try:
            self.near.put_chunk_list(digest, cs)
        except (StoreError, OSError) as e:
            log.warning("cannot cache the chunk list of %s: %s", digest.hex(), e)
        return cs

    # --- chunks ----------------------------------------------------------------------------

    def _local(self, digest: B3Digest) -> bytes | None:
        """The chunk from memory or `near`, or None (a corrupt entry is discarded: a miss)."""
        data = self._writes.unwritten.get(digest)
        if data is not None:
            return data
        try:
            return self.near.read_chunk(digest)
        except NotFoundError:
            return None  # a cached chunk list whose chunks are not (all) cached
        except IntegrityError as e:
            self._corrupt(digest, e)
            return None

    def read_chunk(self, digest: B3Digest) -> bytes | None:
        data = self._take_ready(digest)
        if data is not None:
            self.counters.add("prefetch_hits")
            self.counters.add("cache_hits")
            return data
        data = self._local(digest)
        if data is not None:
            self.counters.add("cache_hits")
            return data
        self.counters.add("cache_misses")
        fl, owner = self._flights.claim(digest)
        if not owner:
            try:
                return fl.future.result(timeout=self._wait_timeout)
            except TimeoutError:
                raise UnavailableError(f"fetch of chunk {digest.hex()} did not finish in time") from None
        return self._run_flight(digest, fl, foreground=True)

    def _run_flight(self, digest: B3Digest, fl: Flight[bytes | None], foreground: bool) -> bytes | None:
        try:
            # a concurrent flight may have filled the cache between our miss and our claim
            data = self._take_ready(digest) if foreground else None
            if data is None:
                data = self._local(digest)
            if data is None:
                data = self._fetch(digest)
        except BaseException as e:
            self._flights.finish(digest, fl, error=e)
            raise
        self._flights.finish(digest, fl, data)
        return data

    def _fetch(self, digest: B3Digest) -> bytes | None:
        self.counters.add("in_flight")
        try:  # `in_flight` drops only once the counters of this fetch are final
            data = far_call(self.counters, "data", self.far.read_chunk, digest)
            return self._accept(digest, data)
        finally:
            self.counters.add("in_flight", -1)

    def _accept(self, digest: B3Digest, data: bytes | None) -> bytes | None:
        """Check what `far` answered for `digest` (IntegrityError if wrong), count it, queue it
        for `near`."""
        if data is None:
            return None
        if self._verify_far and blake3_of(data) != digest:
            self.counters.add("verify_failures")
            log.error("remote sent chunk %s with wrong bytes (%d bytes): rejected", digest.hex(), len(data))
            raise IntegrityError(f"chunk {digest.hex()} from the remote does not match its digest")
        self.counters.add("chunks_fetched")
        self.counters.add("bytes_fetched", len(data))
        self._writes.put(digest, data)
        return data

    def _take_ready(self, digest: B3Digest) -> bytes | None:
        if not self._ready:
            return None
        with self._lock:
            data = self._ready.pop(digest, None)
            if data is not None:
                self._ready_used -= len(data)
            return data

    # --- prefetch --------------------------------------------------------------------------

    def prefetch(self, digests: list[B3Digest]) -> None:
        """Queue background fetches of these chunks, in this order (FIFO, at most
        `prefetch_queue` queued); never blocks. Skips chunks cached, already queued or in
        flight, and everything while `far` is down. Up to `prefetch_workers` batches of up to
        `batch` chunks are fetched at once, each with one `far.read_many` (a remote keeps the
        whole batch in flight)."""
        if self._closed or not self.far.available():
            return
        start = False
        for d in digests:
            if d in self._ready or d in self._writes.unwritten or d in self._flights or self.near.has(d):
                continue
            with self._lock:
                if len(self._queue) >= self._max_queued:
                    self.counters.add("prefetch_dropped")
                    break
                fl, owner = self._flights.claim(d, start=False)
                if not owner:
                    continue
                self._queue.append((d, fl))
                self.counters.add("prefetch_started")
                self.counters.add("prefetch_pending")
                if self._workers < self._max_workers:
                    self._workers += 1
                    start = True
            if start:
                start = False
                try:
                    self._pool.submit(self._prefetch_loop)
                except RuntimeError:  # pool shut down
                    with self._lock:
                        self._workers -= 1
                    return

    def _next_batch(self) -> list[tuple[B3Digest, Flight[bytes | None]]]:
        """Up to `batch` queued flights nobody took over; empty when the queue is (the worker ends)."""
        with self._lock:
            batch: list[tuple[B3Digest, Flight[bytes | None]]] = []
            while self._queue and len(batch) < self._batch:
                d, fl = self._queue.popleft()
                if self._flights.start(d, fl):
                    batch.append((d, fl))
                else:
                    self.counters.add("prefetch_pending", -1)  # a reader took it over
            if not batch:
                self._workers -= 1
            return batch

    def _prefetch_loop(self) -> None:
        while batch := self._next_batch():
            try:
                self._prefetch_batch(batch)
            finally:
                self.counters.add("prefetch_pending", -len(batch))

    def _prefetch_batch(self, batch: list[tuple[B3Digest, Flight[bytes | None]]]) -> None:
        todo: dict[B3Digest, Flight[bytes | None]] = {}
        for d, fl in batch:  # filled meanwhile (a reader fetched it)?
            data = self._local(d)
            if data is not None:
                self._flights.finish(d, fl, data)
            else:
                todo[d] = fl
        if not todo:
            return
        if self._closed or not self.far.available():
            err = UnavailableError("prefetch skipped: the remote is down")
            self.counters.add("prefetch_skipped", len(todo))
            for d, fl in todo.items():
                self._flights.finish(d, fl, error=err)
            return
        self.counters.add("in_flight", len(todo))
        try:
            for d, res in self.far.read_many(list(todo)):
                fl = todo.pop(d)
                self.counters.add("in_flight", -1)
                try:
                    if isinstance(res, StoreError):
                        raise res
                    data = self._accept(d, res)
                except StoreError as e:  # the reader that wants it will see the error itself
                    log.debug("prefetch of chunk %s failed: %s", d.hex(), e)
                    self.counters.add("prefetch_failed")
                    self._flights.finish(d, fl, error=e)
                    continue
                self._flights.finish(d, fl, data)
                if data is not None:
                    self._keep_ready(d, data)
        except Exception as e:  # the remote went away mid-batch: the rest fails with it
            log.debug("prefetch batch failed: %s", e)
            self.counters.add("prefetch_failed", len(todo))
            for d, fl in todo.items():
                self._flights.finish(d, fl, error=e)
        finally:
            self.counters.add("in_flight", -len(todo))

    def _keep_ready(self, digest: B3Digest, data: bytes) -> None:
        if len(data) > self._ready_max:
            return
        with self._lock:
            if digest not in self._ready:
                self._ready[digest] = data
                self._ready_used += len(data)
            while self._ready_used > self._ready_max:
                _, old = self._ready.popitem(last=False)
                self._ready_used -= len(old)

    # --- readers, writers, listing ---------------------------------------------------------

    def open_read(self, digest: B3Digest) -> BinaryIO | None:
        """A reader that prefetches ahead (the read-ahead policy) and, when the whole blob is
        read in order, checks that the chunks add up to `digest` before handing out the last
        bytes (a chunk list from `far` is only its word)."""
        cs = self.chunks(digest)
        if cs is None:
            return None
        return ChunkedReader(self, cs, digest, verify_whole=True)

    def open_write(self) -> BlobWriter:
        """Write-through to `far` (nothing is cached by a write)."""
        return self.far.open_write()

    def available(self) -> bool:
        return self.far.available()

    def advise(self, digests: list[B3Digest]) -> None:
        self.near.advise(digests)

    def iter_digests(self) -> Iterator[B3Digest]:
        """Blobs `near` holds (cheap); `far`'s own listing is not asked."""
        return self.near.iter_digests()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until the chunks fetched so far are written to `near`."""
        return self._writes.flush(timeout)

    def close(self) -> None:
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._writes.close()
        self.near.close()
        self.far.close()
