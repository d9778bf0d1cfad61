"""The filesystem model of the mount: what every inode is, and look-up, attributes, listing,
reads and xattrs over a `Store`. Defined here and only here (borg's vfs.py idea).

It does not import pyfuse3 (the adapter `tvix_fuse.ops` does) and is tested without a
mount (tests/test_fuse_model.py). Methods are trio-async and run on the trio thread; every
blocking store call goes through the shared `Offloader` (threads under one
CapacityLimiter). Errors are the exceptions of `tvix_fuse.errors` and `tvix_store.errors`;
`tvix_fuse.errors.errno_for` maps them. See docs/fuse.md for the concurrency invariants.

Layout (CLI.md "Mount layout"): `blobs/<hex>`, `directories/<hex>/…`, `store/<hash>-<name>`,
or the store view at the root (`store_root=True`). Look-ups under blobs/ and
directories/ accept lowercase hex only (64 characters, what b3sum prints).
"""

from __future__ import annotations

import bisect
import itertools
import logging
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

import trio

from tvix_fuse.cache import DEFAULT_CACHE_BYTES, DEFAULT_THREADS, ChunkCache, Counters, Offloader, SingleFlight
from tvix_fuse.errors import BadHandle, NoAttribute, NoEntry, NotADirectory, ReadOnly
from tvix_fuse.inodes import (
    ROOT_INO,
    DirData,
    FileData,
    Inode,
    InodeTable,
    SymlinkData,
    dir_key,
    file_key,
    symlink_key,
)
from tvix_store.blobservice import ChunkMeta
from tvix_store.castore import Directory, FileNode, Node, SymlinkNode
from tvix_store.digest import EMPTY_DIGEST, B3Digest
from tvix_store.errors import IntegrityError, NotFoundError, ValidationError
from tvix_store.pathinfo import StorePath
from tvix_store.store import Store

log = logging.getLogger("tvix_fuse")

#: entry/attr timeout of everything that exists (content is immutable)
LONG_TTL = 86400.0
#: negative entry timeout where the object may arrive later (blobs/, directories/, store/)
SHORT_NEGATIVE_TTL = 1.0

BLOBS_INO = 2
DIRECTORIES_INO = 3
STORE_INO = 4

XATTR_BLOB = b"user.tvix.castore.blob.digest"
XATTR_DIRECTORY = b"user.tvix.castore.directory.digest"
XATTR_STATS = b"user.tvix.stats."

_HEX64 = re.compile(rb"[0-9a-f]{64}")
#: entries per model readdir call (the kernel takes ~25-100 per request)
READDIR_BATCH = 128
#: sequential read-ahead hint window, in chunks: starts small, doubles per sequential read
PREFETCH_MIN_CHUNKS = 2
PREFETCH_MAX_CHUNKS = 16
#: chunks the model itself fetches into its LRU ahead of a sequential reader (background
#: tasks, at most half the offload threads), so store reads and hashing overlap the kernel's
READAHEAD_CHUNKS = 4
#: files of a tree up to this size are read as one piece, without asking for their chunk list
WHOLE_READ_MAX = 256 << 10
#: on first use of a tree directory, its files up to this size (at most ADVISE_MAX_FILES of
#: them) are passed to BlobService.advise (local disk read-ahead; no network traffic)
ADVISE_MAX_FILE_SIZE = 256 << 10
ADVISE_MAX_FILES = 256
#: a run of sequential reads that did not start at offset 0 must cover this many bytes
#: before read-ahead and prefetch start: one large read at a random offset (which the
#: kernel splits into several sequential requests) must not fetch beyond its range
SEQUENTIAL_MIN_BYTES = 2 << 20


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


@dataclass(slots=True)
class FileHandle:
    inode: Inode
    next_off: int = 0  # where a sequential reader continues
    run_from: int = 0  # where the current run of sequential reads began
    window: int = PREFETCH_MIN_CHUNKS
    hinted: int = -1  # highest chunk index already passed to prefetch


