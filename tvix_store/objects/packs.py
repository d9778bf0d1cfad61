"""`PackObjectStore`: objects appended to pack files, located by a SQLite index — the embedded
store's layout (`local://`), version 2.

Layout (`docs/storage.md` has the format, the measurements behind it and the crash argument):

    ROOT/TVIX-STORE          marker: "tvix-store local store, layout 2 (packs)"
    ROOT/index.sqlite        the index (WAL mode; -wal and -shm beside it): where each object is
    ROOT/packs/<id>.pack     objects' bytes back to back, no framing (the index has the bounds)

Index: `objects(kind, name, pack, offset, size, mtime)` keyed by (kind, name), a name of 64
hex characters kept as its 32 bytes; `packs(id, pidns, pid, sealed)` says which process
appends to which pack. SQLite was chosen over LMDB by measurement (docs/storage.md): slower
per commit, but in the standard library, with the queries GC and repacking need.

Writes: every process appends to its own pack (a new one once `PACK_SIZE` is reached), at
offsets it reserves under a lock, so threads write in parallel; the index row is inserted
(one SQLite transaction, put-if-absent) only after the bytes are written. So an object is
visible whole or not at all, in every process at once; bytes without a row (a writer killed
mid-way, a lost put race, a discarded stage, a deleted object) are dead space, never read.
A pack whose writer is gone is sealed on the next open, and by a sweep every minute in every
process that has the store open: its torn tail (beyond its last indexed byte) is cut off.
`fsync=True`: the pack is fdatasync'ed before its rows are committed and SQLite runs with
synchronous=FULL (power-loss durability); without, SQLite runs with synchronous=NORMAL (the
index is never corrupted; it syncs at checkpoints only): a killed process loses nothing
committed (the OS has it), power loss may lose the newest objects.

Reads: one index look-up (a primary-key probe) and one `pread`; pack file descriptors are
kept open (LRU). Verification stays with the services (they hash what they read).
Deleting removes the row; `reclaim()` rewrites sealed packs whose live fraction is below
`REPACK_BELOW` (live objects copied to this process's pack, rows moved in one transaction
per batch, the old file unlinked) and cuts dead tails. A reader that looked up a location in
a pack being unlinked looks again.

Migration: a directory in layout 1 (`tvix_store.objects.files`, one file per object) is
converted on open, under an exclusive flock of `ROOT/MIGRATE.lock`: every object file is
added to a pack, then removed; the marker is rewritten last. An interrupted migration
resumes on the next open; nothing is lost at any instant.

Not here: verification, eviction (`bounded`; the persistent cache stays one file per
object, where LRU eviction is an unlink), the GC's choice of what to delete.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import logging
import os
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from tvix_store.core.errors import ResourceExhaustedError, StoreError
from tvix_store.objects import KINDS, ObjectInfo, ObjectStore, Staged, split_key
from tvix_store.objects.files import MARKER, _pid_alive, _pid_namespace, _start_sweeping, _stop_sweeping
from tvix_store.objects.files import MARKER_TEXT as FILES_MARKER_TEXT

log = logging.getLogger(__name__)

LAYOUT_VERSION = 2
MARKER_TEXT = f"tvix-store local store, layout {LAYOUT_VERSION} (packs)\n"
INDEX = "index.sqlite"
PACKS = "packs"
MIGRATE_LOCK = "MIGRATE.lock"
#: a pack grows to this size, then its writer starts a new one: repacking one rewrites at most
#: this much, and a store of N GiB is 4N files
PACK_SIZE = 256 << 20
#: `reclaim` rewrites a sealed pack whose live bytes are below this fraction of its size: after
#: a gc at most 10 % of a pack is dead space, at a cost of at most 9 bytes copied per byte freed
REPACK_BELOW = 0.9
#: open pack file descriptors kept (read side)
OPEN_PACKS = 256
#: read-ahead hints: objects waiting at most, and threads issuing them
MAX_ADVISED = 4096
ADVISE_THREADS = 2
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})

_HEX_NAME = 64

_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects(
    kind INTEGER NOT NULL, name BLOB NOT NULL,
    pack INTEGER NOT NULL, offset INTEGER NOT NULL, size INTEGER NOT NULL, mtime INTEGER NOT NULL,
    PRIMARY KEY(kind, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS packs(
    id INTEGER PRIMARY KEY AUTOINCREMENT, pidns INTEGER NOT NULL, pid INTEGER NOT NULL,
    sealed INTEGER NOT NULL DEFAULT 0
);
"""


