"""`FileObjectStore`: one file per object in a directory — the embedded store's layout and the
persistent cache's (one layout for both).

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

Temp files of killed writers are removed on open: in an exclusive store all of them (the
owner is the only writer), else those whose writer (the pid in the name) no longer runs, when
it ran in this PID namespace (named in the file too); a file of another namespace (a
container sharing the directory) only once it is an hour old.

Not here: verification (the services hash what they read), eviction (`bounded`).
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tvix_store.core.errors import StoreError
from tvix_store.objects import KINDS, ObjectInfo, ObjectStore, Staged, split_key

log = logging.getLogger(__name__)

LAYOUT_VERSION = 1
MARKER = "TVIX-STORE"
MARKER_TEXT = f"tvix-store local store, layout {LAYOUT_VERSION}\n"
LOCK = "LOCK"
STALE_TMP_AGE = 3600.0

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


class FileObjectStore(ObjectStore):
    """Objects as files under `root` (see the module docstring). Thread-safe."""

    def __init__(self, root: Path, *, fsync: bool = False, exclusive: bool = False) -> None:
        self.root = root
        self.fsync = fsync
        self._root = str(root)
        self._tmp = os.path.join(self._root, "tmp")
        self._prefix = f"{_pid_namespace()}.{os.getpid()}.{secrets.token_hex(6)}."
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
        if not self.writable:
            return
        for kind in (*KINDS, "tmp"):
            os.makedirs(os.path.join(self._root, kind), exist_ok=True)
        if text is None:
            self._publish(self._write_tmp(MARKER_TEXT.encode()), str(marker))
        self.clean_tmp(0.0 if exclusive else STALE_TMP_AGE, check_pid=not exclusive)

    def clean_tmp(self, max_age: float = STALE_TMP_AGE, check_pid: bool = True) -> int:
        """Remove temp files of dead writers (see the module docstring); returns how many.

        With `check_pid` False every temp file older than `max_age` goes (an exclusive owner)."""
        now = time.time()
        ns = _pid_namespace()
        removed = 0
        try:
            entries = list(os.scandir(self._tmp))
        except FileNotFoundError:
            return 0
        for e in entries:
            parts = e.name.split(".")
            try:
                pidns, pid = (int(parts[0]), int(parts[1])) if len(parts) == 4 else (-1, -1)
            except ValueError:
                pidns, pid = -1, -1
            try:
                age = now - e.stat(follow_symlinks=False).st_mtime
                if check_pid:
                    ours = pidns == ns and ns != 0
                    if ours and _pid_alive(pid):
                        continue  # a live writer
                    if not ours and age < max_age:
                        continue  # a writer we cannot see: only once it is old
                elif age < max_age:
                    continue
                os.unlink(e.path)
                removed += 1
            except FileNotFoundError:
                continue
            except OSError as err:
                log.warning("cannot remove stale temp file %s: %s", e.path, err.strerror)
        if removed:
            log.info("removed %d stale temp files from %s", removed, self._tmp)
        return removed

    # --- paths -----------------------------------------------------------------------

    def path(self, key: str) -> str:
        """The file of an object (sharded by the first two characters of a 64-hex name)."""
        kind, name = split_key(key)
        if len(name) == 64:
            return f"{self._root}/{kind}/{name[:2]}/{name}"
        return f"{self._root}/{kind}/{name}"

    def _tmp_path(self) -> str:
        with self._lock:
            self._seq += 1
            seq = self._seq
        return f"{self._tmp}/{self._prefix}{seq}"

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
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            mv = memoryview(data).cast("B")
            while mv:
                n = os.write(fd, mv)
                mv = mv[n:]
            if self.fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            _unlink(tmp)
            raise
        os.close(fd)
        return tmp

    def _publish(self, tmp: str, final: str) -> None:
        """Rename a temp file into place (creating the shard directory on first use)."""
        try:
            os.rename(tmp, final)
        except FileNotFoundError:
            if not os.path.exists(tmp):
                raise
            os.makedirs(os.path.dirname(final), exist_ok=True)
            os.rename(tmp, final)
        if self.fsync:
            fd = os.open(os.path.dirname(final), os.O_RDONLY | os.O_DIRECTORY)
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
            _unlink(tmp)
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
            _unlink(tmp)
            raise
        return True

    def discard(self) -> None:
        tmp, self._tmp = self._tmp, None
        if tmp is not None:
            _unlink(tmp)

    def __del__(self) -> None:
        if getattr(self, "_tmp", None) is not None:
            self.discard()
