"""`CachedDirectoryService(near, far)`: Directories fetched from `far` once are kept in `near`.

Policy (docs/cache.md):
- Local first: `get` answers from `near` when it can; `near` re-verifies what it reads, and an
  entry that fails is discarded (`near.delete`, `cache_corrupt`) and fetched again.
- Only verified data enters `near`: a Directory from `far` must hash to the digest it was
  asked for (for `get_recursive`: to the root, or to a digest referenced by a Directory
  already received); otherwise IntegrityError, logged, nothing kept.
- No negative cache; `far` is never written by reads. `put_graph` writes through to `far` and
  keeps the graph only once `far` accepted it.
- `near` keeps what it is given without asking for the children (`keep`): a cache holds parts
  of a closure.

Not here: chunk data (`blobservice.cached`), the bound (the object layer).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

from tvix_store.blobservice.cached import far_call
from tvix_store.core.capabilities import Capabilities
from tvix_store.core.castore import Directory
from tvix_store.core.digest import B3Digest
from tvix_store.core.errors import IntegrityError, NotFoundError, StoreError
from tvix_store.directoryservice import DirectoryService
from tvix_store.util.counters import Counters

log = logging.getLogger("tvix_store.cache")


class CachedDirectoryService(DirectoryService):
    def __init__(self, near: DirectoryService, far: DirectoryService, *, counters: Counters | None = None) -> None:
        self.near = near
        self.far = far
        self.capabilities = Capabilities(is_remote=far.capabilities.is_remote, can_list=False)
        self.counters = counters if counters is not None else Counters()
        self.counters.declare(("meta_hits", "meta_fetched", "cache_corrupt", "verify_failures"))

    def _cached(self, digest: B3Digest) -> Directory | None:
        try:
            d = self.near.get(digest)
        except IntegrityError as e:
            log.error("cached directory %s is corrupt, discarded: %s", digest.hex(), e)
            self.counters.add("cache_corrupt")
            self.near.delete(digest)
            return None
        if d is not None:
            self.counters.add("meta_hits")
        return d

    def _keep(self, d: Directory) -> None:
        self.counters.add("meta_fetched")
        try:
            self.near.keep(d)
        except (StoreError, OSError) as e:
            log.warning("cannot cache directory %s: %s", d.digest.hex(), e)

    def _reject(self, requested: str, d: Directory) -> IntegrityError:
        log.error("remote sent directory %s when asked for %s: rejected", d.digest.hex(), requested)
        return IntegrityError(f"remote sent directory {d.digest.hex()} when asked for {requested}")

    def get(self, digest: B3Digest) -> Directory | None:
        d = self._cached(digest)
        if d is not None:
            return d
        d = far_call(self.counters, "directory", self.far.get, digest)
        if d is None:
            return None
        if d.digest != digest:
            self.counters.add("verify_failures")
            raise self._reject(digest.hex(), d)
        self._keep(d)
        return d

    def get_recursive(self, digest: B3Digest) -> Iterator[Directory]:
        """From `near` when the whole closure is there, else in one call to `far`, each Directory
        verified (it must be the root or referenced by one received before) and kept as it
        arrives: a hole in the closure (NotFoundError at the end) loses nothing received."""
        local = self._cached_closure(digest)
        if local is not None:
            yield from local
            return
        expected = {digest}
        seen: set[B3Digest] = set()
        try:
            for d in self.far.get_recursive(digest):
                dg = d.digest
                if dg not in expected:
                    raise self._reject(f"a directory in the closure of {digest.hex()}", d)
                if dg in seen:
                    continue
                seen.add(dg)
                expected.update(c.digest for c in d.directories)
                yield d  # the caller first, then the cache
                self._keep(d)
        except IntegrityError as e:
            self.counters.add("verify_failures")
            log.error("remote directory closure of %s failed verification: %s", digest.hex(), e)
            raise
        if seen and expected - seen:
            missing = next(iter(expected - seen))
            raise NotFoundError(
                f"directory {missing.hex()} (in the closure of {digest.hex()}) is missing on the remote"
            )

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
        """Write-through: `far` validates and stores; then the graph is kept in `near` too."""
        graph = list(directories)
        root = far_call(self.counters, "directory", self.far.put_graph, graph)
        for d in graph:
            self._keep(d)
        return root

    def _store(self, directory: Directory) -> None:
        self.put_graph([directory])

    def available(self) -> bool:
        return self.far.available()

    def iter_digests(self) -> Iterator[B3Digest]:
        """The Directories `near` holds (`far`'s listing is not asked)."""
        return self.near.iter_digests()

    def close(self) -> None:
        self.near.close()
        self.far.close()
