"""The embedded on-disk store (`local:///path`): directory layout, atomic writes, fsck.

This module owns the files of a store directory; the three services over it are
`tvix_store.{blobservice,directoryservice,pathinfoservice}.local`. It is not a cache
(no eviction) and has no garbage collection.

Layout (version 1; every object file is named by the lowercase hex of its digest):

    ROOT/TVIX-STORE                     marker: "tvix-store local store, layout 1"
    ROOT/chunks/<2 hex>/<64 hex>        the raw bytes of one chunk (1 B … 1 MiB)
    ROOT/blobs/<2 hex>/<64 hex>         chunk list of a multi-chunk blob, or of the empty blob
    ROOT/directories/<2 hex>/<64 hex>   a Directory's deterministic protobuf encoding
    ROOT/pathinfos/<32 nixbase32>       a PathInfo protobuf message, by store path hash
    ROOT/tmp/<pid>.<random>.<n>         files being written (never read as objects)

- A chunk IS a one-chunk blob: a blob cut into a single chunk (every blob < 64 KiB, most
  below 1 MiB) is just its chunk file, and `chunks(d)` answers `[ChunkMeta(d, size)]`.
- A blob record (`blobs/`) is: `b"tvixblb1"`, total size (u64 LE), chunk count (u32 LE),
  count × (32-byte chunk digest, u32 LE chunk size), then the first 16 bytes of the
  BLAKE3 of everything before it (so a damaged record is detected, not misread).
  The empty blob is a record with no chunks; it answers `[]`.

Writes: an object is written to a fresh file in `tmp/` and renamed into place (atomic on
POSIX); an object is therefore visible only when complete, and two processes writing
the same object race harmlessly (same name, same bytes). A blob writer stages its
chunks in `tmp/` as it goes and renames them into `chunks/` only on `close()`, before
the blob record: an aborted or killed writer leaves nothing visible. Files in `tmp/`
left by killed writers are removed when a store is opened, once older than an hour
and their writer process (the pid in the name) no longer runs on this host.

Reads re-verify: every chunk read is hashed (BLAKE3) and compared with its name
(IntegrityError on mismatch), every Directory likewise; blob records carry a checksum.

Concurrency: any number of processes (a daemon, CLI commands) and threads may use one
store directory at once; no locks, only atomic renames. Objects are never modified or
deleted in place (a PathInfo may be replaced by a new one, atomically).

Durability: a process killed at any instant (kill -9) leaves a consistent store. Power
loss or a kernel crash needs `local:///path?fsync=1`: then every file is fsynced before
its rename and its directory after it (chunks before the record that lists them), at a
cost in write throughput.

Measured (2-core VM, load average 5-6 from other jobs, 512 MiB of random bytes, fresh
store, RAM pre-touched before each run): `tvix-store blob put` 0.9-3.6 s (median of 9
≈ 2.0 s), in-process `open_write` 0.9-1.6 s; `nix-store --add` of the same file in the
same runs 0.55-3.6 s (median ≈ 0.68 s). The CPU work is small (chunk scan 0.21 s, BLAKE3
0.2 s, reading 0.03 s); `perf` shows ≈ 40 % of the put in ext4 inode allocation
(`__ext4_new_inode` → `recently_deleted`) for the ~1,800 chunk files, which one-file
`nix-store --add` does not pay. Packing a blob's new chunks into one file (with a
chunk index) would remove that cost; it is not done in layout 1.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, urlparse

import blake3

from tvix_store.digest import B3Digest
from tvix_store.errors import IntegrityError, StoreError, ValidationError
from tvix_store.store import Store

log = logging.getLogger(__name__)

LAYOUT_VERSION = 1
MARKER = "TVIX-STORE"
MARKER_TEXT = f"tvix-store local store, layout {LAYOUT_VERSION}\n"
KINDS = ("chunks", "blobs", "directories", "pathinfos")
STALE_TMP_AGE = 3600.0

_RECORD_MAGIC = b"tvixblb1"
_RECORD_HEAD = struct.Struct("<8sQI")
_RECORD_ENTRY = struct.Struct("<32sI")
_RECORD_SUM = 16


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StoreDir:
    """The files of one store directory: paths, atomic writes, verified reads. Thread-safe."""

    def __init__(self, root: Path, fsync: bool = False) -> None:
        self.root = root
        self.fsync = fsync
        self._root = str(root)
        self._tmp = os.path.join(self._root, "tmp")
        self._prefix = f"{os.getpid()}.{secrets.token_hex(6)}."
        self._seq = 0
        self._lock = threading.Lock()
        self._open()

    # --- opening ---------------------------------------------------------------------

    def _open(self) -> None:
        root = self.root
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create store directory {root}: {e.strerror}") from None
        if not root.is_dir():
            raise StoreError(f"store path {root} is not a directory")
        marker = root / MARKER
        try:
            text = marker.read_text()
        except FileNotFoundError:
            text = None
        except OSError as e:
            raise StoreError(f"cannot read {marker}: {e.strerror}") from None
        if text is None:
            foreign = sorted(p.name for p in root.iterdir() if p.name not in (*KINDS, "tmp", MARKER))
            if foreign:
                raise StoreError(f"{root} is not empty and not a tvix-store directory (found {', '.join(foreign[:3])})")
        elif text != MARKER_TEXT:
            raise StoreError(f"{root}: unsupported store layout {text.strip()!r} (this version reads layout 1)")
        for kind in (*KINDS, "tmp"):
            os.makedirs(os.path.join(self._root, kind), exist_ok=True)
        if text is None:
            self.write_atomic(str(marker), MARKER_TEXT.encode(), replace=True)
        self.clean_tmp()

    def clean_tmp(self, max_age: float = STALE_TMP_AGE) -> int:
        """Remove temp files of dead writers older than `max_age` seconds; returns how many."""
        now = time.time()
        removed = 0
        try:
            entries = list(os.scandir(self._tmp))
        except FileNotFoundError:
            return 0
        for e in entries:
            try:
                pid = int(e.name.split(".", 1)[0])
            except ValueError:
                pid = -1
            try:
                if now - e.stat(follow_symlinks=False).st_mtime < max_age or (pid > 0 and _pid_alive(pid)):
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

    def path(self, kind: str, name: str) -> str:
        """The path of an object: `ROOT/kind/<2 chars>/<name>` (pathinfos: `ROOT/pathinfos/<name>`)."""
        if kind == "pathinfos":
            return f"{self._root}/pathinfos/{name}"
        return f"{self._root}/{kind}/{name[:2]}/{name}"

    def tmp_path(self) -> str:
        with self._lock:
            self._seq += 1
            seq = self._seq
        return f"{self._tmp}/{self._prefix}{seq}"

    def iter_names(self, kind: str) -> Iterator[str]:
        """Names of the objects of one kind (a snapshot per shard directory, unsorted)."""
        base = os.path.join(self._root, kind)
        if kind == "pathinfos":
            yield from (e.name for e in os.scandir(base) if e.is_file())
            return
        for shard in sorted(os.listdir(base)):
            try:
                yield from (e.name for e in os.scandir(os.path.join(base, shard)))
            except (FileNotFoundError, NotADirectoryError):
                continue

    # --- writing ---------------------------------------------------------------------

    def write_tmp(self, data: bytes | bytearray | memoryview) -> str:
        """Write `data` to a new temp file (fsynced if configured); returns its path."""
        tmp = self.tmp_path()
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

    def publish(self, tmp: str, final: str) -> None:
        """Rename a temp file into place (creating the shard directory on first use)."""
        try:
            os.rename(tmp, final)
        except FileNotFoundError:
            if not os.path.exists(tmp):
                raise
            os.makedirs(os.path.dirname(final), exist_ok=True)
            os.rename(tmp, final)

    def sync_dirs(self, paths: set[str]) -> None:
        """fsync the directories containing these paths (fsync mode only)."""
        if not self.fsync:
            return
        for d in {os.path.dirname(p) for p in paths}:
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def write_atomic(self, final: str, data: bytes | bytearray | memoryview, replace: bool = False) -> bool:
        """Write an object atomically; unless `replace`, skip it if present. True if written."""
        if not replace and os.path.exists(final):
            return False
        tmp = self.write_tmp(data)
        try:
            self.publish(tmp, final)
        except BaseException:
            _unlink(tmp)
            raise
        self.sync_dirs({final})
        return True

    # --- reading ---------------------------------------------------------------------

    @staticmethod
    def read(path: str) -> bytes | None:
        """The whole file, or None if it does not exist."""
        try:
            with open(path, "rb", buffering=0) as f:
                return f.readall()
        except FileNotFoundError:
            return None

    def read_verified(self, kind: str, digest: B3Digest) -> bytes | None:
        """The object's bytes, checked against its BLAKE3 digest (IntegrityError if not)."""
        data = self.read(self.path(kind, digest.hex()))
        if data is None:
            return None
        check_digest({"chunks": "chunk", "directories": "directory"}.get(kind, kind), digest, data)
        return data


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def b3(data: bytes | bytearray | memoryview) -> bytes:
    """BLAKE3 of `data`, multithreaded for large inputs."""
    return blake3.blake3(data, max_threads=blake3.blake3.AUTO if len(data) >= 1 << 20 else 1).digest()


