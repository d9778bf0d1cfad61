"""The on-disk layout of a persistent cache directory, and the cache's thread-safe counters.

Layout of `cache_dir` (docs/cache.md):

    VERSION                      "tvix-store-cache 1"
    LOCK                         flock'ed by the one process that owns (writes) the cache
    chunks/<hh>/<hex>            chunk bytes, named by their blake3; mtime = last use (LRU)
    blobs/<hh>/<hex>             a blob's chunk list: per chunk 32-byte digest + u64 size (BE)
    directories/<hh>/<hex>       a Directory's deterministic protobuf encoding
    pathinfos/<hex of 20 bytes>  a PathInfo's protobuf encoding
    tmp/                         files being written: c-* chunks, m-* others (removed at start-up)

Every file appears by `rename` of a complete temp file, so readers see a whole file or none.
Readers re-verify what they read (a torn or corrupted file is discarded, never served).

Only one process owns a cache directory at a time (the `LOCK` flock). A second process that
opens it gets a read-only view: it serves what is cached but inserts nothing, so the owner's
size accounting stays exact. This module does no network I/O and knows no policy beyond
the layout; `tvix_store.blobservice.cached` holds the chunk LRU and its bound.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import uuid
from pathlib import Path

from tvix_store.errors import StoreError

log = logging.getLogger("tvix_store.cache")

VERSION = b"tvix-store-cache 1\n"
KINDS = ("chunks", "blobs", "directories", "pathinfos")

#: names of the counters `CacheStats.snapshot()` always contains
COUNTER_NAMES = (
    "chunks_fetched",
    "bytes_fetched",
    "cache_hits",
    "cache_misses",
    "prefetch_hits",
    "prefetch_started",
    "prefetch_dropped",
    "single_flight_joins",
    "verify_failures",
    "cache_corrupt",
    "timeouts",
    "fast_failures",
    "in_flight",
    "cache_bytes",
    "cache_chunks",
    "cache_limit",
    "cache_evictions",
    "cache_uncacheable",
    "meta_hits",
    "meta_fetched",
    "remote_down",
    "remote_trips",
)


class CacheStats:
    """Named integer counters, safe to bump from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._c: dict[str, int] = dict.fromkeys(COUNTER_NAMES, 0)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._c[name] = self._c.get(name, 0) + n

    def set(self, name: str, value: int) -> None:
        with self._lock:
            self._c[name] = value

    def get(self, name: str) -> int:
        with self._lock:
            return self._c.get(name, 0)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._c)


class CacheDir:
    """A cache directory: its layout, its owner lock, atomic file writes and reads."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._tmp = str(root / "tmp")
        try:
            root.mkdir(parents=True, exist_ok=True)
            vf = root / "VERSION"
            if vf.exists():
                if vf.read_bytes() != VERSION:
                    raise StoreError(f"cache directory {root} has an unknown format (VERSION file); remove it")
            elif any(p.name != "LOCK" for p in root.iterdir()):
                raise StoreError(f"{root} is not empty and not a tvix-store cache directory")
            self._lock_fd = os.open(root / "LOCK", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise StoreError(f"cannot open cache directory {root}: {e.strerror or e}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.writable = True
        except BlockingIOError:
            self.writable = False
            log.warning("cache directory %s is in use by another process: using it read-only", root)
        if self.writable:
            for kind in KINDS:
                (root / kind).mkdir(exist_ok=True)
            tmp = root / "tmp"
            tmp.mkdir(exist_ok=True)
            for e in os.scandir(tmp):  # leftovers of a crashed writer
                try:
                    os.unlink(e.path)
                except OSError:
                    pass
            if not vf.exists():
                self.write_atomic(vf, VERSION)

    def path(self, kind: str, name: str) -> Path:
        if kind == "pathinfos":
            return self.root / kind / name
        return self.root / kind / name[:2] / name

    def write_atomic(self, dest: str | Path, data: bytes | memoryview, prefix: str = "m-") -> None:
        """Write a complete file (temp + rename; no fsync: a cache may lose its last writes).
        The temp file is `tmp/<prefix><random>`: `c-` for chunks (counted against the bound), `m-` else."""
        tmp = os.path.join(self._tmp, prefix + uuid.uuid4().hex)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            try:
                os.rename(tmp, dest)
            except FileNotFoundError:
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                os.rename(tmp, dest)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def put(self, kind: str, name: str, data: bytes) -> None:
        """Store a small metadata file; a failure is logged, never raised (a cache may miss)."""
        if not self.writable:
            return
        try:
            self.write_atomic(self.path(kind, name), data)
        except OSError as e:
            log.warning("cannot write %s/%s to the cache: %s", kind, name, e)

    def get(self, kind: str, name: str) -> bytes | None:
        try:
            with open(self.path(kind, name), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("cannot read %s/%s from the cache: %s", kind, name, e)
            return None

    def discard(self, kind: str, name: str) -> None:
        try:
            os.unlink(self.path(kind, name))
        except OSError:
            pass

    def names(self, kind: str) -> list[str]:
        """Names of the files of one kind (a directory scan; for listings)."""
        base = self.root / kind
        out: list[str] = []
        try:
            if kind == "pathinfos":
                return [e.name for e in os.scandir(base) if e.is_file()]
            for sub in os.scandir(base):
                if sub.is_dir():
                    out.extend(e.name for e in os.scandir(sub.path))
        except OSError:
            pass
        return out

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
