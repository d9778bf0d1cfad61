"""`FileObjectStore`: one file per object in a directory — the persistent cache's layout (where
evicting an object is an unlink), and the embedded store's before packs (`packs` converts a
store directory of this layout on its first open).

Layout (version 1; `KIND/NAME` keys of `tvix_store.objects`):

    ROOT/TVIX-STORE                 marker: "tvix-store local store, layout 1"
    ROOT/<kind>/<2 chars>/<name>    an object whose name is 64 hex characters (sharded)
    ROOT/<kind>/<name>              any other name (path infos: nixbase32)
    ROOT/tmp/<pidns>.<pid>.<random>.<n>  files being written (never read as objects)
    ROOT/LOCK                       flock'ed by the owner of an exclusive store (a cache)

Writes: an object is written to a fresh file in `tmp/` and renamed into place (atomic on
POSIX), so it is visible only when complete, and two processes writing the same object
race harmlessly (same name, same bytes). `stage` leaves the file in `tmp/` until `commit`.
With `fsync=True` every file is fsynced before its rename and its directory after it
(power-loss durability at a cost in write throughput); without, a process killed at any
instant (kill -9) still leaves a consistent directory, but power loss may lose the newest
objects (never damage an older one).

Sharing: any number of processes may use one directory at once; no locks, only atomic
renames. `exclusive=True` (a cache, whose size accounting must be exact) takes the `LOCK`
flock; a second process then gets a read-only view (`writable` False: puts are dropped).

Temp files of dead writers are reclaimed on open and then every `SWEEP_INTERVAL` seconds
while the store is open (one background thread per process; a scan of `tmp/`, cheap when it
is empty), never one this process is still writing or holds staged (tracked in memory):
- one of this process that it no longer writes (an aborted writer's leftover): at once;
- in an exclusive store whose `LOCK` this process holds (the only writer): every other one;
- else one whose writer (the pid in the name) no longer runs, when it ran in this PID
  namespace (named in the file too): at once; one of another namespace (a container sharing
  the directory) or not named by this scheme: once it is an hour old.
(`TVIX_TMP_SWEEP_SECONDS` in the environment overrides the interval: a test knob.)

Disk full: a write that fails with ENOSPC or EDQUOT (the temp file, its fsync, the rename)
removes its temp file and raises `ResourceExhaustedError` naming the store directory;
nothing of the object is stored, and once there is room again writes just work.

Not here: verification (the services hash what they read), eviction (`bounded`).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import secrets
import threading
import time
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tvix_store.core.errors import ResourceExhaustedError, StoreError
from tvix_store.objects import KINDS, ObjectInfo, ObjectStore, Staged, split_key

log = logging.getLogger(__name__)

LAYOUT_VERSION = 1
MARKER = "TVIX-STORE"
MARKER_TEXT = f"tvix-store local store, layout {LAYOUT_VERSION}\n"
LOCK = "LOCK"
STALE_TMP_AGE = 3600.0
#: errno values that mean "the disk (or the quota) is full"
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


def _sweep_interval() -> float:
    """Seconds between sweeps of `tmp/` (`TVIX_TMP_SWEEP_SECONDS` overrides, for tests)."""
    try:
        value = float(os.environ.get("TVIX_TMP_SWEEP_SECONDS", "60"))
    except ValueError:
        return 60.0
    return value if value > 0 else 60.0


SWEEP_INTERVAL = _sweep_interval()

#: read-ahead hints (`advise`): files waiting at most, and threads issuing them
MAX_ADVISED = 4096
ADVISE_THREADS = 4


def _pid_namespace() -> int:
    """This process's PID namespace (the inode of /proc/self/ns/pid), 0 if unknown."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# --- temp files of this process, and the sweeper -----------------------------------------

_live_lock = threading.Lock()
#: temp files this process is writing or holds staged (full paths): never swept
_live: set[str] = set()
#: the random part of the temp names of every FileObjectStore of this process
_own_tokens: set[str] = set()
#: every open store with leftovers of dead writers to reclaim: its `clean_tmp()` runs every
#: SWEEP_INTERVAL (this layout's temp files; the pack layout's torn tails, `packs`)
_sweep_stores: weakref.WeakSet[Any] = weakref.WeakSet()
_sweeper: threading.Thread | None = None