@dataclass(slots=True)
class DirHandle:
    inode: Inode
    #: virtual directories: the listing snapshot taken on the first readdir
    listing: Listing | None = None
    #: blobs/: the digests of the listing, sizes looked up in batches
    digests: list[B3Digest] | None = None


Factory = Callable[[], FileData | DirData | SymlinkData]
#: a virtual directory's listing: (name, inode key, data factory); key b"" while unknown
Listing = list[tuple[bytes, bytes, Factory | None]]


def _spec(node: Node, parent: int) -> tuple[bytes, Factory]:
    """(inode key, data factory) of a node found under directory inode `parent`."""
    if isinstance(node, FileNode):
        return file_key(node.digest, node.size, node.executable), lambda: FileData(
            node.digest, node.size, node.executable
        )
    if isinstance(node, SymlinkNode):
        return symlink_key(node.target), lambda: SymlinkData(node.target)
    return dir_key(parent, node.name), lambda: DirData(parent, node.digest, "tree", node.size)


class FsModel:
    """The read-only filesystem over one Store (see module docstring)."""

    def __init__(
        self,
        store: Store,
        *,
        store_root: bool = False,
        threads: int = DEFAULT_THREADS,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        self.store = store
        self.store_root = store_root
        self.counters = Counters()
        self.offload = Offloader(threads, self.counters)
        self.chunk_cache = ChunkCache(store.blobs, self.offload, cache_bytes)
        self._chunk_lists: SingleFlight[B3Digest, list[ChunkMeta] | None] = SingleFlight(self.counters)
        self._directories: SingleFlight[B3Digest, Directory | None] = SingleFlight(self.counters)
        self.inodes = InodeTable()
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
        self._readaheads = 0

    def start_background(self, nursery: trio.Nursery | None) -> None:
        """Enable read-ahead tasks in `nursery` (the mount's); None disables them."""
        self._background = nursery

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

    def _take(self, key: bytes, make: Factory) -> Attr:
        node = self.inodes.intern(key, make)
        self.inodes.ref(node)
        return self.attr_of(node)

    # --- look-up ---------------------------------------------------------------------

    async def lookup(self, parent: int, name: bytes) -> Attr:
        """Look `name` up in directory `parent`; the kernel takes a reference on success.

        Raises NoEntry(ttl) for an absent name, NotFoundError (EIO) inside a hole.
        """
        self.counters.lookups += 1
        pnode, pdir = self._dir(parent)
        if name == b".":
            self.inodes.ref(pnode)
            return self.attr_of(pnode)
        if name == b"..":
            up = self._inode(pdir.parent)
            self.inodes.ref(up)
            return self.attr_of(up)
        role = pdir.role
        if role == "root":
            ino = self._top.get(name)
            if ino is None:
                raise NoEntry(LONG_TTL)
            top = self._inode(ino)
            self.inodes.ref(top)
            return self.attr_of(top)
        if role == "blobs":
            digest = self._hex_name(name)
            chunks = await self._chunks(digest)
            if chunks is None:
                raise NoEntry(SHORT_NEGATIVE_TTL)
            size = sum(c.size for c in chunks)
            node = self.inodes.intern(file_key(digest, size, False), lambda: FileData(digest, size, False))
            assert isinstance(node.data, FileData)
            if node.data.chunks is None:
                self._set_chunks(node.data, chunks)
            self.inodes.ref(node)
            return self.attr_of(node)
        if role == "directories":
            digest = self._hex_name(name)
            directory = await self._directory(digest)
            if directory is None:
                raise NoEntry(SHORT_NEGATIVE_TTL)
            node = self.inodes.intern(dir_key(parent, name), _dir_factory(parent, digest))
            assert isinstance(node.data, DirData)
            if node.data.children is None:
                node.data.populate(directory)
            self.inodes.ref(node)
            return self.attr_of(node)
        if role == "store":
            try:
                sp = StorePath.parse_basename(name)
            except ValidationError:
                raise NoEntry(LONG_TTL) from None
            info = await self.offload.run(self.store.pathinfos.get, sp.digest)
            if info is None or info.node is None or info.node.name != name:
                raise NoEntry(SHORT_NEGATIVE_TTL)
            return self._take(*_spec(info.node, parent))
        # a directory of a tree: immutable, so an absent name may be cached for long
        children = await self._populate(pdir)
        child = children.get(name)
        if child is None:
            raise NoEntry(LONG_TTL)
        return self._take(*_spec(child, parent))

    @staticmethod
    def _hex_name(name: bytes) -> B3Digest:
        if not _HEX64.fullmatch(name):
            raise NoEntry(LONG_TTL)  # never a digest, whatever arrives later
        return B3Digest(bytes.fromhex(name.decode()))

    # --- store fetches (single-flight, in threads) ------------------------------------

    async def _chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        return await self._chunk_lists.do(digest, lambda: self.offload.run(self.store.blobs.chunks, digest))

    async def _directory(self, digest: B3Digest) -> Directory | None:
        return await self._directories.do(digest, lambda: self.offload.run(self.store.directories.get, digest))

    async def _populate(self, d: DirData) -> dict[bytes, Node]:
        """A tree directory's entries, fetching its Directory on first use (sparse → populated)."""
        if d.by_name is None:
            assert d.digest is not None
            directory = await self._directory(d.digest)
            if directory is None:
                raise NotFoundError(f"directory {d.digest.hex()} is missing from the store")
            if d.by_name is None:
                d.populate(directory)
                # local disks: warm the small files' data now; a remote ignores this hint
                small = [f.digest for f in directory.files if 0 < f.size <= ADVISE_MAX_FILE_SIZE]
                self.store.blobs.advise(small[:ADVISE_MAX_FILES])
        assert d.by_name is not None
        return d.by_name

    @staticmethod
    def _set_chunks(f: FileData, chunks: list[ChunkMeta]) -> None:
        total = 0
        offsets = []
        for c in chunks:
            offsets.append(total)
            total += c.size
        if total != f.size:
            raise IntegrityError(
                f"blob {f.digest.hex()}: its chunks add up to {total} bytes, the file node says {f.size}"
            )
        f.chunks = chunks
        f.offsets = offsets

    async def _chunk_index(self, f: FileData) -> tuple[list[ChunkMeta], list[int]]:
        if f.chunks is None:
            if f.size == 0 and f.digest == EMPTY_DIGEST:
                chunks: list[ChunkMeta] | None = []
            elif 0 < f.size <= WHOLE_READ_MAX:
                # a small file: read the blob itself as its one chunk (BlobService.read_chunk
                # serves whole small blobs), saving a Stat round trip per file; its length is
                # still checked against the FileNode's size
                chunks = [ChunkMeta(f.digest, f.size)]
            else:
                chunks = await self._chunks(f.digest)
            if chunks is None:
                raise NotFoundError(f"blob {f.digest.hex()} is missing from the store")
            if f.chunks is None:
                self._set_chunks(f, chunks)
        assert f.chunks is not None and f.offsets is not None
        return f.chunks, f.offsets

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
        assert isinstance(f, FileData)
        self.counters.reads += 1
        end = min(off + size, f.size)
        if off >= end:
            return b""
        chunks, offsets = await self._chunk_index(f)
        first = bisect.bisect_right(offsets, off) - 1
        last = bisect.bisect_left(offsets, end) - 1
        self._hint(h, chunks, off, end, last, f.digest)
        wanted = chunks[first : last + 1]
        if len(wanted) == 1:
            datas = [await self.chunk_cache.get(wanted[0], f.digest)]
        else:
            datas = await self._get_many(wanted, f.digest)
        if len(datas) == 1:
            start = off - offsets[first]
            out = datas[0][start : start + (end - off)]
        else:
            parts = []
            for i, data in enumerate(datas, first):
                lo = max(off - offsets[i], 0)
                hi = min(end - offsets[i], len(data))
                parts.append(data[lo:hi] if lo or hi < len(data) else data)
            out = b"".join(parts)
        self.counters.bytes_read += len(out)
        return out

    async def _get_many(self, wanted: list[ChunkMeta], blob: B3Digest) -> list[bytes]:
        """Several chunks, the missing ones fetched concurrently; the first failure is raised
        (after the other fetches finish, so what they fetched is cached)."""
        results: list[bytes] = [b""] * len(wanted)
        errors: list[Exception] = []

        async def one(i: int) -> None:
            try:
                results[i] = await self.chunk_cache.get(wanted[i], blob)
            except Exception as e:
                errors.append(e)

        async with trio.open_nursery() as nursery:
            for i in range(len(wanted)):
                nursery.start_soon(one, i)
        if errors:
            raise errors[0]
        return results

    def _hint(self, h: FileHandle, chunks: list[ChunkMeta], off: int, end: int, last: int, blob: B3Digest) -> None:
        """Sequential reader: pass the next chunks to BlobService.prefetch (a non-blocking hint,
        so it is called on the loop). The window doubles per sequential read up to
        PREFETCH_MAX_CHUNKS and resets on a seek; a chunk is hinted once per handle.
        Then read ahead: fetch the next READAHEAD_CHUNKS into the LRU in the background.
        Both start only once the run is clearly sequential: it began at offset 0 or has
        covered SEQUENTIAL_MIN_BYTES (so a lone read at a random offset fetches only its range)."""
        if off != h.next_off:
            h.run_from = off
        if off == h.next_off and (h.run_from == 0 or end - h.run_from >= SEQUENTIAL_MIN_BYTES):
            self._read_ahead(chunks, last, blob)
            if h.hinted >= last:
                h.window = min(h.window * 2, PREFETCH_MAX_CHUNKS)
            upto = min(last + h.window, len(chunks) - 1)
            start = max(last + 1, h.hinted + 1)
            if start <= upto:
                todo = [c.digest for c in chunks[start : upto + 1] if c.digest not in self.chunk_cache]
                h.hinted = upto
                if todo:
                    self.counters.prefetch_hints += len(todo)
                    self.store.blobs.prefetch(todo)
        else:
            h.window = PREFETCH_MIN_CHUNKS
            h.hinted = last
        h.next_off = end

    def _read_ahead(self, chunks: list[ChunkMeta], last: int, blob: B3Digest) -> None:
        if self._background is None:
            return
        for c in chunks[last + 1 : last + 1 + READAHEAD_CHUNKS]:
            if self._readaheads >= max(1, self.offload.limit // 2):
                return
            if c.digest in self.chunk_cache or self.chunk_cache.fetching(c.digest):
                continue
            self._readaheads += 1
            self.counters.readahead_chunks += 1
            self._background.start_soon(self._read_ahead_one, c, blob)

    async def _read_ahead_one(self, c: ChunkMeta, blob: B3Digest) -> None:
        try:
            await self.chunk_cache.get(c, blob)
        except Exception as e:  # the reader that needs it will see (and log) the error
            log.debug("read-ahead of chunk %s failed: %s", c.digest.hex(), e)
        finally:
            self._readaheads -= 1

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
                key, make = _spec(child, node.ino)
                out.append(DirEntry(child.name, pos + 3, key=key, make=make))
            return out
        if h.listing is None or start == 0:
            await self._snapshot(h)
        assert h.listing is not None
        if d.role == "blobs":
            await self._blob_sizes(h, i, i + READDIR_BATCH)
        for pos in range(i, min(i + READDIR_BATCH, len(h.listing))):
            name, key, make = h.listing[pos]
            if key:  # b"": a blob that vanished between listing and stat
                out.append(DirEntry(name, pos + 3, key=key, make=make))
        return out

    async def _snapshot(self, h: DirHandle) -> None:
        """Take the listing of a virtual directory (blobs/, directories/, store/)."""
        node = h.inode
        d = node.data
        assert isinstance(d, DirData)
        if d.role == "directories":

            def list_dirs() -> list[B3Digest]:
                return sorted(self.store.directories.iter_digests())

            listing: Listing = []
            for dg in await self.offload.run(list_dirs):
                name = dg.hex().encode()
                listing.append((name, dir_key(node.ino, name), _dir_factory(node.ino, dg)))
            h.listing = listing
        elif d.role == "blobs":

            def list_blobs() -> list[B3Digest]:
                return sorted(self.store.blobs.iter_digests())

            # keys are filled in batches by _blob_sizes (an entry needs its blob's size)
            h.digests = await self.offload.run(list_blobs)
            h.listing = [(dg.hex().encode(), b"", None) for dg in h.digests]
        else:

            def list_store() -> list[Node]:
                nodes = (i.node for i in self.store.pathinfos.iter_all() if i.node is not None)
                return sorted(nodes, key=lambda n: n.name)

            h.listing = [(n.name, *_spec(n, node.ino)) for n in await self.offload.run(list_store)]

    async def _blob_sizes(self, h: DirHandle, lo: int, hi: int) -> None:
        assert h.listing is not None and h.digests is not None
        listing, digests = h.listing, h.digests
        todo = [i for i in range(lo, min(hi, len(listing))) if not listing[i][1] and listing[i][2] is None]
        if not todo:
            return

        def sizes() -> list[int | None]:
            return [self.store.blobs.size(digests[i]) for i in todo]

        for i, size in zip(todo, await self.offload.run(sizes), strict=True):
            if size is None:  # vanished: leave it out, mark it done
                listing[i] = (listing[i][0], b"", _gone)
            else:
                listing[i] = (listing[i][0], file_key(digests[i], size, False), _file_factory(digests[i], size))

    def entry_attr(self, e: DirEntry) -> Attr:
        """The attributes of a readdir entry, interning its inode (count not yet taken)."""
        if e.ino:
            return self.attr_of(self._inode(e.ino))
        assert e.make is not None
        return self.attr_of(self.inodes.intern(e.key, e.make))

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
            names += [XATTR_STATS + k.encode() for k in await self.all_counters()]
        return names

    async def getxattr(self, ino: int, name: bytes) -> bytes:
        node = self._inode(ino)
        d = node.data
        if name == XATTR_BLOB and isinstance(d, FileData):
            return d.digest.b3_base64().encode()
        if name == XATTR_DIRECTORY and isinstance(d, DirData) and d.digest is not None:
            return d.digest.b3_base64().encode()
        if ino == ROOT_INO and name.startswith(XATTR_STATS):
            value = (await self.all_counters()).get(name[len(XATTR_STATS) :].decode(errors="replace"))
            if value is not None:
                return str(value).encode()
        raise NoAttribute()

    async def all_counters(self) -> dict[str, int]:
        """The store's counters (if it keeps any) and the mount's own, as `mount.<name>`."""
        out: dict[str, int] = {}
        if self.store.counters is not None:
            out.update(await self.offload.run(self.store.counters))
        out.update({f"mount.{k}": v for k, v in self.counters.as_dict().items()})
        out["mount.inodes"] = len(self.inodes)
        out["mount.chunk_cache_bytes"] = self.chunk_cache.cached_bytes
        return out

    # --- writes ----------------------------------------------------------------------

    def read_only(self) -> NoReturn:
        raise ReadOnly()


def _dir_factory(parent: int, digest: B3Digest) -> Factory:
    """directories/<hex>: size 0 (the listing does not fetch each Directory)."""
    return lambda: DirData(parent, digest, "tree", 0)


def _file_factory(digest: B3Digest, size: int) -> Factory:
    return lambda: FileData(digest, size, False)


def _gone() -> FileData:
    raise AssertionError("a vanished blob is never interned")