def check_digest(what: str, digest: B3Digest, data: bytes | bytearray | memoryview) -> None:
    got = b3(data)
    if got != digest:
        log.error("%s %s is corrupt on disk: its bytes hash to %s", what, digest.hex(), got.hex())
        raise IntegrityError(f"{what} {digest.hex()} is corrupt: its {len(data)} bytes hash to {got.hex()}")


# --- blob records ---------------------------------------------------------------------


def encode_record(chunks: list[tuple[bytes, int]]) -> bytes:
    """A blob record for chunks given as (digest, size) pairs."""
    body = bytearray(_RECORD_HEAD.pack(_RECORD_MAGIC, sum(s for _, s in chunks), len(chunks)))
    for d, s in chunks:
        body += _RECORD_ENTRY.pack(d, s)
    return bytes(body) + blake3.blake3(body).digest()[:_RECORD_SUM]


def decode_record(data: bytes, name: str) -> list[tuple[B3Digest, int]]:
    """Parse a blob record; IntegrityError if it is damaged."""
    head = _RECORD_HEAD.size
    if len(data) < head + _RECORD_SUM:
        raise IntegrityError(f"blob record {name} is truncated ({len(data)} bytes)")
    magic, total, count = _RECORD_HEAD.unpack_from(data)
    if magic != _RECORD_MAGIC or len(data) != head + count * _RECORD_ENTRY.size + _RECORD_SUM:
        raise IntegrityError(f"blob record {name} is damaged (bad header or length)")
    body = memoryview(data)[:-_RECORD_SUM]
    if blake3.blake3(body).digest()[:_RECORD_SUM] != data[-_RECORD_SUM:]:
        raise IntegrityError(f"blob record {name} is damaged (checksum mismatch)")
    out = [(B3Digest(d), s) for d, s in _RECORD_ENTRY.iter_unpack(body[head:])]
    if sum(s for _, s in out) != total:
        raise IntegrityError(f"blob record {name} is damaged (chunk sizes do not add up)")
    return out


