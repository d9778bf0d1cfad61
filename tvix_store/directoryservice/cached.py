"""`CachedDirectoryService(near, far)`: Directories fetched once are kept in the cache directory.

Policy:
- Local first: `get` answers from the cache directory when it can; a cached file is decoded,
  validated and re-hashed on every read (a corrupt file is discarded and fetched again).
- Only verified data enters the cache: a Directory from the remote must hash to the digest it
  was asked for (for `get_recursive`: to the root, or to a digest referenced by a Directory
  already received); otherwise IntegrityError, logged with the digest, nothing cached.
- No negative cache; the remote is never written by reads. `put_graph` writes through to the
  remote and caches the graph only once the remote accepted it.
- Directories are small and not counted against `--cache-size` (which bounds chunk bytes).
- Every remote call goes through the shared `CircuitBreaker` (fail fast while it is down).

Not here: chunk data (`tvix_store.blobservice.cached`), the layout (`tvix_store.cachedir`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from google.protobuf.message import DecodeError

from tvix_store.breaker import CircuitBreaker, guarded_call
from tvix_store.cachedir import CacheDir, CacheStats
from tvix_store.castore import Directory
from tvix_store.digest import B3Digest
from tvix_store.directoryservice import DirectoryService
from tvix_store.errors import IntegrityError, NotFoundError, ValidationError
from tvix_store.proto import castore_pb2
from tvix_store.wire import directory_from_proto

log = logging.getLogger("tvix_store.cache")

T = TypeVar("T")


class CachedDirectoryService(DirectoryService):
    def __init__(
        self, near: CacheDir, far: DirectoryService, *, breaker: CircuitBreaker, stats: CacheStats | None = None
    ) -> None:
        self._near = near
        self._far = far
        self._breaker = breaker
        self.stats = stats or CacheStats()

    def _remote(self, fn: Callable[..., T], *args: object) -> T:
        """Call the remote through the breaker (see `tvix_store.breaker.guarded_call`)."""
        return guarded_call(self._breaker, self.stats, "directory", fn, *args)

    def _cached(self, digest: B3Digest) -> Directory | None:
        name = digest.hex()
        raw = self._near.get("directories", name)
        if raw is None:
            return None
        try:
            d = directory_from_proto(castore_pb2.Directory.FromString(raw))
            if d.digest != digest:
                raise IntegrityError(f"hashes to {d.digest.hex()}")
        except (DecodeError, ValidationError, IntegrityError) as e:
            log.error("cached directory %s is corrupt, discarded: %s", name, e)
            self.stats.add("cache_corrupt")
            self._near.discard("directories", name)
            return None
        self.stats.add("meta_hits")
        return d

    def _insert(self, d: Directory) -> None:
        self._near.put("directories", d.digest.hex(), d.encoded)

    def _reject(self, requested: str, d: Directory) -> IntegrityError:
        self.stats.add("verify_failures")
        log.error("remote sent directory %s when asked for %s: rejected", d.digest.hex(), requested)
        return IntegrityError(f"remote sent directory {d.digest.hex()} when asked for {requested}")

    def get(self, digest: B3Digest) -> Directory | None:
        d = self._cached(digest)
        if d is not None:
            return d
        d = self._remote(self._far.get, digest)
        if d is None:
            return None
        if d.digest != digest:
            raise self._reject(digest.hex(), d)
        self.stats.add("meta_fetched")
        self._insert(d)
        return d

    def get_recursive(self, digest: B3Digest) -> Iterator[Directory]:
        """From the cache when the whole closure is there, else in one remote call (verified)."""
        local = self._cached_closure(digest)
        if local is not None:
            yield from local
            return
        received = self._remote(lambda: list(self._far.get_recursive(digest)))
        expected = {digest}
        seen: set[B3Digest] = set()
        for d in received:
            dg = d.digest
            if dg not in expected:
                raise self._reject(f"a directory in the closure of {digest.hex()}", d)
            seen.add(dg)
            expected.update(c.digest for c in d.directories)
        if received and expected - seen:
            missing = next(iter(expected - seen))
            raise NotFoundError(
                f"directory {missing.hex()} (in the closure of {digest.hex()}) is missing on the remote"
            )
        for d in received:
            self.stats.add("meta_fetched")
            self._insert(d)
        yield from received

    def _cached_closure(self, digest: B3Digest) -> list[Directory] | None:
        root = self._cached(digest)
        if root is None:
            return None
        out = [root]
        seen = {digest}
        i = 0
        while i < len(out):
            for c in out[i].directories:
                if c.digest not in seen:
                    seen.add(c.digest)
                    d = self._cached(c.digest)
                    if d is None:
                        return None
                    out.append(d)
            i += 1
        return out

    def put_graph(self, directories: Iterable[Directory]) -> B3Digest:
        """Write-through: the remote validates and stores; then the graph is cached too."""
        graph = list(directories)
        root = self._remote(self._far.put_graph, graph)
        for d in graph:
            self._insert(d)
        return root

    def _store(self, directory: Directory) -> None:
        self._insert(directory)

    def iter_digests(self) -> Iterator[B3Digest]:
        """The cached Directories (the remote's listing is not asked)."""
        out = []
        for name in self._near.names("directories"):
            try:
                out.append(B3Digest.from_hex(name))
            except ValueError:
                continue
        return iter(out)