F = TypeVar("F", bound=Callable[..., Any])


def _index_errors(method: F) -> F:
    """SQLite failures as the store's errors: a full disk is ResourceExhaustedError, anything
    else a StoreError naming the index (never a raw sqlite3 exception to the caller)."""

    @functools.wraps(method)
    def wrapper(self: PackObjectStore, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as e:
            if isinstance(e, sqlite3.OperationalError) and "full" in str(e):
                raise ResourceExhaustedError(f"store directory {self.root}: no space left on device") from None
            raise StoreError(f"store index {self.root / INDEX}: {e}") from None

    return wrapper  # type: ignore[return-value]


#: kind numbers in the index are positions in `KINDS` (which only ever grows at its end); a
#: name that is not 64 hex characters is kept as text under its kind's number + TEXT
TEXT = 1000


def _encode_key(key: str) -> tuple[int, bytes]:
    """(kind number, name bytes): a 64-hex name as its 32 bytes, any other name as text under
    a kind number of its own (so the two never collide)."""
    kind, name = split_key(key)
    k = KINDS.index(kind)
    if len(name) == _HEX_NAME:
        try:
            raw = bytes.fromhex(name)
        except ValueError:
            raw = b""
        if raw and raw.hex() == name:
            return k, raw
    return k + TEXT, name.encode()


def _decode_key(k: int, name: bytes) -> str:
    if k < TEXT:
        return f"{KINDS[k]}/{name.hex()}"
    return f"{KINDS[k - TEXT]}/{name.decode()}"


def _kinds_for(prefix: str) -> list[int]:
    out = []
    for i, kind in enumerate(KINDS):
        if (kind + "/").startswith(prefix) or prefix.startswith(kind + "/"):
            out += [i, i + TEXT]
    return out


class PackObjectStore(ObjectStore):
    """Objects in pack files under `root` (see the module docstring). Thread-safe; any number
    of processes may share one directory."""

    def __init__(self, root: Path, *, fsync: bool = False) -> None:
        self.root = root
        self.fsync = fsync
        self._root = str(root)
        self._packs_dir = os.path.join(self._root, PACKS)
        self._ns = _pid_namespace()
        self._pid = os.getpid()
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._lock = threading.Lock()
        self._closed = False
        # this process's pack being appended to, and writes not yet committed per pack
        self._wpack = -1
        self._wfd = -1
        self._wend = 0
        self._pending: dict[int, int] = {}
        self._retired: set[int] = set()
        self._wfds: dict[int, int] = {}  # write fds of the current and retired-but-pending packs
        # read side: open pack fds, LRU
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._last_touch = 0
        self._advised = 0
        self._advise_pool: ThreadPoolExecutor | None = None
        try:
            self._open()
        except sqlite3.Error as e:
            self.close()
            raise StoreError(f"cannot open store index {root / INDEX}: {e}") from None
        except OSError as e:
            self.close()
            raise StoreError(f"cannot open store directory {root}: {e.strerror or e}") from None
        except BaseException:
            self.close()
            raise

    # --- opening ---------------------------------------------------------------------

    def _open(self) -> None:
        root = self.root
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create store directory {root}: {e.strerror}") from None
        if not root.is_dir():
            raise StoreError(f"store path {root} is not a directory")
        if self._marker() != MARKER_TEXT:
            self._create_or_migrate()
        os.makedirs(self._packs_dir, exist_ok=True)
        self._db().executescript(_SCHEMA)
        self._seal_orphans()
        _start_sweeping(self)

    @_index_errors
    def clean_tmp(self) -> int:
        """Seal the packs of writers that are gone, cutting their torn tails (run at open and
        every `files.SWEEP_INTERVAL` seconds while the store is open); returns how many."""
        return self._seal_orphans()

    def _create_or_migrate(self) -> None:
        """Under the migration lock (concurrent first opens wait for each other): check a new
        directory is empty, or convert layout 1; write the marker last."""
        root = self.root
        lock = os.open(os.path.join(self._root, MIGRATE_LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            text = self._marker()
            if text == MARKER_TEXT:
                return  # another process did it while this one waited
            if text is None:
                known = {*KINDS, "tmp", MARKER, PACKS, MIGRATE_LOCK, "LOCK", "gc.lock", "gc.gate"}
                foreign = sorted(p.name for p in root.iterdir() if p.name not in known and not p.name.startswith(INDEX))
                if foreign:
                    raise StoreError(
                        f"{root} is not empty and not a tvix-store directory (found {', '.join(foreign[:3])})"
                    )
            elif text != FILES_MARKER_TEXT:
                raise StoreError(
                    f"{root}: unsupported store layout {text.strip()!r} (this version reads layouts 1 and 2)"
                )
            os.makedirs(self._packs_dir, exist_ok=True)
            self._db().executescript(_SCHEMA)
            if text is not None:
                self._migrate()
            self._write_marker()
        finally:
            os.close(lock)

    def _marker(self) -> str | None:
        try:
            return (self.root / MARKER).read_text()
        except FileNotFoundError:
            return None

    def _write_marker(self) -> None:
        tmp = os.path.join(self._root, f".{MARKER}.{self._pid}.tmp")
        with open(tmp, "w") as f:
            f.write(MARKER_TEXT)
            if self.fsync:
                f.flush()
                os.fsync(f.fileno())
        os.rename(tmp, os.path.join(self._root, MARKER))

    # --- the index -------------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        """This thread's connection to the index."""
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is not None:
            return db
        if self._closed:
            raise StoreError(f"store {self.root} is closed")
        db = sqlite3.connect(os.path.join(self._root, INDEX), isolation_level=None, check_same_thread=False, timeout=60)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={'FULL' if self.fsync else 'NORMAL'}")
        db.execute("PRAGMA cache_size=-4096")
        self._local.db = db
        with self._conns_lock:
            self._conns.append(db)
        return db

    class _Tx:
        def __init__(self, db: sqlite3.Connection) -> None:
            self.db = db

        def __enter__(self) -> sqlite3.Connection:
            self.db.execute("BEGIN IMMEDIATE")
            return self.db

        def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
            if exc_type is None:
                self.db.execute("COMMIT")
            else:
                self.db.execute("ROLLBACK")

    def _tx(self, db: sqlite3.Connection) -> PackObjectStore._Tx:
        return PackObjectStore._Tx(db)

    def _locate(self, key: str) -> tuple[int, int, int] | None:
        k, name = _encode_key(key)
        row = self._db().execute("SELECT pack, offset, size FROM objects WHERE kind=? AND name=?", (k, name)).fetchone()
        return None if row is None else (row[0], row[1], row[2])

    @_index_errors
    def locate(self, key: str) -> tuple[Path, int, int] | None:
        """Where an object's bytes are: (pack file, offset, size), or None (for tools and tests)."""
        loc = self._locate(key)
        return None if loc is None else (Path(self._pack_path(loc[0])), loc[1], loc[2])

    def _stamp(self) -> int:
        with self._lock:
            self._last_touch = max(time.time_ns(), self._last_touch + 1)
            return self._last_touch

    # --- the write side --------------------------------------------------------------

    def _full(self, e: OSError) -> ResourceExhaustedError:
        why = "" if e.errno == errno.ENOSPC else " (disk quota exceeded)"
        return ResourceExhaustedError(f"store directory {self.root}: no space left on device{why}")

    def _next_pack(self) -> None:
        """Make a pack this process's current one (the lock is held): a sealed one that is less
        than half full (adopted), or a new one."""
        self._retire()
        db = self._db()
        with self._tx(db):
            pack = 0
            for (cand,) in db.execute("SELECT id FROM packs WHERE sealed=1 ORDER BY id DESC LIMIT 8").fetchall():
                try:
                    if os.stat(self._pack_path(cand)).st_size < PACK_SIZE // 2:
                        pack = cand
                        break
                except FileNotFoundError:
                    continue
            if pack:
                db.execute("UPDATE packs SET sealed=0, pidns=?, pid=? WHERE id=?", (self._ns, self._pid, pack))
            else:
                pack = int(
                    db.execute("INSERT INTO packs(pidns, pid) VALUES (?, ?)", (self._ns, self._pid)).lastrowid or 0
                )
        # an adopted pack is appended to after whatever it holds (a dead tail stays dead space)
        fd = os.open(self._pack_path(pack), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        end = os.fstat(fd).st_size
        self._wpack, self._wfd, self._wend = pack, fd, end
        self._wfds[pack] = fd
        self._pending.setdefault(pack, 0)

    def _retire(self) -> None:
        """Stop appending to the current pack; seal it once no write into it is pending."""
        if self._wfd < 0:
            return
        pack = self._wpack
        self._wpack, self._wfd = -1, -1
        if self._pending.get(pack, 0) == 0:
            self._seal(pack)
        else:
            self._retired.add(pack)

    def _seal(self, pack: int) -> None:
        """No more rows will point into `pack` from this process: it may be adopted or repacked
        (the lock is held)."""
        self._pending.pop(pack, None)
        self._retired.discard(pack)
        fd = self._wfds.pop(pack, -1)
        if fd >= 0:
            try:
                if self.fsync:
                    os.fdatasync(fd)
            finally:
                os.close(fd)
        self._db().execute("UPDATE packs SET sealed=1 WHERE id=? AND pid=? AND pidns=?", (pack, self._pid, self._ns))

    @_index_errors
    def _done(self, pack: int) -> None:
        """A write into `pack` was committed or dropped."""
        with self._lock:
            n = self._pending.get(pack, 0) - 1
            self._pending[pack] = max(0, n)
            if n <= 0 and pack in self._retired:
                self._seal(pack)

    def _pack_path(self, pack: int) -> str:
        return f"{self._packs_dir}/{pack}.pack"

    def _append(self, data: bytes | bytearray | memoryview) -> tuple[int, int, int]:
        """Write `data` at a reserved place of this process's pack: (pack, offset, fd). The
        write counts as pending in that pack until `_done(pack)`."""
        mv = memoryview(data).cast("B")
        n = len(mv)
        with self._lock:
            if self._closed:
                raise StoreError(f"store {self.root} is closed")
            try:
                if self._wfd < 0 or (self._wend > 0 and self._wend + n > PACK_SIZE):
                    self._next_pack()
            except OSError as e:
                if e.errno in DISK_FULL:
                    raise self._full(e) from None
                raise
            pack, fd, off = self._wpack, self._wfd, self._wend
            self._wend += n
            self._pending[pack] = self._pending.get(pack, 0) + 1
        try:
            done = 0
            while done < n:
                done += os.pwrite(fd, mv[done:], off + done)
        except OSError as e:
            self._done(pack)
            if e.errno in DISK_FULL:
                raise self._full(e) from None
            raise
        except BaseException:
            self._done(pack)
            raise
        return pack, off, fd

    def _durable(self, fd: int) -> None:
        if self.fsync:
            try:
                os.fdatasync(fd)
            except OSError as e:
                if e.errno in DISK_FULL:
                    raise self._full(e) from None
                raise

    @_index_errors
    def _insert(self, key: str, pack: int, off: int, size: int, replace: bool) -> bool:
        k, name = _encode_key(key)
        verb = "INSERT OR REPLACE" if replace else "INSERT OR IGNORE"
        cur = self._db().execute(
            f"{verb} INTO objects(kind, name, pack, offset, size, mtime) VALUES (?, ?, ?, ?, ?, ?)",
            (k, name, pack, off, size, self._stamp()),
        )
        return cur.rowcount > 0

    @_index_errors
    def put(self, key: str, data: bytes | bytearray | memoryview, *, replace: bool = False) -> bool:
        if not replace and self._locate(key) is not None:
            return False
        pack, off, fd = self._append(data)
        try:
            self._durable(fd)
            return self._insert(key, pack, off, len(data), replace)
        finally:
            self._done(pack)

    @_index_errors
    def stage(self, data: bytes | bytearray | memoryview) -> Staged:
        pack, off, fd = self._append(data)
        return _PackStaged(self, pack, off, len(data), fd)

    @_index_errors
    def delete(self, key: str) -> bool:
        k, name = _encode_key(key)
        cur = self._db().execute("DELETE FROM objects WHERE kind=? AND name=?", (k, name))
        return cur.rowcount > 0

    @_index_errors
    def touch(self, key: str) -> None:
        k, name = _encode_key(key)
        self._db().execute("UPDATE objects SET mtime=? WHERE kind=? AND name=?", (self._stamp(), k, name))

    # --- the read side ---------------------------------------------------------------

    def _fd(self, pack: int) -> int:
        with self._lock:
            fd = self._fds.get(pack)
            if fd is not None:
                self._fds.move_to_end(pack)
                return fd
        fd = os.open(self._pack_path(pack), os.O_RDONLY | os.O_CLOEXEC)
        with self._lock:
            old = self._fds.get(pack)
            if old is not None:
                os.close(fd)
                return old
            self._fds[pack] = fd
            while len(self._fds) > OPEN_PACKS:
                _, victim = self._fds.popitem(last=False)
                os.close(victim)
        return fd

    def _forget_fd(self, pack: int) -> None:
        with self._lock:
            fd = self._fds.pop(pack, None)
        if fd is not None:
            os.close(fd)

    def _read(self, key: str, offset: int = 0, length: int | None = None) -> bytes | None:
        for attempt in (0, 1):
            loc = self._locate(key)
            if loc is None:
                return None
            pack, off, size = loc
            start = min(offset, size)
            n = size - start if length is None else max(0, min(length, size - start))
            try:
                data = os.pread(self._fd(pack), n, off + start)
            except FileNotFoundError:
                if attempt:
                    raise
                continue  # repacked meanwhile: look again
            except OSError as e:
                if e.errno == errno.EBADF and not attempt:
                    self._forget_fd(pack)
                    continue
                raise
            if len(data) == n:
                return data
            if attempt:
                raise StoreError(f"{key}: pack {pack} ends before the object does (damaged store)")
            self._forget_fd(pack)  # the file was replaced by a repack: read the new one
        return None

    @_index_errors
    def get(self, key: str) -> bytes | None:
        return self._read(key)

    @_index_errors
    def get_range(self, key: str, offset: int, length: int) -> bytes | None:
        return self._read(key, offset, length)

    @_index_errors
    def stat(self, key: str) -> int | None:
        loc = self._locate(key)
        return None if loc is None else loc[2]

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        for k in _kinds_for(prefix):
            rows = self._rows(k)
            for name, size, mtime in rows:
                key = _decode_key(k, name)
                if key.startswith(prefix):
                    yield ObjectInfo(key, size, mtime / 1e9)

    @_index_errors
    def _rows(self, k: int) -> list[tuple[bytes, int, int]]:
        return self._db().execute("SELECT name, size, mtime FROM objects WHERE kind=?", (k,)).fetchall()

    # --- read-ahead hints ------------------------------------------------------------

    def advise(self, keys: list[str]) -> None:
        """Ask the kernel to read these objects' bytes into the page cache (WILLNEED), from a
        background thread; dropped when MAX_ADVISED are already waiting (never blocks)."""
        with self._lock:
            if not keys or self._advised + len(keys) > MAX_ADVISED or self._closed:
                return
            self._advised += len(keys)
            if self._advise_pool is None:
                self._advise_pool = ThreadPoolExecutor(max_workers=ADVISE_THREADS, thread_name_prefix="tvix-advise")
            pool = self._advise_pool
        for i in range(0, len(keys), 64):
            pool.submit(self._willneed, keys[i : i + 64])

    @property
    def advised(self) -> int:
        return self._advised

    def _willneed(self, keys: list[str]) -> None:
        try:
            for key in keys:
                if self._closed:  # close() waits for this thread: stop soon
                    break
                loc = self._locate(key)
                if loc is None:
                    continue
                try:
                    os.posix_fadvise(self._fd(loc[0]), loc[1], loc[2], os.POSIX_FADV_WILLNEED)
                except OSError:
                    continue
        except Exception as e:  # noqa: BLE001 - a hint; the reads will see any real error
            log.debug("read-ahead hint failed: %s", e)
        finally:
            with self._lock:
                self._advised -= len(keys)

    # --- sealing, repacking ----------------------------------------------------------

    def _seal_orphans(self) -> int:
        """Seal the packs whose writer is gone, cutting each torn tail off; give back the packs
        a dead process was repacking (their bytes are intact until the repack's last step)."""
        db = self._db()
        sealed = 0
        rows = db.execute("SELECT id, pidns, pid, sealed FROM packs WHERE sealed IN (0, 2)").fetchall()
        for pack, pidns, pid, state in rows:
            if pidns == self._ns and self._ns != 0:
                if pid == self._pid or _pid_alive(pid):
                    continue
            elif time.time() - self._mtime(pack) < 3600:
                continue  # a writer this process cannot see: only once its pack is old
            with self._tx(db):
                if (
                    db.execute(
                        "UPDATE packs SET sealed=1 WHERE id=? AND pid=? AND pidns=? AND sealed=?",
                        (pack, pid, pidns, state),
                    ).rowcount
                    and state == 0
                ):
                    self._cut_tail(pack)
                    sealed += 1
        return sealed

    def _mtime(self, pack: int) -> float:
        try:
            return os.stat(self._pack_path(pack)).st_mtime
        except FileNotFoundError:
            return 0.0

    def _cut_tail(self, pack: int) -> None:
        end = self._db().execute("SELECT MAX(offset + size) FROM objects WHERE pack=?", (pack,)).fetchone()[0] or 0
        path = self._pack_path(pack)
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            return
        if size > end:
            log.info("pack %d: cutting %d bytes of torn or dead tail", pack, size - end)
            os.truncate(path, end)

    def _claim(self, pack: int) -> bool:
        """Take a sealed pack for repacking or removal (nobody adopts it meanwhile)."""
        return bool(
            self._db()
            .execute("UPDATE packs SET sealed=2, pidns=?, pid=? WHERE id=? AND sealed=1", (self._ns, self._pid, pack))
            .rowcount
        )

    @_index_errors
    def reclaim(self) -> int:
        """Rewrite sealed packs whose live fraction is below REPACK_BELOW, unlink those with
        nothing live, cut dead tails. Returns the bytes freed."""
        self._seal_orphans()
        db = self._db()
        sealed = [r[0] for r in db.execute("SELECT id FROM packs WHERE sealed=1 ORDER BY id")]
        live: dict[int, tuple[int, int]] = dict.fromkeys(sealed, (0, 0))
        for pack, total, end in db.execute("SELECT pack, SUM(size), MAX(offset + size) FROM objects GROUP BY pack"):
            if pack in live:
                live[pack] = (total, end)
        freed = 0
        for pack in sealed:
            path = self._pack_path(pack)
            try:
                size = os.stat(path).st_size
            except FileNotFoundError:
                size = 0
            total, end = live[pack]
            if total < size * REPACK_BELOW or total == 0:
                if not self._claim(pack):
                    continue  # adopted by a writer meanwhile
                freed += size - self._repack(pack)
            elif size > end:
                with self._tx(db):  # writers wait: no adoption, no new rows meanwhile
                    if db.execute("SELECT sealed FROM packs WHERE id=?", (pack,)).fetchone() != (1,):
                        continue  # adopted meanwhile: its writer appends there
                    end = db.execute("SELECT MAX(offset + size) FROM objects WHERE pack=?", (pack,)).fetchone()[0]
                    size = os.stat(path).st_size
                    if end and size > end:
                        os.truncate(path, end)
                        freed += size - end
        return freed

    def _repack(self, pack: int) -> int:
        """Copy a claimed pack's live objects into this process's pack; unlink it. Returns the
        bytes still held for them (now in the new pack)."""
        db = self._db()
        rows = db.execute("SELECT kind, name, offset, size FROM objects WHERE pack=?", (pack,)).fetchall()
        moved = 0
        if rows:
            src = self._fd(pack)
            for k, name, off, size in rows:
                data = os.pread(src, size, off)
                if len(data) != size:
                    raise StoreError(f"pack {pack} ends before object {_decode_key(k, name)} does (damaged store)")
                npack, noff, fd = self._append(data)
                try:
                    self._durable(fd)
                    cur = db.execute(
                        "UPDATE objects SET pack=?, offset=? WHERE kind=? AND name=? AND pack=? AND offset=?",
                        (npack, noff, k, name, pack, off),
                    )
                finally:
                    self._done(npack)
                if cur.rowcount:
                    moved += size
        with self._tx(db):
            if db.execute("SELECT 1 FROM objects WHERE pack=? LIMIT 1", (pack,)).fetchone():
                raise StoreError(f"pack {pack} still holds objects after its repack")
            db.execute("DELETE FROM packs WHERE id=?", (pack,))
        self._forget_fd(pack)
        _unlink(self._pack_path(pack))
        return moved

    # --- migration from layout 1 -----------------------------------------------------

    def _migrate(self) -> None:
        """Move every object file of layout 1 into packs (the migration lock is held): each
        file is removed only once its object is indexed, so an interrupted run loses nothing
        and the next open finishes it."""
        moved = 0
        for kind in KINDS:
            base = os.path.join(self._root, kind)
            for path, name in _layout1_files(base):
                with open(path, "rb") as f:
                    data = f.read()
                self.put(f"{kind}/{name}", data, replace=(kind == "pathinfos"))
                os.unlink(path)
                moved += 1
        with self._lock:
            if self._wfd >= 0:
                self._durable(self._wfd)
        for kind in (*KINDS, "tmp"):
            _remove_tree(os.path.join(self._root, kind))
        if moved:
            log.info("%s: moved %d objects of layout 1 into packs", self.root, moved)

    # --- closing ---------------------------------------------------------------------

    def close(self) -> None:
        _stop_sweeping(self)
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pool, self._advise_pool = self._advise_pool, None
        if pool is not None:
            # before any connection closes: closing a SQLite connection another thread is
            # querying is a use after free (a hint thread at exit crashed `nar` with SIGSEGV)
            pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            fds = list(self._fds.values())
            self._fds.clear()
            try:
                self._retire()
                for pack in list(self._wfds):
                    self._seal(pack)  # writes still pending can no longer commit
            except (OSError, sqlite3.Error, StoreError) as e:
                # (a full disk, typically) the pack stays unsealed: the next open seals it,
                # as it does the pack of any writer that is gone
                log.debug("%s: closing: %s", self.root, e)
                for fd in self._wfds.values():
                    os.close(fd)
                self._wfds.clear()
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for fd in fds:
            os.close(fd)
        for db in conns:
            try:
                db.close()
            except sqlite3.Error:
                pass


class _PackStaged(Staged):
    """Bytes in a pack without an index row: visible on `commit`, dead space otherwise."""

    def __init__(self, store: PackObjectStore, pack: int, off: int, size: int, fd: int) -> None:
        self._store = store
        self._loc: tuple[int, int, int] | None = (pack, off, fd)
        self.size = size

    def commit(self, key: str) -> bool:
        loc = self._loc
        if loc is None:
            raise ValueError("commit of a discarded staged object")
        self._loc = None
        pack, off, fd = loc
        try:
            self._store._durable(fd)
            return self._store._insert(key, pack, off, self.size, False)
        finally:
            self._store._done(pack)

    def discard(self) -> None:
        loc, self._loc = self._loc, None
        if loc is not None:
            self._store._done(loc[0])

    def __del__(self) -> None:
        if getattr(self, "_loc", None) is not None:
            self.discard()


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _layout1_files(base: str) -> Iterator[tuple[str, str]]:
    """(path, name) of every object file of one kind directory of layout 1."""
    try:
        top = list(os.scandir(base))
    except FileNotFoundError:
        return
    for e in top:
        if e.is_dir(follow_symlinks=False):
            for f in os.scandir(e.path):
                if f.is_file(follow_symlinks=False) and not f.name.startswith("."):
                    yield f.path, f.name
        elif e.is_file(follow_symlinks=False) and not e.name.startswith("."):
            yield e.path, e.name


def _remove_tree(path: str) -> None:
    """Remove a (shallow) directory of layout 1 and what is left in it."""
    try:
        entries = list(os.scandir(path))
    except FileNotFoundError:
        return
    for e in entries:
        if e.is_dir(follow_symlinks=False):
            _remove_tree(e.path)
        else:
            _unlink(e.path)
    try:
        os.rmdir(path)
    except OSError:
        pass
