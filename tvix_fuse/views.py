"""The virtual directories of the mount: `blobs/`, `directories/` and the store view (`store/`,
or the root with `--store-root`): what a name in them is, and their listings.

- `blobs/<hex>`: every blob by digest (a file; size from its chunk list, one `chunks` call).
- `directories/<hex>`: every Directory by digest (a tree directory, size 0 in listings).
- `store/<hash>-<name>`: every store path (its root node, from the PathInfo).

Look-ups under `blobs/` and `directories/` accept lowercase hex only (64 characters, what
`b3sum` prints). Listings are snapshots taken on the first readdir of a handle, so offsets
stay valid however long the listing is. Trio-async, on the trio thread; every store call
goes through the `Offloader`. No pyfuse3; the tree directories are the model's.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from tvix_fuse.errors import NoEntry
from tvix_fuse.inodes import DirData, Factory, FileData, Inode, InodeTable, dir_key, file_key, node_spec
from tvix_fuse.offload import Offloader
from tvix_fuse.readpath import ReadPath
from tvix_store.core.castore import Directory, Node
from tvix_store.core.digest import B3Digest
from tvix_store.core.errors import ValidationError
from tvix_store.core.pathinfo import StorePath
from tvix_store.store import Store

#: entry/attr timeout of everything that exists (content is immutable)
LONG_TTL = 86400.0
#: negative entry timeout where the object may arrive later (blobs/, directories/, store/)
SHORT_NEGATIVE_TTL = 1.0

_HEX64 = re.compile(rb"[0-9a-f]{64}")

#: a virtual directory's listing: (name, inode key, data factory); key b"" while unknown
Listing = list[tuple[bytes, bytes, Factory | None]]


@dataclass(slots=True)
class DirHandle:
    inode: Inode
    #: virtual directories: the listing snapshot taken on the first readdir
    listing: Listing | None = None
    #: blobs/: the digests of the listing, sizes looked up in batches
    digests: list[B3Digest] | None = None


def hex_name(name: bytes) -> B3Digest:
    """The digest a `blobs/` or `directories/` name spells; NoEntry (cacheable) if it spells none."""
    if not _HEX64.fullmatch(name):
        raise NoEntry(LONG_TTL)  # never a digest, whatever arrives later
    return B3Digest(bytes.fromhex(name.decode()))


def dir_factory(parent: int, digest: B3Digest) -> Factory:
    """directories/<hex>: size 0 (the listing does not fetch each Directory)."""
    return lambda: DirData(parent, digest, "tree", 0)  # a top: the walk order starts below it


def _file_factory(digest: B3Digest, size: int) -> Factory:
    return lambda: FileData(digest, size, False)


def _gone() -> FileData:
    raise AssertionError("a vanished blob is never interned")


class VirtualDirs:
    """Look-ups and listings of `blobs/`, `directories/` and the store view over one Store."""

    def __init__(
        self,
        store: Store,
        offload: Offloader,
        inodes: InodeTable,
        readpath: ReadPath,
        directory: Callable[[B3Digest], Awaitable[Directory | None]],
    ) -> None:
        self.store = store
        self.offload = offload
        self.inodes = inodes
        self.readpath = readpath
        self._directory = directory

    async def lookup(self, role: str, parent: int, name: bytes) -> Inode:
        """The inode `name` is in the virtual directory `parent` of `role` (not yet referenced)."""
        if role == "blobs":
            digest = hex_name(name)
            chunks = await self.readpath.chunk_list(digest)
            if chunks is None:
                raise NoEntry(SHORT_NEGATIVE_TTL)
            size = sum(c.size for c in chunks)
            node = self.inodes.intern(file_key(digest, size, False), _file_factory(digest, size))
            assert isinstance(node.data, FileData)
            if node.data.chunks is None:
                self.readpath.set_chunks(node.data, chunks)
            return node
        if role == "directories":
            digest = hex_name(name)
            directory = await self._directory(digest)
            if directory is None:
                raise NoEntry(SHORT_NEGATIVE_TTL)
            node = self.inodes.intern(dir_key(parent, name), dir_factory(parent, digest))
            assert isinstance(node.data, DirData)
            if node.data.children is None:
                node.data.populate(directory)
            return node
        assert role == "store", role
        try:
            sp = StorePath.parse_basename(name)
        except ValidationError:
            raise NoEntry(LONG_TTL) from None
        info = await self.offload.run(self.store.pathinfos.get, sp.digest)
        if info is None or info.node is None or info.node.name != name:
            raise NoEntry(SHORT_NEGATIVE_TTL)
        return self.inodes.intern(*node_spec(info.node, parent))

    async def snapshot(self, h: DirHandle) -> None:
        """Take the listing of a virtual directory."""
        node = h.inode
        d = node.data
        assert isinstance(d, DirData)
        if d.role == "directories":

            def list_dirs() -> list[B3Digest]:
                return sorted(self.store.directories.iter_digests())

            listing: Listing = []
            for dg in await self.offload.run(list_dirs):
                name = dg.hex().encode()
                listing.append((name, dir_key(node.ino, name), dir_factory(node.ino, dg)))
            h.listing = listing
        elif d.role == "blobs":

            def list_blobs() -> list[B3Digest]:
                return sorted(self.store.blobs.iter_digests())

            # keys are filled in batches by `sizes` (an entry needs its blob's size)
            h.digests = await self.offload.run(list_blobs)
            h.listing = [(dg.hex().encode(), b"", None) for dg in h.digests]
        else:

            def list_store() -> list[Node]:
                nodes = (i.node for i in self.store.pathinfos.iter_all() if i.node is not None)
                return sorted(nodes, key=lambda n: n.name)

            h.listing = [(n.name, *node_spec(n, node.ino)) for n in await self.offload.run(list_store)]

    async def sizes(self, h: DirHandle, lo: int, hi: int) -> None:
        """Fill in the `blobs/` listing entries `[lo, hi)` (their sizes, in one store call)."""
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
