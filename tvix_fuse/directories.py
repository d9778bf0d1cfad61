"""How the mount gets Directories: a bounded in-memory LRU, one fetch per digest, and whole
store-path closures streamed in the background.

- `get(digest)`: from the LRU; else, if a closure being streamed will bring it, wait for it
  to arrive; else one `DirectoryService.get` (single-flight, in a worker thread).
- `fetch_closure(root)` (a remote store path's first look-up): ONE recursive Get in a worker
  thread, each Directory handed to the trio loop as it arrives (breadth-first: the root
  after one round trip, its children right after). A Directory is "expected" from the moment
  the one referencing it arrived, so a look-up below a store path waits for the stream
  instead of asking again: `ls -lR` of a store path costs two calls (its PathInfo and its
  closure), whatever its size. A hole (a Directory the remote lacks) or a failed stream ends
  the closure; whoever waits then asks for their Directory on their own (and gets EIO for
  the hole only).

Runs on the trio thread (no locks); store calls go through the `Offloader`. No pyfuse3.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import trio

from tvix_fuse.offload import Offloader
from tvix_store.core.castore import Directory
from tvix_store.core.digest import B3Digest
from tvix_store.core.errors import NotFoundError, StoreError
from tvix_store.directoryservice import DirectoryService
from tvix_store.util.counters import Counters
from tvix_store.util.singleflight import SingleFlight

log = logging.getLogger("tvix_fuse")

#: Directories kept in memory (a store path of 100 directories of 50 entries is ~1 MB)
DEFAULT_ENTRIES = 8192


class Directories:
    """The mount's Directories over one DirectoryService (see the module docstring)."""

    def __init__(
        self, service: DirectoryService, offload: Offloader, counters: Counters, entries: int = DEFAULT_ENTRIES
    ) -> None:
        self.service = service
        self.offload = offload
        self.counters = counters
        self.entries = entries
        self._lru: OrderedDict[B3Digest, Directory] = OrderedDict()
        self._flights: SingleFlight[B3Digest, Directory | None] = SingleFlight(
            on_join=lambda: counters.add("single_flight_joins")
        )
        self._expected: dict[B3Digest, trio.Event] = {}  # on their way in a closure stream
        self._closures: set[B3Digest] = set()  # roots streamed (or streaming)

    def _keep(self, d: Directory) -> None:
        self._lru[d.digest] = d
        self._lru.move_to_end(d.digest)
        while len(self._lru) > self.entries:
            self._lru.popitem(last=False)

    async def get(self, digest: B3Digest) -> Directory | None:
        d = self._lru.get(digest)
        if d is not None:
            self._lru.move_to_end(digest)
            return d
        arrival = self._expected.get(digest)
        if arrival is not None:
            await arrival.wait()
            d = self._lru.get(digest)
            if d is not None:
                return d
        d = await self._flights.arun(digest, lambda: self.offload.run(self.service.get, digest))
        if d is not None:
            self._keep(d)
        return d

    def fetch_closure(self, root: B3Digest, nursery: trio.Nursery | None) -> None:
        """Stream `root`'s closure in the background (once per root; not without a nursery)."""
        if nursery is None or root in self._closures or root in self._lru:
            return
        self._closures.add(root)
        self._expected.setdefault(root, trio.Event())
        nursery.start_soon(self._stream, root)

    async def _stream(self, root: B3Digest) -> None:
        token = trio.lowlevel.current_trio_token()
        mine: set[B3Digest] = {root}

        def arrived(d: Directory) -> None:  # on the trio thread
            self._keep(d)
            self.counters.add("closure_directories")
            for c in d.directories:
                if c.digest not in self._lru and c.digest not in self._expected:
                    self._expected[c.digest] = trio.Event()
                    mine.add(c.digest)
            ev = self._expected.pop(d.digest, None)
            if ev is not None:
                ev.set()

        def fetch() -> None:  # in a worker thread
            for d in self.service.get_recursive(root):
                token.run_sync_soon(arrived, d)

        try:
            await self.offload.run(fetch)
        except NotFoundError as e:
            log.warning("store path closure %s has a hole: %s", root.hex(), e)
        except StoreError as e:  # each directory is then fetched on its own
            log.debug("closure of %s not streamed: %s", root.hex(), e)
            self._closures.discard(root)
        finally:
            await trio.lowlevel.checkpoint()  # let the last arrivals run first
            for digest in mine:  # whoever still waits asks on their own
                ev = self._expected.pop(digest, None)
                if ev is not None:
                    ev.set()