# --- the store --------------------------------------------------------------------------


@dataclass
class VerifyReport:
    """What `LocalStore.verify` checked and the problems it found (one line each)."""

    chunks: int = 0
    blobs: int = 0
    directories: int = 0
    pathinfos: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class LocalStore(Store):
    """A `Store` over a store directory, with an fsck (`verify`)."""

    dir: StoreDir | None = None

    def verify(self, full: bool = True) -> VerifyReport:
        """Check every visible object (fsck). `full` also re-hashes each multi-chunk blob.

        Chunks and directories must hash to their names and parse; blob records must parse
        and list present chunks of the listed sizes; directories must reference present
        directories; path infos must parse, validate and be filed under their own hash.
        Temp files are not objects and are ignored.
        """
        assert self.dir is not None
        return _verify(self, self.dir, full)


def _verify(store: LocalStore, sd: StoreDir, full: bool) -> VerifyReport:
    from tvix_store import nixbase32, wire
    from tvix_store.proto import castore_pb2, pathinfo_pb2

    rep = VerifyReport()
    chunk_sizes: dict[bytes, int] = {}
    for name in sd.iter_names("chunks"):
        rep.chunks += 1
        try:
            d = B3Digest.from_hex(name)
            data = sd.read_verified("chunks", d)
            if data is None:
                continue
            if not data:
                rep.problems.append(f"chunk {name} is empty")
            chunk_sizes[d] = len(data)
        except (IntegrityError, ValidationError) as e:
            rep.problems.append(str(e))
    for name in sd.iter_names("blobs"):
        rep.blobs += 1
        try:
            d = B3Digest.from_hex(name)
            raw = sd.read(sd.path("blobs", name))
            if raw is None:
                continue
            entries = decode_record(raw, name)
            if len(entries) == 1:
                rep.problems.append(f"blob record {name} lists a single chunk")
            h = blake3.blake3(max_threads=blake3.blake3.AUTO)
            for cd, size in entries:
                have = chunk_sizes.get(cd)
                if have is None:
                    rep.problems.append(f"blob {name}: chunk {cd.hex()} is missing")
                    break
                if have != size:
                    rep.problems.append(f"blob {name}: chunk {cd.hex()} has {have} bytes, record says {size}")
                    break
                if full:
                    h.update(sd.read(sd.path("chunks", cd.hex())) or b"")
            else:
                if full and h.digest() != d:
                    rep.problems.append(f"blob {name}: its chunks hash to {h.digest().hex()}")
        except (IntegrityError, ValidationError) as e:
            rep.problems.append(str(e))
    dir_names = set(sd.iter_names("directories"))
    for name in dir_names:
        rep.directories += 1
        try:
            d = B3Digest.from_hex(name)
            raw = sd.read_verified("directories", d)
            if raw is None:
                continue
            directory = wire.directory_from_proto(castore_pb2.Directory.FromString(raw))
            for child in directory.directories:
                if child.digest.hex() not in dir_names:
                    rep.problems.append(f"directory {name}: child {child.digest.hex()} is missing")
        except Exception as e:  # noqa: BLE001 - a parse error of any kind is a finding
            rep.problems.append(f"directory {name}: {e}")
    for name in sd.iter_names("pathinfos"):
        rep.pathinfos += 1
        try:
            raw = sd.read(sd.path("pathinfos", name))
            if raw is None:
                continue
            info = wire.pathinfo_from_proto(pathinfo_pb2.PathInfo.FromString(raw))
            if nixbase32.encode(info.store_path.digest) != name:
                rep.problems.append(f"path info {name} is filed under the wrong name ({info.store_path})")
        except Exception as e:  # noqa: BLE001
            rep.problems.append(f"path info {name}: {e}")
    return rep


def open_local_store(root: Path, url: str = "") -> LocalStore:
    """Open (creating on first use) the store in directory `root`.

    URL options (`local:///path?fsync=1`): `fsync=1` makes every write durable against
    power loss (see the module docstring). Unknown options are rejected.
    """
    from tvix_store.blobservice.local import LocalBlobService
    from tvix_store.directoryservice.local import LocalDirectoryService
    from tvix_store.pathinfoservice.local import LocalPathInfoService

    fsync = False
    for key, value in parse_qsl(urlparse(url).query, keep_blank_values=True):
        if key == "fsync" and value in ("0", "1", "true", "false"):
            fsync = value in ("1", "true")
        else:
            raise ValidationError(f"invalid store URL {url!r}: unknown option {key}={value!r} (known: fsync=0|1)")
    try:
        sd = StoreDir(root, fsync=fsync)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EROFS, errno.ENOSPC):
            raise StoreError(f"cannot open store {root}: {e.strerror}") from None
        raise
    blobs = LocalBlobService(sd)
    dirs = LocalDirectoryService(sd)
    return LocalStore(blobs, dirs, LocalPathInfoService(sd, blobs, dirs), url or f"local://{root}", dir=sd)