def _release(tmp: str) -> None:
    """`tmp` is no longer being written (renamed into place, or removed)."""
    with _live_lock:
        _live.discard(tmp)


def _drop(tmp: str) -> None:
    """Remove a temp file of this process and stop tracking it."""
    try:
        _unlink(tmp)
    finally:
        _release(tmp)


def _sweep_loop() -> None:
    while True:
        time.sleep(SWEEP_INTERVAL)
        with _live_lock:
            stores = list(_sweep_stores)
        for s in stores:
            try:
                s.clean_tmp()
            except Exception as e:  # noqa: BLE001 - a sweep may fail (store gone); the next one retries
                log.debug("sweep of %s failed: %s", s._tmp, e)
        del stores


def _start_sweeping(store: Any) -> None:
    global _sweeper
    with _live_lock:
        _sweep_stores.add(store)
        if _sweeper is None or not _sweeper.is_alive():
            _sweeper = threading.Thread(target=_sweep_loop, name="tvix-tmp-sweep", daemon=True)
            _sweeper.start()


def _stop_sweeping(store: Any) -> None:
    with _live_lock:
        _sweep_stores.discard(store)


class FileObjectStore(ObjectStore):
    """Objects as files under `root` (see the module docstring). Thread-safe."""

    def __init__(self, root: Path, *, fsync: bool = False, exclusive: bool = False) -> None:
        self.root = root
        self.fsync = fsync
        self._root = str(root)
        self._tmp = os.path.join(self._root, "tmp")
        self._ns = _pid_namespace()
        self._pid = os.getpid()
        token = secrets.token_hex(6)
        self._prefix = f"{self._ns}.{self._pid}.{token}."
        with _live_lock:
            _own_tokens.add(token)
        self._owner = False  # holds the LOCK of an exclusive store: the only writer
        self._seq = 0
        self._lock = threading.Lock()
        self._lock_fd = -1
        self._advised = 0
        self._last_touch = 0
        self._advise_pool: ThreadPoolExecutor | None = None
        try:
            self._open(exclusive)
        except OSError as e:
            self.close()
            raise StoreError(f"cannot open store directory {root}: {e.strerror or e}") from None
        except BaseException:
            self.close()
            raise

    # --- opening ---------------------------------------------------------------------

    def _open(self, exclusive: bool) -> None:
        root = self.root
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create store directory {root}: {e.strerror}") from None
        if not root.is_dir():
            raise StoreError(f"store path {root} is not a directory")
        marker = root / MARKER
        try:
            text: str | None = marker.read_text()
        except FileNotFoundError:
            text = None
        if text is None:
            foreign = sorted(p.name for p in root.iterdir() if p.name not in (*KINDS, "tmp", MARKER, LOCK))
            if foreign:
                raise StoreError(f"{root} is not empty and not a tvix-store directory (found {', '.join(foreign[:3])})")
        elif text != MARKER_TEXT:
            raise StoreError(f"{root}: unsupported store layout {text.strip()!r} (this version reads layout 1)")
        if exclusive:
            self._lock_fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.writable = False
                log.warning("%s is in use by another process: using it read-only", root)
            else:
                self._owner = True
        if not self.writable:
            return
        for kind in (*KINDS, "tmp"):
            os.makedirs(os.path.join(self._root, kind), exist_ok=True)
        if text is None:
            tmp = self._write_tmp(MARKER_TEXT.encode())
            try:
                self._publish(tmp, str(marker))
            except BaseException:
                _drop(tmp)
                raise
        self.clean_tmp()
        _start_sweeping(self)

    def clean_tmp(self, max_age: float = STALE_TMP_AGE) -> int:
        """Remove temp files of dead writers (the rules of the module docstring); returns how
        many. Never one this process is writing or holds staged. `max_age`: from what age a
        file whose writer cannot be seen (another PID namespace, another naming) is dead."""
        if not self.writable:
            return 0
        try:
            entries = list(os.scandir(self._tmp))
        except FileNotFoundError:
            return 0
        if not entries:
            return 0
        with _live_lock:  # after the listing: a file listed and still being written is in `_live`
            live = {e.path for e in entries if e.path in _live}
            own = set(_own_tokens)
        now = time.time()
        ns, me = self._ns, os.getpid()
        removed = 0
        for e in entries:
            if e.path in live:
                continue
            parts = e.name.split(".")
            try:
                pidns, pid = (int(parts[0]), int(parts[1])) if len(parts) == 4 else (-1, -1)
            except ValueError:
                pidns, pid = -1, -1
            try:
                if pid == me and parts[2] in own:
                    pass  # made by this process, no longer written: an aborted writer's leftover
                elif self._owner:
                    pass  # the owner of an exclusive store is its only writer
                elif pidns == ns and ns != 0:
                    if _pid_alive(pid):
                        continue  # a live writer of this PID namespace
                elif now - e.stat(follow_symlinks=False).st_mtime < max_age:
                    continue  # a writer this process cannot see: only once it is old
                os.unlink(e.path)
                removed += 1
            except FileNotFoundError:
                continue
            except OSError as err:
                log.warning("cannot remove stale temp file %s: %s", e.path, err.strerror)
        if removed:
            log.info("removed %d temp files of dead writers from %s", removed, self._tmp)
        return removed

    # --- paths -----------------------------------------------------------------------

    def path(self, key: str) -> str:
        """The file of an object (sharded by the first two characters of a 64-hex name)."""
        kind, name = split_key(key)
        if len(name) == 64:
            return f"{self._root}/{kind}/{name[:2]}/{name}"
        return f"{self._root}/{kind}/{name}"

    def _tmp_path(self) -> str:
        """A fresh temp file name, tracked as being written (so no sweep takes it) until
        `_release`d: register before creating, so a file on disk is tracked or abandoned."""
        with self._lock:
            self._seq += 1
            seq = self._seq
        tmp = f"{self._tmp}/{self._prefix}{seq}"
        with _live_lock:
            _live.add(tmp)
        return tmp

    def _full(self, e: OSError) -> ResourceExhaustedError:
        """The error of a write that found the disk (or the quota) full."""
        why = "" if e.errno == errno.ENOSPC else " (disk quota exceeded)"
        return ResourceExhaustedError(f"store directory {self.root}: no space left on device{why}")

    # --- reading ---------------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        try:
            with open(self.path(key), "rb", buffering=0) as f:
                return f.readall()
        except FileNotFoundError:
            return None

    def get_range(self, key: str, offset: int, length: int) -> bytes | None:
        try:
            fd = os.open(self.path(key), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    def stat(self, key: str) -> int | None:
        try:
            return os.stat(self.path(key)).st_size
        except FileNotFoundError:
            return None

    def has(self, key: str) -> bool:
        return os.path.exists(self.path(key))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        for kind in KINDS:
            if not (kind + "/").startswith(prefix) and not prefix.startswith(kind + "/"):
                continue
            base = os.path.join(self._root, kind)
            try:
                top = list(os.scandir(base))
            except FileNotFoundError:
                continue
            for e in top:
                if e.is_dir(follow_symlinks=False):
                    try:
                        inner = list(os.scandir(e.path))
                    except (FileNotFoundError, NotADirectoryError):
                        continue
                else:
                    inner = [e]
                for f in inner:
                    key = f"{kind}/{f.name}"
                    if not key.startswith(prefix):
                        continue
                    try:
                        st = f.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    yield ObjectInfo(key, st.st_size, st.st_mtime)

    # --- writing ---------------------------------------------------------------------

    def _write_tmp(self, data: bytes | bytearray | memoryview) -> str:
        """Write `data` to a new temp file (fsynced if configured); returns its path."""
        tmp = self._tmp_path()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except OSError as e:
            _release(tmp)
            if e.errno in DISK_FULL:
                raise self._full(e) from None
            raise
        try:
            try:
                mv = memoryview(data).cast("B")
                while mv:
                    n = os.write(fd, mv)
                    mv = mv[n:]
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)  # may report a deferred write error too
        except OSError as e:
            _drop(tmp)
            if e.errno in DISK_FULL:
                raise self._full(e) from None
            raise
        except BaseException:
            _drop(tmp)
            raise
        return tmp

    def _publish(self, tmp: str, final: str) -> None:
        """Rename a temp file into place (creating the shard directory on first use). On
        failure the temp file is the caller's to remove (`_drop`)."""
        try:
            try:
                os.rename(tmp, final)
            except FileNotFoundError:
                if not os.path.exists(tmp):
                    raise
                os.makedirs(os.path.dirname(final), exist_ok=True)
                os.rename(tmp, final)
        except OSError as e:
            if e.errno in DISK_FULL:
                raise self._full(e) from None
            raise
        _release(tmp)
        if self.fsync:
            try:
                self._fsync_dir(os.path.dirname(final))
            except OSError as e:
                if e.errno in DISK_FULL:
                    raise self._full(e) from None
                raise

    @staticmethod
    def _fsync_dir(path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def put(self, key: str, data: bytes | bytearray | memoryview, *, replace: bool = False) -> bool:
        if not self.writable:
            return False
        final = self.path(key)
        if not replace and os.path.exists(final):
            return False
        tmp = self._write_tmp(data)
        try:
            self._publish(tmp, final)
        except BaseException:
            _drop(tmp)
            raise
        return True

    def stage(self, data: bytes | bytearray | memoryview) -> Staged:
        if not self.writable:
            raise StoreError(f"{self.root} is read-only for this process (in use by another)")
        return _FileStaged(self, self._write_tmp(data), len(data))

    def delete(self, key: str) -> bool:
        if not self.writable:
            return False
        try:
            os.unlink(self.path(key))
        except FileNotFoundError:
            return False
        return True

    def touch(self, key: str) -> None:
        """Stamp `key`'s mtime with a strictly increasing time of this process (nanoseconds), so
        uses in quick succession keep their order on disk (the kernel's own "now" is coarse)."""
        if not self.writable:
            return
        with self._lock:
            self._last_touch = max(time.time_ns(), self._last_touch + 1)
            t = self._last_touch
        try:
            os.utime(self.path(key), ns=(t, t))
        except OSError:
            pass

    # --- read-ahead hints ------------------------------------------------------------

    def advise(self, keys: list[str]) -> None:
        """Ask the kernel to read these files into the page cache (POSIX_FADV_WILLNEED) from
        background threads, so cold reads of many small objects overlap their disk I/O.
        Dropped when MAX_ADVISED files are already waiting (bounded; never blocks)."""
        with self._lock:
            if not keys or self._advised + len(keys) > MAX_ADVISED:
                return
            self._advised += len(keys)
            if self._advise_pool is None:
                self._advise_pool = ThreadPoolExecutor(max_workers=ADVISE_THREADS, thread_name_prefix="tvix-advise")
            pool = self._advise_pool
        paths = [self.path(k) for k in keys]
        for i in range(0, len(paths), 16):  # small batches, so the threads share big directories
            pool.submit(self._willneed, paths[i : i + 16])

    @property
    def advised(self) -> int:
        """Files hinted and not yet handled."""
        return self._advised

    def _willneed(self, paths: list[str]) -> None:
        try:
            for p in paths:
                try:
                    fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    continue  # absent: nothing to warm
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
                finally:
                    os.close(fd)
        finally:
            with self._lock:
                self._advised -= len(paths)

    def close(self) -> None:
        _stop_sweeping(self)
        with self._lock:
            pool, self._advise_pool = self._advise_pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


class _FileStaged(Staged):
    def __init__(self, store: FileObjectStore, tmp: str, size: int) -> None:
        self._store = store
        self._tmp: str | None = tmp
        self.size = size

    def commit(self, key: str) -> bool:
        tmp = self._tmp
        if tmp is None:
            raise ValueError("commit of a discarded staged object")
        self._tmp = None
        final = self._store.path(key)
        try:
            self._store._publish(tmp, final)
        except BaseException:
            _drop(tmp)
            raise
        return True

    def discard(self) -> None:
        tmp, self._tmp = self._tmp, None
        if tmp is not None:
            _drop(tmp)

    def __del__(self) -> None:
        if getattr(self, "_tmp", None) is not None:
            self.discard()
