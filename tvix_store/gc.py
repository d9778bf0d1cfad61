"""Garbage collection of an object store (`collect`), and the lock that makes it safe with
concurrent writers (`GcLock`, `writing`).

`collect(objects)` deletes every Directory, chunk list (`blobs/`) and chunk not reachable
from a root, then calls `ObjectStore.reclaim()`. Roots: every PathInfo of the object store,
the nodes passed in (`--keep`), and every object younger than the grace period (its last
write or `touch`, `ObjectInfo.mtime`). It works through the `ObjectStore` interface only
(list, get, delete, reclaim), so over every backend alike. The argument for its safety is
in `docs/storage.md` ("Garbage collection"); in short:

1. Mark, without the lock: list every object (snapshot L1), mark from the roots, iteratively
   (an explicit stack: depth is bounded by nothing but memory).
2. Sweep, holding the GC lock exclusively (no writer runs): list again (L2); mark from what
   is new since L1 (PathInfos, objects not in L1, objects touched since), then delete what is
   still unmarked, parents before children: Directories (a topological order), then chunk
   lists, then chunks. A kill at any instant leaves every remaining object's references
   present (nothing reachable is deleted, ever); a rerun finishes the job.
3. `reclaim()`, without the lock (it is safe with concurrent readers and writers).

Writers take the lock shared (`writing(store)`): a local import for its whole length, the
daemon for each Put call. So no sweep runs while an import is half done, and an import
never adopts an object (found present, not written) that a sweep then deletes. A sweep that
deletes anything first stamps a new epoch (`sweep_epoch`): a cache vouching that a closure
is complete (admission's NAR cache) holds for one epoch only.

A reachable Directory, chunk list or PathInfo that cannot be read or does not verify stops
the collection before anything is deleted (its children cannot be known): run `verify`.

Not here: deciding what a store path's data is (PathInfos are never deleted: `path rm`),
verification (`tvix_store.verify`), reclaiming space inside a backend (`reclaim`).
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from tvix_store.core import nixbase32
from tvix_store.core.castore import Directory, DirectoryNode, FileNode, Node
from tvix_store.core.chunks import decode_chunk_list
from tvix_store.core.digest import blake3_of
from tvix_store.core.errors import StoreError, ValidationError
from tvix_store.objects import ObjectStore
from tvix_store.protocol import wire
from tvix_store.store import Store
from tvix_store.util.progress import Progress

log = logging.getLogger(__name__)

#: `--grace` when not given: an object written or used within the last hour is kept even
#: when unreachable (an upload over gRPC whose PathInfo has not come yet)
DEFAULT_GRACE = 3600.0
#: added to the grace: file timestamps are coarse (a tick behind the clock) and may come
#: from another clock (a network filesystem)
CLOCK_SLACK = 1.0
#: how long a waiting GC holds back new writers before it lets them in again and retries
GATE_HOLD = 5.0
#: the lock files in a store directory
LOCK_FILE = "gc.lock"
GATE_FILE = "gc.gate"
#: the kinds the GC deletes, in the order it deletes them (referrers before what they refer to)
SWEPT = ("directories", "blobs", "chunks")

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


class GcError(StoreError):
    """The collection cannot go on safely (nothing was deleted by the failing step)."""


def parse_duration(text: str) -> float:
    """Seconds of `0s`, `90s`, `15m`, `2h`, `1d`, `1h30m` (ValidationError otherwise)."""
    t = text.strip()
    pos, total = 0, 0.0
    for m in _DURATION.finditer(t):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if not t or pos != len(t):
        raise ValidationError(f"invalid duration {text!r}: expected e.g. 0s, 15m, 2h, 1d or 1h30m")
    return total


# --- the lock -----------------------------------------------------------------------------


def _open_lock(path: Path) -> int:
    # read-only is enough for flock, and works for every user who can read the directory
    return os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)


class GcLock:
    """Two flock'ed files in a store directory: `gc.lock` (writers shared, the sweep
    exclusive) and `gc.gate` (a waiting GC holds it exclusively so that new writers wait
    behind it instead of starving it; writers hold it shared only while they take `gc.lock`).

    Every holder opens the files itself (flock locks belong to an open file description), so
    threads of one process (the daemon's calls) exclude a GC like separate processes do. A
    killed holder's locks go with its descriptors: nothing to clean up after kill -9."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.main = root / LOCK_FILE
        self.gate = root / GATE_FILE

    def epoch(self) -> int:
        """Changes whenever a sweep deleted something (the lock file's mtime, stamped by it)."""
        try:
            return os.stat(self.main).st_mtime_ns
        except FileNotFoundError:
            return 0

    def bump(self) -> None:
        """Stamp a new epoch (by the sweep, holding the lock exclusively)."""
        t = time.time_ns()
        if t == self.epoch():
            t += 1
        os.utime(self.main, ns=(t, t))

    @contextmanager
    def shared(self) -> Iterator[None]:
        """Held by a writer: no sweep runs meanwhile (blocks while one runs or waits)."""
        try:
            gate = _open_lock(self.gate)
        except OSError as e:  # a directory this process cannot write: it cannot write objects either
            log.debug("no GC lock in %s: %s", self.root, e)
            yield
            return
        try:
            fcntl.flock(gate, fcntl.LOCK_SH)
            main = _open_lock(self.main)
            try:
                fcntl.flock(main, fcntl.LOCK_SH)
            except BaseException:
                os.close(main)
                raise
        finally:
            os.close(gate)
        try:
            yield
        finally:
            os.close(main)

    @contextmanager
    def exclusive(self, hold: float = GATE_HOLD) -> Iterator[None]:
        """Held by the sweep: waits for running writers, holding new ones back at most `hold`
        seconds at a time (then lets them in and tries again)."""
        waited = False
        while True:
            gate = _open_lock(self.gate)
            try:
                fcntl.flock(gate, fcntl.LOCK_EX)
                main = _open_lock(self.main)
            except BaseException:
                os.close(gate)
                raise
            deadline = time.monotonic() + hold
            got = False
            try:
                while True:
                    try:
                        fcntl.flock(main, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        got = True
                        break
                    except BlockingIOError:
                        if time.monotonic() >= deadline:
                            break
                        time.sleep(0.01)
            finally:
                if not got:
                    os.close(main)
                    os.close(gate)
            if got:
                break
            if not waited:
                log.info("gc: waiting for writers of %s to finish", self.root)
                waited = True
            time.sleep(0.2)
        try:
            yield
        finally:
            os.close(main)
            os.close(gate)


def lock_of(objects: ObjectStore) -> GcLock | None:
    """The GC lock of an object store kept in a directory (`root`); None for one without
    (in memory: one process, nothing to coordinate across processes)."""
    root = getattr(objects, "root", None)
    return GcLock(Path(root)) if isinstance(root, (str, os.PathLike)) and objects.writable else None


def objects_of(store: Store, *, pathinfos: bool = True) -> ObjectStore | None:
    """The one object store under the blob and directory services of `store` (and, with
    `pathinfos`, the path info service), or None: a remote store, a cache, services taken
    from different stores."""
    services = (store.blobs, store.directories, *((store.pathinfos,) if pathinfos else ()))
    found = [_objects(svc) for svc in services]
    if any(o is None for o in found) or len({id(o) for o in found}) != 1:
        return None
    return found[0]


def _objects(service: object) -> ObjectStore | None:
    o = getattr(service, "objects", None)
    return o if isinstance(o, ObjectStore) else None


@contextmanager
def writing(store: Store) -> Iterator[None]:
    """Hold the shared GC lock of every store directory `store` writes into (none for remote
    and in-memory stores): from the first object written (or found present and relied on) to
    the PathInfo that makes them reachable."""
    locks = {str(lk.root): lk for svc in (store.blobs, store.directories, store.pathinfos)
             if (o := _objects(svc)) is not None and (lk := lock_of(o)) is not None}  # fmt: skip
    with ExitStack() as stack:
        for key in sorted(locks):  # one order everywhere: no deadlock between two writers
            stack.enter_context(locks[key].shared())
        yield


def sweep_epoch(store: Store) -> Callable[[], object]:
    """A function whose value changes whenever a sweep deleted something from one of the store
    directories `store` uses: caches of "this closure is complete" (admission's NAR cache)
    hold for one epoch. Read it holding the lock shared, so no sweep runs until it is used."""
    locks = [lk for svc in (store.blobs, store.directories, store.pathinfos)
             if (o := _objects(svc)) is not None and (lk := lock_of(o)) is not None]  # fmt: skip
    return lambda: tuple(lk.epoch() for lk in locks)


def write_lock(store: Store) -> Callable[[], AbstractContextManager[None]]:
    """A factory of `writing(store)` for servers (one hold per call)."""
    return lambda: writing(store)


# --- the report -----------------------------------------------------------------------------


@dataclass
class KindStats:
    """Objects of one kind: deleted (or, dry run, to be deleted) and kept."""

    deleted: int = 0
    deleted_bytes: int = 0
    kept: int = 0
    kept_bytes: int = 0


@dataclass
class GcReport:
    """What a collection found and did."""

    dry_run: bool = False
    kinds: dict[str, KindStats] = field(default_factory=lambda: {k: KindStats() for k in SWEPT})
    pathinfos: int = 0
    #: reachable objects the store lacks (a damaged store: `verify` says more)
    missing: int = 0
    #: objects of a swept kind whose name is not a digest: never deleted (verify reports them)
    foreign: int = 0
    #: bytes `reclaim()` gave back (pack files rewritten or cut)
    reclaimed: int = 0
    #: objects and bytes listed at the start (every kind)
    scanned: int = 0
    scanned_bytes: int = 0
    seconds: float = 0.0
    #: seconds the sweep held the lock (writers waited at most this long)
    locked_seconds: float = 0.0

    @property
    def deleted(self) -> int:
        return sum(s.deleted for s in self.kinds.values())

    @property
    def deleted_bytes(self) -> int:
        return sum(s.deleted_bytes for s in self.kinds.values())


# --- mark and sweep -------------------------------------------------------------------------

#: name (32 raw bytes) → (size, mtime), per swept kind
Present = dict[str, dict[bytes, tuple[int, float]]]


def _list(objects: ObjectStore, rep: GcReport | None) -> tuple[Present, dict[str, tuple[int, float]], int]:
    """Every object: the swept kinds by digest, path infos by name, and how many objects of a
    swept kind have a name that is no digest (`foreign`)."""
    kinds: Present = {k: {} for k in SWEPT}
    infos: dict[str, tuple[int, float]] = {}
    foreign = 0
    for kind in SWEPT:
        into = kinds[kind]
        for o in objects.list(kind + "/"):
            name = o.key[len(kind) + 1 :]
            raw = _hex(name)
            if raw is None:
                foreign += 1
                continue
            into[raw] = (o.size, o.mtime)
            if rep is not None:
                rep.scanned += 1
                rep.scanned_bytes += o.size
    for o in objects.list("pathinfos/"):
        infos[o.key[len("pathinfos/") :]] = (o.size, o.mtime)
        if rep is not None:
            rep.scanned += 1
            rep.scanned_bytes += o.size
    return kinds, infos, foreign


def _hex(name: str) -> bytes | None:
    if len(name) != 64:
        return None
    try:
        raw = bytes.fromhex(name)
    except ValueError:
        return None
    return raw if raw.hex() == name else None


class _Marker:
    """The marked set, grown iteratively from roots against a listing of what is present."""

    def __init__(self, objects: ObjectStore) -> None:
        self.objects = objects
        self.present: Present = {k: {} for k in SWEPT}
        self.marked: dict[str, set[bytes]] = {k: set() for k in SWEPT}
        #: referenced but absent from the listing (written after it, or really missing)
        self.absent: set[tuple[str, bytes]] = set()
        self._stack: list[bytes] = []

    def node(self, node: Node) -> None:
        if isinstance(node, DirectoryNode):
            self.directory(bytes(node.digest))
        elif isinstance(node, FileNode):
            self.blob(bytes(node.digest))

    def directory(self, d: bytes) -> None:
        if d in self.marked["directories"]:
            return
        if d not in self.present["directories"]:
            self.absent.add(("directories", d))
            return
        self.marked["directories"].add(d)
        self._stack.append(d)

    def blob(self, d: bytes) -> None:
        """A blob: its chunk (a one-chunk blob) and/or its chunk list and the chunks it names."""
        found = False
        if d in self.present["chunks"]:
            self.marked["chunks"].add(d)
            found = True
        if d in self.present["blobs"]:
            found = True
            self.chunk_list(d)
        if not found:
            self.absent.add(("blobs", d))

    def chunk_list(self, d: bytes) -> None:
        if d in self.marked["blobs"]:
            return
        self.marked["blobs"].add(d)
        raw = self.objects.get(f"blobs/{d.hex()}")
        if raw is None:
            self.absent.add(("blobs", d))
            return
        try:
            entries = decode_chunk_list(raw, d.hex())
        except StoreError as e:
            raise GcError(f"{e}: it is reachable, so gc cannot tell which chunks to keep") from None
        for c in entries:
            cd = bytes(c.digest)
            if cd in self.present["chunks"]:
                self.marked["chunks"].add(cd)
            else:
                self.absent.add(("chunks", cd))

    def run(self) -> None:
        """Visit every marked Directory not yet read (no recursion: an explicit stack)."""
        while self._stack:
            d = self._stack.pop()
            raw = self.objects.get(f"directories/{d.hex()}")
            if raw is None:
                self.absent.add(("directories", d))
                continue
            directory = _parse_directory(d, raw, "it is reachable, so gc cannot tell what it refers to")
            for child in directory.directories:
                self.directory(bytes(child.digest))
            for f in directory.files:
                self.blob(bytes(f.digest))

    def pathinfo(self, name: str) -> None:
        raw = self.objects.get(f"pathinfos/{name}")
        if raw is None:
            return  # removed meanwhile (`path rm`): no longer a root
        try:
            info = wire.pathinfo_from_bytes(raw)
            if nixbase32.encode(info.store_path.digest) != name:
                raise ValidationError(f"it holds {info.store_path}")
        except (StoreError, ValueError) as e:
            raise GcError(f"path info {name} is damaged ({e}): gc cannot tell what it keeps; run verify") from None
        if info.node is not None:
            self.node(info.node)

    def young(self, kind: str, d: bytes) -> None:
        """An object younger than the grace (or new since the first listing): a root."""
        if kind == "directories":
            self.directory(d)
        elif kind == "blobs":
            self.chunk_list(d)
        else:
            self.marked["chunks"].add(d)


def _parse_directory(d: bytes, raw: bytes, why: str) -> Directory:
    if blake3_of(raw) != d:
        raise GcError(f"directory {d.hex()} is corrupt ({why}); run verify")
    try:
        return wire.directory_from_bytes(raw)
    except (StoreError, ValueError) as e:
        raise GcError(f"directory {d.hex()} does not parse ({e}; {why}); run verify") from None


def _children(objects: ObjectStore, d: bytes) -> list[bytes]:
    """The child Directories of an unreachable Directory (none if it cannot be read: it is
    then deleted before anything else, which is the safe order)."""
    raw = objects.get(f"directories/{d.hex()}")
    if raw is None or blake3_of(raw) != d:
        return []
    try:
        return [bytes(c.digest) for c in wire.directory_from_bytes(raw).directories]
    except (StoreError, ValueError):
        return []


def _parents_first(objects: ObjectStore, candidates: set[bytes]) -> list[bytes]:
    """The unreachable Directories in an order where each comes before its children (Kahn's
    algorithm over the edges among them: iterative, any depth)."""
    children: dict[bytes, list[bytes]] = {}
    indegree: dict[bytes, int] = dict.fromkeys(candidates, 0)
    for d in candidates:
        kids = [c for c in _children(objects, d) if c in indegree]
        children[d] = kids
        for c in kids:
            indegree[c] += 1
    ready = [d for d, n in indegree.items() if n == 0]
    order: list[bytes] = []
    while ready:
        d = ready.pop()
        order.append(d)
        for c in children.get(d, ()):
            indegree[c] -= 1
            if indegree[c] == 0:
                ready.append(c)
    if len(order) != len(candidates):  # a cycle: impossible among hashes, unless a store lies
        order += [d for d in candidates if indegree[d] > 0]
    return order


def collect(
    objects: ObjectStore,
    *,
    grace: float = DEFAULT_GRACE,
    roots: Iterable[Node] = (),
    dry_run: bool = False,
    clock: Callable[[], float] = time.time,
    progress: Progress | None = None,
) -> GcReport:
    """Delete what no root reaches (module docstring) and reclaim the space; returns what
    was done. `dry_run`: compute the same, delete nothing, take no lock. GcError (nothing
    more deleted) when the reachable graph cannot be read. `progress`: the phase, and the
    objects deleted of those doomed (for a display)."""
    if grace < 0:
        raise ValidationError("the grace period cannot be negative")
    started = time.monotonic()
    rep = GcReport(dry_run=dry_run)
    roots = list(roots)
    t0 = clock()
    cutoff = t0 - grace - CLOCK_SLACK

    # 1. mark, without the lock
    if progress is not None:
        progress.phase("listing")
    kinds1, infos1, _ = _list(objects, rep)
    if progress is not None:
        progress.phase("marking")
    m = _Marker(objects)
    m.present = kinds1
    for name in infos1:
        m.pathinfo(name)
    for node in roots:
        m.node(node)
    for kind in SWEPT:
        for d, (_, mtime) in kinds1[kind].items():
            if mtime >= cutoff:
                m.young(kind, d)
    m.run()
    dirs1 = {d for d in kinds1["directories"] if d not in m.marked["directories"]}
    order = _parents_first(objects, dirs1)
    log.debug("gc: marked %s of %s", {k: len(v) for k, v in m.marked.items()}, {k: len(v) for k, v in kinds1.items()})

    # 2. sweep, holding the lock (writers wait): what is new since the mark is a root
    lock = None if dry_run else lock_of(objects)
    if progress is not None:
        progress.phase("waiting for writers" if lock is not None else "marking again")
    with lock.exclusive() if lock is not None else nullcontext():
        locked = time.monotonic()
        kinds2, infos2, foreign = _list(objects, None)
        rep.foreign = foreign
        rep.pathinfos = len(infos2)
        m.present = kinds2
        for name, (size, mtime) in infos2.items():
            if infos1.get(name) != (size, mtime):
                m.pathinfo(name)
        for kind in SWEPT:
            seen = kinds1[kind]
            for d, (size, mtime) in kinds2[kind].items():
                if mtime >= cutoff or seen.get(d) != (size, mtime):
                    m.young(kind, d)
        m.run()
        rep.missing = sum(
            1 for kind, d in m.absent if d not in kinds2[kind] and not (kind == "blobs" and d in kinds2["chunks"])
        )
        doomed = {k: [d for d in kinds2[k] if d not in m.marked[k]] for k in SWEPT}
        in_order = set(doomed["directories"])
        doomed["directories"] = [d for d in order if d in in_order]  # ⊆ the first candidates
        if lock is not None and any(doomed.values()):
            lock.bump()  # before the first delete: every "closure complete" cached before is void
        if progress is not None:
            progress.phase("counting" if dry_run else "deleting", sum(len(v) for v in doomed.values()))
        for kind in SWEPT:
            st = rep.kinds[kind]
            for d in doomed[kind]:
                size = kinds2[kind][d][0]
                if dry_run or objects.delete(f"{kind}/{d.hex()}"):
                    st.deleted += 1
                    st.deleted_bytes += size
                if progress is not None:
                    progress.add()
            gone = set(doomed[kind])
            for d, (size, _) in kinds2[kind].items():
                if d not in gone:
                    st.kept += 1
                    st.kept_bytes += size
        rep.locked_seconds = time.monotonic() - locked

    # 3. give the space back (safe with concurrent readers and writers)
    if not dry_run:
        if progress is not None:
            progress.rename("reclaiming space")
        rep.reclaimed = objects.reclaim()
    rep.seconds = time.monotonic() - started
    if rep.missing:
        log.warning("gc: %d reachable objects are missing from the store (run verify)", rep.missing)
    return rep


__all__ = [
    "CLOCK_SLACK",
    "DEFAULT_GRACE",
    "GcError",
    "GcLock",
    "GcReport",
    "KindStats",
    "collect",
    "lock_of",
    "objects_of",
    "parse_duration",
    "sweep_epoch",
    "writing",
    "write_lock",
]
