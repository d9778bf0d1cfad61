"""`BoundedObjectStore(inner, limit)`: a size-bounded LRU wrapper over any `ObjectStore` — what
turns an ordinary store into a cache's near side (`--cache-size`).

Policy:
- Bound: every object is charged its size rounded up to 4 KiB (so `du` stays within the bound
  too); the sum of the charges of the objects in `inner` plus reservations for objects being
  written never exceeds `limit`, at any moment. Room is made (least recently used first)
  before an object is written; an object larger than the whole bound is not stored
  (`put` returns False, `cache_uncacheable`).
- Recency: an ordered index in memory (a `get` moves a key to the most recent end) and the
  inner store's `touch` (file mtime for `files`), so recency survives restarts: on open the
  index is rebuilt from `inner.list()` sorted by mtime, and if the bound was lowered the
  oldest objects are evicted at once.
- A background thread keeps usage below 85 % once it passes 95 % (the watermarks), so writes
  rarely evict anything themselves. A write that finds the room held by concurrent writes or
  evictions in progress waits for them (≤ 1 s), then gives up rather than overshoot.
- Exactness needs one writer: over an inner store that is not `writable` (a cache directory
  owned by another process) this wrapper only passes reads through.
- Disk full: when the inner store refuses a write for lack of room (`ResourceExhaustedError`:
  ENOSPC, EDQUOT) before `limit` is reached, the bound in force is lowered to what is held
  minus a margin (`FULL_MARGIN`), the oldest objects are evicted to get under it, one warning
  is logged (a further lowering, if the disk fills up again, is an info line) and that write
  is dropped (`put` returns False); until the process ends, the lowered bound holds.

Counters (in the shared `Counters`): `cache_bytes`, `cache_objects`, `cache_limit` (the bound
in force), `cache_evictions`, `cache_uncacheable`.

Not here: what is worth caching or verification (the services and the cache combinators).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator

from tvix_store.core.errors import ResourceExhaustedError
from tvix_store.objects import ObjectInfo, ObjectStore, Staged
from tvix_store.util.counters import Counters

log = logging.getLogger("tvix_store.cache")

BLOCK = 4096
#: a background eviction pass starts above HIGH and stops at LOW (fractions of the bound)
HIGH_WATERMARK = 0.95
LOW_WATERMARK = 0.85
#: how long a write waits for room held by concurrent writes or evictions
ROOM_WAIT = 1.0
#: on a full disk the bound becomes what is held minus this: a fraction of it, at least 1 MiB
FULL_MARGIN = 0.05
FULL_MARGIN_MIN = 1 << 20

COUNTER_NAMES = ("cache_bytes", "cache_objects", "cache_limit", "cache_evictions", "cache_uncacheable")


def disk_charge(size: int) -> int:
    """What an object of `size` bytes is charged against the bound: its size rounded up to 4 KiB."""
    return (size + BLOCK - 1) // BLOCK * BLOCK


class BoundedObjectStore(ObjectStore):
    """`inner` bounded to `limit` bytes by LRU eviction (see the module docstring)."""

    def __init__(self, inner: ObjectStore, limit: int, counters: Counters | None = None) -> None:
        self.inner = inner
        self.limit = limit  # the bound in force: `configured_limit`, or lower once the disk was full
        self.configured_limit = limit
        self._full_warned = False
        self.capabilities = inner.capabilities
        self.writable = inner.writable
        self.counters = counters if counters is not None else Counters()
        self.counters.declare(COUNTER_NAMES)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._index: OrderedDict[str, int] = OrderedDict()  # key -> charge, least recent first
        self.used = 0  # charges of objects in `inner` + reservations of objects being written
        self._pending = 0  # of which: victims taken from the index, not yet deleted
        self._evicting: set[str] = set()  # those victims
        self._writing = 0  # of which: reservations of objects being written
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._evictor: threading.Thread | None = None
        if self.writable:
            self._scan()
            self._evict_to(self.limit)
            self._evictor = threading.Thread(target=self._evict_loop, name="tvix-cache-evict", daemon=True)
            self._evictor.start()
        self.counters.set("cache_limit", limit)
        self._publish()

    def _scan(self) -> None:
        found = sorted(self.inner.list(), key=lambda o: o.mtime)
        for o in found:
            charge = disk_charge(o.size)
            self._index[o.key] = charge
            self.used += charge

    def _publish(self) -> None:
        with self._lock:  # under the lock, so a stale value can never overwrite a newer one
            self.counters.set("cache_bytes", self.used)
            self.counters.set("cache_objects", len(self._index))

    # --- reading ---------------------------------------------------------------------

    def _used(self, key: str) -> None:
        if not self.writable:
            return
        with self._lock:
            if key in self._index:
                self._index.move_to_end(key)
        self.inner.touch(key)

    def get(self, key: str) -> bytes | None:
        data = self.inner.get(key)
        if data is None:
            self._forget(key)
        else:
            self._used(key)
        return data

    def get_range(self, key: str, offset: int, length: int) -> bytes | None:
        data = self.inner.get_range(key, offset, length)
        if data is None:
            self._forget(key)
        else:
            self._used(key)
        return data

    def stat(self, key: str) -> int | None:
        return self.inner.stat(key)

    def has(self, key: str) -> bool:
        return self.inner.has(key)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return self.inner.list(prefix)

    def advise(self, keys: list[str]) -> None:
        self.inner.advise(keys)

    def touch(self, key: str) -> None:
        self._used(key)

    # --- writing ---------------------------------------------------------------------

    def put(self, key: str, data: bytes | bytearray | memoryview, *, replace: bool = False) -> bool:
        if not self.writable:
            return False
        with self._lock:
            if key in self._index and not replace:
                self._index.move_to_end(key)
                return False
        charge = disk_charge(len(data))
        if not self._reserve(key, charge):
            return False
        written = False
        full: ResourceExhaustedError | None = None
        try:
            written = self.inner.put(key, data, replace=replace)
        except ResourceExhaustedError as e:
            full = e
        finally:
            self._settle(key, charge, written)
        if full is not None:
            self._disk_full(full)
            return False
        if written:
            self.inner.touch(key)  # the newest use, in the inner store's own order
        return written

    def stage(self, data: bytes | bytearray | memoryview) -> Staged:
        return _BoundedStaged(self, self.inner.stage(data))

    def delete(self, key: str) -> bool:
        if not self.writable:
            return False
        gone = self.inner.delete(key)
        self._forget(key)
        return gone

    def _reserve(self, key: str, charge: int) -> bool:
        """Make room for `charge` bytes (evicting LRU first) and reserve them; False: do not write."""
        victims: list[tuple[str, int]] = []
        with self._cond:
            # an object being evicted must be gone before it is written again (else the
            # deletion would remove the new one)
            deadline = time.monotonic() + ROOM_WAIT
            while key in self._evicting and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            if key in self._evicting:
                return False
            if charge > self.limit:
                self.counters.add("cache_uncacheable")
                return False
            deadline = time.monotonic() + ROOM_WAIT
            while True:
                freed = 0
                while self.used - freed + charge > self.limit and self._index:
                    k, c = self._index.popitem(last=False)
                    victims.append((k, c))
                    freed += c
                if self.used - freed + charge <= self.limit:
                    break
                # the rest is held by concurrent writes or evictions in progress: put the
                # victims back (still stored) and wait for those to finish, never overshoot
                for k, c in reversed(victims):
                    self._index[k] = c
                    self._index.move_to_end(k, last=False)
                victims = []
                left = deadline - time.monotonic()
                if (self._pending or self._writing) and left > 0:
                    self._cond.wait(left)
                    continue
                self.counters.add("cache_uncacheable")
                return False
            self._pending += freed
            self._evicting.update(k for k, _ in victims)
            self.used += charge
            self._writing += charge
        self._delete_victims(victims)
        return True

    def _settle(self, key: str, charge: int, written: bool) -> None:
        """End a reservation: the object is stored (`written`) or the room is given back."""
        with self._cond:
            self._writing -= charge
            if written:
                old = self._index.pop(key, None)
                if old is not None:  # replaced
                    self.used -= old
                self._index[key] = charge
            else:
                self.used -= charge
            over_high = self.used > self.limit * HIGH_WATERMARK
            self._cond.notify_all()
        self._publish()
        if over_high:
            self._wake.set()

    def _disk_full(self, err: ResourceExhaustedError) -> None:
        """The inner store is out of room before the bound: lower the bound to what is held
        minus a margin and evict down to it (see the module docstring)."""
        with self._cond:
            held = self.used - self._writing  # stored (victims being deleted included)
            if held > self.limit:
                return  # an earlier lowering is still evicting: that will make the room
            new = max(0, held - max(FULL_MARGIN_MIN, int(held * FULL_MARGIN)))
            if new >= self.limit:
                return
            old, self.limit = self.limit, new
            first = not self._full_warned
            self._full_warned = True
        self.counters.set("cache_limit", new)
        how = log.warning if first else log.info
        how(
            "cache disk full (%s) at %.1f MiB of the %.1f MiB bound: bound lowered to %.1f MiB until restart",
            err,
            held / (1 << 20),
            old / (1 << 20),
            new / (1 << 20),
        )
        self._evict_to(new)

    def _forget(self, key: str) -> None:
        with self._lock:
            charge = self._index.pop(key, None)
            if charge is not None:
                self.used -= charge
        if charge is not None:
            self._publish()

    # --- eviction --------------------------------------------------------------------

    def _delete_victims(self, victims: list[tuple[str, int]]) -> None:
        """Delete victims popped from the index (and counted in `_pending`)."""
        for k, c in victims:
            try:
                self.inner.delete(k)
            except OSError as e:  # still stored: keep counting it (and remember it again)
                log.warning("cannot evict cached object %s: %s", k, e)
                with self._cond:
                    self._pending -= c
                    self._evicting.discard(k)
                    self._index[k] = c
                    self._index.move_to_end(k, last=False)
                    self._cond.notify_all()
                continue
            with self._cond:
                self.used -= c
                self._pending -= c
                self._evicting.discard(k)
                self._cond.notify_all()
            self.counters.add("cache_evictions")
        if victims:
            self._publish()

    def _evict_to(self, target: float) -> None:
        while True:
            with self._lock:
                if self.used <= target or not self._index:
                    return
                batch = []
                excess = self.used - target
                while excess > 0 and self._index and len(batch) < 256:
                    k, c = self._index.popitem(last=False)
                    batch.append((k, c))
                    excess -= c
                self._pending += sum(c for _, c in batch)
                self._evicting.update(k for k, _ in batch)
            self._delete_victims(batch)

    def _evict_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            if self._stop.is_set():
                return
            if self.used > self.limit * HIGH_WATERMARK:
                self._evict_to(self.limit * LOW_WATERMARK)

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._evictor is not None:
            self._evictor.join(timeout=1)
        self.inner.close()


class _BoundedStaged(Staged):
    """A staged object whose room is reserved when it is committed."""

    def __init__(self, store: BoundedObjectStore, inner: Staged) -> None:
        self._store = store
        self._inner = inner
        self.size = inner.size

    def commit(self, key: str) -> bool:
        charge = disk_charge(self.size)
        if not self._store._reserve(key, charge):
            self._inner.discard()
            return False
        written = False
        full: ResourceExhaustedError | None = None
        try:
            written = self._inner.commit(key)
        except ResourceExhaustedError as e:
            full = e
        finally:
            self._store._settle(key, charge, written)
        if full is not None:
            self._store._disk_full(full)
        return written

    def discard(self) -> None:
        self._inner.discard()
