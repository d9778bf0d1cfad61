"""The filesystem model of the mount: what every inode is, and look-up, attributes, listing,
reads and xattrs over a `Store`. Defined here and only here (borg's vfs.py idea).

It does not import pyfuse3 (the adapter `tvix_fuse.ops` does) and is tested without a
mount (tests/test_fuse_model.py). Methods are trio-async and run on the trio thread; every
blocking store call goes through the shared `Offloader` (threads under one
CapacityLimiter). Errors are the exceptions of `tvix_fuse.errors` and `tvix_store.core.errors`;
`tvix_fuse.errors.errno_for` maps them. See docs/fuse.md for the concurrency invariants.

Layout: `blobs/<hex>`, `directories/<hex>/…`, `store/<hash>-<name>`, or the store view at the
root (`store_root=True`). This module holds the root, the tree directories, attributes,
handles and xattrs; the virtual directories are `tvix_fuse.views`, file reads
`tvix_fuse.readpath`.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import os
import stat
from dataclasses import dataclass
from typing import NoReturn

import trio

from tvix_fuse.directories import Directories
from tvix_fuse.errors import BadHandle, NoAttribute, NoEntry, NotADirectory, ReadOnly
from tvix_fuse.inodes import ROOT_INO, DirData, Factory, FileData, Inode, InodeTable, SymlinkData, node_spec
from tvix_fuse.offload import DEFAULT_THREADS, Offloader
from tvix_fuse.readpath import DEFAULT_BUFFER_BYTES, ChunkBuffer, FileHandle, ReadPath
from tvix_fuse.views import LONG_TTL, DirHandle, VirtualDirs
from tvix_store.core.castore import Node
from tvix_store.core.digest import B3Digest
from tvix_store.core.errors import NotFoundError
from tvix_store.readahead import WalkAhead, walk_files
from tvix_store.store import Store
from tvix_store.util.counters import Counters

log = logging.getLogger("tvix_fuse")

BLOBS_INO = 2
DIRECTORIES_INO = 3
STORE_INO = 4

#: every extended attribute the mount has starts with this
XATTR_PREFIX = b"user.tvix."
XATTR_BLOB = b"user.tvix.castore.blob.digest"
XATTR_DIRECTORY = b"user.tvix.castore.directory.digest"
XATTR_STATS = b"user.tvix.stats."

#: a request's deadline by default: the remote deadline (10 s) and a second more
DEFAULT_DEADLINE = 11.0
#: entries per model readdir call (the kernel takes ~25-100 per request)
READDIR_BATCH = 128
#: on first use of a tree directory, its files up to this size (at most ADVISE_MAX_FILES of
#: them) are passed to BlobService.advise (local disk read-ahead; no network traffic)
ADVISE_MAX_FILE_SIZE = 256 << 10
ADVISE_MAX_FILES = 256

#: the mount's own counters (shown as `user.tvix.stats.mount.<name>`)
MOUNT_COUNTERS = (
    "lookups",
    "reads",
    "bytes_read",
    "chunks_fetched",
    "chunk_bytes_fetched",
    "chunk_cache_hits",
    "single_flight_joins",
    "prefetch_hints",
    "readahead_chunks",
    "readahead_pending",
    "walk_hints",
    "walk_pending",
    "closure_directories",
    "store_calls",
)


@dataclass(frozen=True, slots=True)
class Attr:
    """What the adapter needs to build EntryAttributes."""

    ino: int
    mode: int
    size: int
    timeout: float = LONG_TTL


@dataclass(frozen=True, slots=True)
class DirEntry:
    """One readdir entry: either an existing inode (`ino`: `.`, `..`, the fixed top-level
    directories) or a key and data factory to intern. `.` and `..` are not counted."""

    name: bytes
    next_id: int
    ino: int = 0
    key: bytes = b""
    make: Factory | None = None
    counted: bool = True
    #: the tree directory it is listed in (0: elsewhere), for the walk-order read-ahead
    parent: int = 0


class FsModel:
    """The read-only filesystem over one Store (see module docstring)."""

    def __init__(
        self,
        store: Store,
        *,
        store_root: bool = False,
        threads: int = DEFAULT_THREADS,
        cache_bytes: int = DEFAULT_BUFFER_BYTES,
        deadline: float = DEFAULT_DEADLINE,
    ) -> None:
        self.store = store
        self.store_root = store_root
        #: seconds any request may take before it fails with EIO (the adapter enforces it)
        self.deadline = deadline
        self.counters = Counters(MOUNT_COUNTERS)
        self.offload = Offloader(threads, self.counters)
        self.readpath = ReadPath(store.blobs, self.offload, self.counters, cache_bytes)
        self.dirs = Directories(store.directories, self.offload, self.counters)
        self.inodes = InodeTable()
        self.views = VirtualDirs(store, self.offload, self.inodes, self.readpath, self.dirs.get)
        if store_root:
            self.inodes.add_fixed(ROOT_INO, b"/root", DirData(ROOT_INO, role="store"))
        else:
            self.inodes.add_fixed(ROOT_INO, b"/root", DirData(ROOT_INO, role="root"))
            self.inodes.add_fixed(BLOBS_INO, b"/blobs", DirData(ROOT_INO, role="blobs"))
            self.inodes.add_fixed(DIRECTORIES_INO, b"/directories", DirData(ROOT_INO, role="directories"))
            self.inodes.add_fixed(STORE_INO, b"/store", DirData(ROOT_INO, role="store"))
        self._top = {b"blobs": BLOBS_INO, b"directories": DIRECTORIES_INO, b"store": STORE_INO}
        self._fhs = itertools.count(1)
        self._files: dict[int, FileHandle] = {}
        self._dirs: dict[int, DirHandle] = {}
        self._background: trio.Nursery | None = None
        #: remote stores get the walk-order read-ahead (locally it would only cost CPU)
        self._remote = store.is_remote
        self.walk = WalkAhead()
        self._walking = False

    @property
    def chunk_cache(self) -> ChunkBuffer:
        """The read path's LRU of verified chunks."""
        return self.readpath.buffer

    def start_background(self, nursery: trio.Nursery | None) -> None:
        """Enable read-ahead tasks in `nursery` (the mount's); None disables them."""
        self._background = nursery
        self.readpath.start_background(nursery)

    # --- inodes and attributes -------------------------------------------------------

    def _inode(self, ino: int) -> Inode:
        node = self.inodes.get(ino)
        if node is None:
            raise BadHandle(f"unknown inode {ino}")
        return node

    def _dir(self, ino: int) -> tuple[Inode, DirData]:
        node = self._inode(ino)
        if not isinstance(node.data, DirData):
            raise NotADirectory()
        return node, node.data

    @staticmethod
    def attr_of(node: Inode) -> Attr:
        d = node.data
        if isinstance(d, FileData):
            return Attr(node.ino, stat.S_IFREG | (0o555 if d.executable else 0o444), d.size)
        if isinstance(d, SymlinkData):
            return Attr(node.ino, stat.S_IFLNK | 0o777, len(d.target))
        return Attr(node.ino, stat.S_IFDIR | 0o555, d.size)

    async def getattr(self, ino: int) -> Attr:
        return self.attr_of(self._inode(ino))

    def forget(self, inodes: list[tuple[int, int]]) -> None:
        for ino, n in inodes:
            self.inodes.forget(ino, n)

    def _taken(self, node: Inode) -> Attr:
        self.inodes.ref(node)
        return self.attr_of(node)

    # --- look-up ---------------------------------------------------------------------

    async def lookup(self, parent: int, name: bytes) -> Attr:
        """Look `name` up in directory `parent`; the kernel takes a reference on success.

        Raises NoEntry(ttl) for an absent name, NotFoundError (EIO) inside a hole.
        """
        self.counters.add("lookups")
        pnode, pdir = self._dir(parent)
        if name == b".":
            return self._taken(pnode)
        if name == b"..":
            return self._taken(self._inode(pdir.parent))
        role = pdir.role
        if role == "root":
            ino = self._top.get(name)
            if ino is None:
                raise NoEntry(LONG_TTL)
            return self._taken(self._inode(ino))
        if role != "tree":
            node = await self.views.lookup(role, parent, name)
            d = node.data
            if role == "store" and self._remote and isinstance(d, DirData) and d.digest is not None:
                self.dirs.fetch_closure(d.digest, self._background)  # everything below: no round trips
            return self._taken(node)
        # a directory of a tree: immutable, so an absent name may be cached for long
        children = await self._populate(pdir)
        child = children.get(name)
        if child is None:
            raise NoEntry(LONG_TTL)
        node = self.inodes.intern(*node_spec(child, parent))
        if isinstance(node.data, FileData):
            node.data.seen_at = (parent, name)
        return self._taken(node)

    # --- tree directories ----------------------------------------------------------------

    async def _populate(self, d: DirData) -> dict[bytes, Node]:
        """A tree directory's entries, fetching its Directory on first use (sparse → populated)."""
        if d.by_name is None:
            assert d.digest is not None
            directory = await self.dirs.get(d.digest)
            if directory is None:
                raise NotFoundError(f"directory {d.digest.hex()} is missing from the store")
            if d.by_name is None:
                d.populate(directory)
                # local disks: warm the small files' data now; a remote ignores this hint
                small = [f.digest for f in directory.files if 0 < f.size <= ADVISE_MAX_FILE_SIZE]
                self.store.blobs.advise(small[:ADVISE_MAX_FILES])
        assert d.by_name is not None
        return d.by_name

    # --- files -----------------------------------------------------------------------

    async def readlink(self, ino: int) -> bytes:
        d = self._inode(ino).data
        if not isinstance(d, SymlinkData):
            raise NoAttribute()  # not a symlink: EINVAL would be exact; the kernel never asks
        return d.target

    async def open(self, ino: int, flags: int) -> int:
        node = self._inode(ino)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise ReadOnly()
        if not isinstance(node.data, FileData):
            raise BadHandle(f"inode {ino} is not a regular file")
        fh = next(self._fhs)
        self._files[fh] = FileHandle(node)
        return fh

    def release(self, fh: int) -> None:
        self._files.pop(fh, None)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        """`size` bytes at `off` (fewer at EOF); fetches only the chunks covering the range."""
        h = self._files.get(fh)
        if h is None:
            raise BadHandle(f"unknown file handle {fh}")
        f = h.inode.data
        if h.ahead is None and isinstance(f, FileData) and f.seen_at is not None and self._remote:
            self._walk_ahead(f)  # the first read of a file in a tree
        return await self.readpath.read(h, off, size)

    # --- the walk-order read-ahead (remote stores) -------------------------------------

    def _walk_ahead(self, f: FileData) -> None:
        """Tell the walk-order read-ahead (`tvix_store.readahead.WalkAhead`) where the reader is,
        and when it wants more, refill it in the background. One refill at a time: a read
        while one runs is only recorded."""
        assert f.seen_at is not None
        if self._background is None or not 0 < f.size <= self.walk.small:
            return
        parent, name = f.seen_at
        pnode = self.inodes.get(parent)
        if pnode is None or not isinstance(pnode.data, DirData) or pnode.data.digest is None:
            return
        if not self.walk.at((pnode.data.digest, name)) or self._walking:
            return
        stack = self._walk_stack(parent, name)
        if stack:
            self._walking = True
            self.counters.add("walk_pending")
            self._background.start_soon(self._walk_refill, stack)

    def _walk_stack(self, ino: int, name: bytes) -> list[tuple[B3Digest, list[Node], int]]:
        """The walk position just after `name` in tree directory `ino`, up to the tree's top."""
        stack: list[tuple[B3Digest, list[Node], int]] = []
        while True:
            node = self.inodes.get(ino)
            if node is None or not isinstance(node.data, DirData):
                break
            d = node.data
            if d.role != "tree" or d.children is None or d.digest is None:
                break
            stack.append((d.digest, d.children, bisect.bisect_right(d.children, name, key=lambda n: n.name)))
            if not d.name:
                break
            ino, name = d.parent, d.name
        stack.reverse()
        return stack

    async def _walk_refill(self, stack: list[tuple[B3Digest, list[Node], int]]) -> None:
        def subdir(digest: B3Digest) -> list[Node] | None:
            d = self.store.directories.get(digest)
            return None if d is None else d.nodes()

        try:
            hints = await self.offload.run(self.walk.refill, lambda: walk_files(stack, subdir))
            if hints:
                self.counters.add("walk_hints", len(hints))
                self.store.blobs.prefetch([n.digest for n in hints])
        except Exception as e:  # a hint: the reads themselves will see any real error
            log.debug("walk-order read-ahead failed: %s", e)
        finally:
            self._walking = False
            self.counters.add("walk_pending", -1)

    # --- directories -----------------------------------------------------------------

    async def opendir(self, ino: int) -> int:
        node, _ = self._dir(ino)
        fh = next(self._fhs)
        self._dirs[fh] = DirHandle(node)
        return fh

    def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    async def readdir(self, fh: int, start: int) -> list[DirEntry]:
        """Up to READDIR_BATCH entries from position `start` (0: the beginning).

        Positions: 0 is `.`, 1 is `..`, entry i of the listing is i + 2; an entry's
        `next_id` is the position after it, so a listing resumes exactly where it stopped.
        Inodes are not taken here: the adapter calls `entry_attr` then `entry_taken` or
        `entry_refused` for each entry it hands to the kernel.
        """
        h = self._dirs.get(fh)
        if h is None:
            raise BadHandle(f"unknown directory handle {fh}")
        node = h.inode
        d = node.data
        assert isinstance(d, DirData)
        out: list[DirEntry] = []
        if start == 0:
            out.append(DirEntry(b".", 1, ino=node.ino, counted=False))
        if start <= 1:
            out.append(DirEntry(b"..", 2, ino=d.parent, counted=False))
        i = max(start - 2, 0)
        if d.role == "root":
            for pos, (name, ino) in enumerate(list(self._top.items())[i:], i):
                out.append(DirEntry(name, pos + 3, ino=ino))
            return out
        if d.role == "tree":
            await self._populate(d)
            assert d.children is not None
            for pos, child in enumerate(d.children[i : i + READDIR_BATCH], i):
                key, make = node_spec(child, node.ino)
                out.append(DirEntry(child.name, pos + 3, key=key, make=make, parent=node.ino))
            return out
        if h.listing is None or start == 0:
            await self.views.snapshot(h)
        assert h.listing is not None
        if d.role == "blobs":
            await self.views.sizes(h, i, i + READDIR_BATCH)
        for pos in range(i, min(i + READDIR_BATCH, len(h.listing))):
            name, key, make = h.listing[pos]
            if key:  # b"": a blob that vanished between listing and stat
                out.append(DirEntry(name, pos + 3, key=key, make=make))
        return out

    def entry_attr(self, e: DirEntry) -> Attr:
        """The attributes of a readdir entry, interning its inode (count not yet taken)."""
        if e.ino:
            return self.attr_of(self._inode(e.ino))
        assert e.make is not None
        node = self.inodes.intern(e.key, e.make)
        if e.parent and isinstance(node.data, FileData):
            node.data.seen_at = (e.parent, e.name)  # readdirplus: the kernel may never look it up
        return self.attr_of(node)

    def entry_taken(self, e: DirEntry, ino: int) -> None:
        """The kernel accepted the entry (readdirplus): it holds a lookup reference now."""
        if e.counted:
            self.inodes.ref(self._inode(ino))

    def entry_refused(self, e: DirEntry, ino: int) -> None:
        if e.counted:
            node = self.inodes.get(ino)
            if node is not None:
                self.inodes.drop_unused(node)

    # --- xattrs ----------------------------------------------------------------------

    async def listxattr(self, ino: int) -> list[bytes]:
        node = self._inode(ino)
        d = node.data
        names = []
        if isinstance(d, FileData):
            names.append(XATTR_BLOB)
        elif isinstance(d, DirData) and d.digest is not None:
            names.append(XATTR_DIRECTORY)
        if ino == ROOT_INO:
            names += [XATTR_STATS + k.encode() for k in self.all_counters()]
        return names

    async def getxattr(self, ino: int, name: bytes) -> bytes:
        node = self._inode(ino)
        d = node.data
        if name == XATTR_BLOB and isinstance(d, FileData):
            return d.digest.b3_base64().encode()
        if name == XATTR_DIRECTORY and isinstance(d, DirData) and d.digest is not None:
            return d.digest.b3_base64().encode()
        if ino == ROOT_INO and name.startswith(XATTR_STATS):
            value = self.all_counters().get(name[len(XATTR_STATS) :].decode(errors="replace"))
            if value is not None:
                return str(value).encode()
        raise NoAttribute()

    def all_counters(self) -> dict[str, int]:
        """The store's counters and the mount's own, as `mount.<name>` (cheap: no store call)."""
        out = self.store.counters.snapshot()
        out.update({f"mount.{k}": v for k, v in self.counters.snapshot().items()})
        out["mount.inodes"] = len(self.inodes)
        out["mount.chunk_cache_bytes"] = self.readpath.buffer.cached_bytes
        return out

    # --- writes ----------------------------------------------------------------------

    def read_only(self) -> NoReturn:
        raise ReadOnly()
