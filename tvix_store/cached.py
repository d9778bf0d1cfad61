"""`open_cached_store(far, cache_dir, cache_size)`: a remote `Store` behind a persistent local cache.

Wires the three cache combinators (`tvix_store.{blob,directory,pathinfo}service.cached`) over
one cache directory (`tvix_store.cachedir`), one circuit breaker for the remote
(`tvix_store.breaker`) and one set of counters (`Store.counters`). Policies are documented in
those modules and in docs/cache.md; this module only wires and closes.
"""

from __future__ import annotations

from pathlib import Path

from tvix_store.blobservice.cached import CachedBlobService
from tvix_store.breaker import CircuitBreaker
from tvix_store.cachedir import CacheDir, CacheStats
from tvix_store.digest import EMPTY_DIGEST
from tvix_store.directoryservice.cached import CachedDirectoryService
from tvix_store.pathinfoservice.cached import CachedPathInfoService
from tvix_store.store import Store

#: `--cache-size` when not given
DEFAULT_CACHE_SIZE = 10 << 30


class CachedStore(Store):
    """A Store whose services are the cache combinators; closing it closes the remote too."""

    far: Store
    breaker: CircuitBreaker
    cache_dir: CacheDir
    stats: CacheStats

    def close(self) -> None:
        try:
            super().close()
            self.far.close()
        finally:
            self.breaker.close()
            self.cache_dir.close()

    def snapshot(self) -> dict[str, int]:
        """All counters (docs/cache.md lists them), plus the remote's own, prefixed `remote_`."""
        out = self.stats.snapshot()
        out["remote_down"] = int(self.breaker.is_down)
        out["remote_trips"] = self.breaker.trips
        out["fast_failures"] = self.breaker.fast_failures
        if self.far.counters is not None:
            for k, v in self.far.counters().items():
                out.setdefault(k if k.startswith("remote_") else "remote_" + k, v)
        return out


def open_cached_store(far: Store, cache_dir: Path, cache_size: int | None, *, timeout: float = 10.0) -> Store:
    """`far` behind a cache in `cache_dir` bounded to `cache_size` chunk bytes (None: DEFAULT_CACHE_SIZE).

    Raises StoreError if the directory cannot be used (and closes `far` then). `timeout` is the remote's call deadline
    (bounds how long a reader waits for a fetch another reader started).
    """
    cdir: CacheDir | None = None
    try:
        cdir = CacheDir(cache_dir)
        stats = CacheStats()
        breaker = CircuitBreaker(lambda: far.blobs.chunks(EMPTY_DIGEST), interval=1.0, name=f"remote store {far.url}")
        blobs = CachedBlobService(
            cdir,
            far.blobs,
            cache_size=DEFAULT_CACHE_SIZE if cache_size is None else cache_size,
            breaker=breaker,
            stats=stats,
            timeout=timeout,
        )
    except BaseException:
        if cdir is not None:
            cdir.close()
        far.close()
        raise
    dirs = CachedDirectoryService(cdir, far.directories, breaker=breaker, stats=stats)
    infos = CachedPathInfoService(cdir, far.pathinfos, breaker=breaker, stats=stats)
    store = CachedStore(blobs, dirs, infos, far.url)
    store.far = far
    store.breaker = breaker
    store.cache_dir = cdir
    store.stats = stats
    store.counters = store.snapshot
    return store
