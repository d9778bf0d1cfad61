"""Offloading, single-flight and the chunk LRU of the mount (trio; no pyfuse3).

- `Offloader`: the one way the mount calls the (blocking) store: `trio.to_thread.run_sync`
  under ONE shared `trio.CapacityLimiter`, so the trio loop never blocks and at most
  `limit` store calls run at once.
- `SingleFlight`: concurrent requests for one key share one fetch; waiters get its result
  or its exception. Nothing is remembered after the fetch ends (no negative cache: a
  missing or unreachable object may come back).
- `ChunkCache`: a small LRU of verified chunk bytes, bounded in bytes, in front of
  `BlobService.read_chunk` (which verifies, see BlobService's contract). Kernel reads
  (128 KiB-1 MiB) and chunks (~64 KiB-1 MiB) do not line up, so consecutive requests
  often need the same chunk again; the page cache keeps everything else.

All of this runs on the trio thread only (no locks); only the store calls go to threads.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import trio

from tvix_store.blobservice import BlobService, ChunkMeta
from tvix_store.digest import B3Digest
from tvix_store.errors import IntegrityError, NotFoundError, UnavailableError

T = TypeVar("T")
K = TypeVar("K")

DEFAULT_THREADS = 16
DEFAULT_CACHE_BYTES = 32 << 20


@dataclass
class Counters:
    """The mount's own counters (shown as `user.tvix.stats.mount.*` on the root)."""

    lookups: int = 0
    reads: int = 0
    bytes_read: int = 0
    chunks_fetched: int = 0
    chunk_bytes_fetched: int = 0
    chunk_cache_hits: int = 0
    single_flight_joins: int = 0
    prefetch_hints: int = 0
    readahead_chunks: int = 0
    store_calls: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class Offloader:
    """Runs blocking store calls in worker threads under one shared CapacityLimiter."""

    def __init__(self, limit: int = DEFAULT_THREADS, counters: Counters | None = None) -> None:
        self.limit = limit
        self._limiter: trio.CapacityLimiter | None = None
        self.counters = counters if counters is not None else Counters()

    @property
    def limiter(self) -> trio.CapacityLimiter:
        # created lazily: a CapacityLimiter belongs to the trio run that first uses it
        if self._limiter is None:
            self._limiter = trio.CapacityLimiter(self.limit)
        return self._limiter

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        self.counters.store_calls += 1
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)


@dataclass
class _Flight(Generic[T]):
    done: trio.Event = field(default_factory=trio.Event)
    result: T | None = None
    error: BaseException | None = None


class SingleFlight(Generic[K, T]):
    """At most one fetch per key at a time; later callers wait for the running one."""

    def __init__(self, counters: Counters) -> None:
        self._flights: dict[K, _Flight[T]] = {}
        self._counters = counters

    def __len__(self) -> int:
        return len(self._flights)

    def __contains__(self, key: K) -> bool:
        return key in self._flights

    async def do(self, key: K, fetch: Callable[[], Awaitable[T]]) -> T:
        flight = self._flights.get(key)
        if flight is not None:
            self._counters.single_flight_joins += 1
            await flight.done.wait()
            if flight.error is not None:
                raise flight.error
            return flight.result  # type: ignore[return-value]
        flight = _Flight()
        self._flights[key] = flight
        try:
            flight.result = await fetch()
            return flight.result
        except trio.Cancelled:
            flight.error = UnavailableError("fetch cancelled (the mount is shutting down)")
            raise
        except BaseException as e:
            flight.error = e
            raise
        finally:
            del self._flights[key]
            flight.done.set()


class ChunkCache:
    """Verified chunk bytes by digest: LRU bounded in bytes, single-flight misses."""

    def __init__(self, blobs: BlobService, offload: Offloader, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self._blobs = blobs
        self._offload = offload
        self._counters = offload.counters
        self._lru: OrderedDict[B3Digest, bytes] = OrderedDict()
        self._bytes = 0
        self.max_bytes = max_bytes
        self._flights: SingleFlight[B3Digest, bytes] = SingleFlight(self._counters)

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
            self._counters.chunk_cache_hits += 1
            return data
        return await self._flights.do(chunk.digest, lambda: self._fetch(chunk, blob))

    async def _fetch(self, chunk: ChunkMeta, blob: B3Digest) -> bytes:
        data = await self._offload.run(self._blobs.read_chunk, chunk.digest)
        if data is None:
            raise NotFoundError(f"chunk {chunk.digest.hex()} of blob {blob.hex()} is missing from the store")
        if len(data) != chunk.size:
            raise IntegrityError(
                f"chunk {chunk.digest.hex()} of blob {blob.hex()} has {len(data)} bytes, "
                f"its chunk list says {chunk.size}"
            )
        self._counters.chunks_fetched += 1
        self._counters.chunk_bytes_fetched += len(data)
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
