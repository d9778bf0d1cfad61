"""The inode tracker of the mount: one table from inode number to what the inode is.

An inode number is derived from a key that says what the inode *is* (BLAKE2b of the
key, 63 bits), so it is the same every time the same thing is looked up, even after the
kernel forgot it and the table dropped it: st_ino is stable for the life of the mount
without keeping every inode ever seen. A collision moves the newcomer to the next free
number (the only case in which a number could differ between two look-ups, with a
probability of about n²/2⁶⁴ for n live inodes).

Keys, and so the sharing rule (two names share an inode only if every attribute agrees):
- a file: (digest, size, executable). `blobs/<hex>` and every tree entry with the same
  content, size and mode are one inode (and share the kernel page cache);
- a symlink: its target;
- a directory: (parent inode, name). Directories are never shared: the kernel keeps one
  dentry per directory inode, so an inode under two parents would be moved between them
  (d_splice_alias) and could fail with EBUSY/ELOOP.

Lookup counts are the kernel's (lookup, readdirplus, forget); an inode whose count drops
to zero is dropped, together with what was cached on it (a directory's children, a
file's chunk index). Fixed inodes (root and the top-level directories) are never dropped.
This module is bookkeeping only: no I/O, no pyfuse3, no trio; it is used from the trio
thread only, so it has no locks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from tvix_store.core.castore import Directory, FileNode, Node, SymlinkNode
from tvix_store.core.chunks import ChunkMeta
from tvix_store.core.digest import B3Digest

ROOT_INO = 1
#: Numbers below this are reserved for fixed inodes.
FIRST_DYNAMIC_INO = 16
_MASK = (1 << 63) - 1

Kind = Literal["dir", "file", "symlink"]


@dataclass(slots=True)
class FileData:
    """A regular file: its blob, size from the node, and the chunk index once loaded."""

    digest: B3Digest
    size: int
    executable: bool
    chunks: list[ChunkMeta] | None = None
    #: offsets[i] = byte offset of chunks[i] in the blob (cumulative sizes), for bisect
    offsets: list[int] | None = None
    #: where it was last looked up in a tree: (parent inode, its name there); the walk-order
    #: read-ahead starts there when it is read
    seen_at: tuple[int, bytes] | None = None


@dataclass(slots=True)
class DirData:
    """A directory. `digest` None: a virtual directory (root, blobs/, directories/, store/).

    A tree directory is sparse (`children` None, only its digest) until first used,
    then populated with its entries in name order and a name index.
    """

    parent: int
    digest: B3Digest | None = None
    role: str = "tree"  # tree | root | blobs | directories | store
    size: int = 0
    children: list[Node] | None = None
    by_name: dict[bytes, Node] | None = None
    #: its name in its parent (tree directories; for the walk-order read-ahead)
    name: bytes = b""

    def populate(self, directory: Directory) -> None:
        nodes = directory.nodes()
        self.children = nodes
        self.by_name = {n.name: n for n in nodes}


@dataclass(slots=True)
class SymlinkData:
    target: bytes


@dataclass(slots=True)
class Inode:
    ino: int
    key: bytes
    data: FileData | DirData | SymlinkData
    lookups: int = 0
    fixed: bool = False

    @property
    def kind(self) -> Kind:
        if isinstance(self.data, FileData):
            return "file"
        if isinstance(self.data, DirData):
            return "dir"
        return "symlink"


def file_key(digest: B3Digest, size: int, executable: bool) -> bytes:
    return b"f" + bytes(digest) + size.to_bytes(8, "little") + (b"x" if executable else b"-")


def symlink_key(target: bytes) -> bytes:
    return b"l" + target


def dir_key(parent: int, name: bytes) -> bytes:
    return b"d" + parent.to_bytes(8, "little") + name


def _hash_ino(key: bytes) -> int:
    n = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & _MASK
    return n if n >= FIRST_DYNAMIC_INO else n + FIRST_DYNAMIC_INO


class InodeTable:
    """Inode number → Inode, with key-derived numbers and kernel lookup counts."""

    def __init__(self) -> None:
        self._by_ino: dict[int, Inode] = {}
        self._by_key: dict[bytes, int] = {}

    def __len__(self) -> int:
        return len(self._by_ino)

    def add_fixed(self, ino: int, key: bytes, data: DirData) -> Inode:
        node = Inode(ino, key, data, fixed=True)
        self._by_ino[ino] = node
        self._by_key[key] = ino
        return node

    def get(self, ino: int) -> Inode | None:
        return self._by_ino.get(ino)

    def intern(self, key: bytes, make: Callable[[], FileData | DirData | SymlinkData]) -> Inode:
        """The inode for `key`, created from `make()` (a callable returning its data) if new.

        The new inode starts with lookup count 0: the caller `ref`s it when the kernel
        takes it (a lookup reply, an accepted readdirplus entry) or `drop_unused`s it.
        """
        ino = self._by_key.get(key)
        if ino is not None:
            return self._by_ino[ino]
        ino = _hash_ino(key)
        while ino in self._by_ino:  # a collision: probe linearly
            ino = ino + 1 if ino < _MASK else FIRST_DYNAMIC_INO
        node = Inode(ino, key, make())
        self._by_ino[ino] = node
        self._by_key[key] = ino
        return node

    def ref(self, node: Inode, n: int = 1) -> None:
        node.lookups += n

    def drop_unused(self, node: Inode) -> None:
        """Drop a just-interned inode the kernel did not take after all."""
        if node.lookups == 0 and not node.fixed:
            self._remove(node)

    def forget(self, ino: int, n: int) -> None:
        node = self._by_ino.get(ino)
        if node is None:
            return
        node.lookups = max(0, node.lookups - n)
        if node.lookups == 0 and not node.fixed:
            self._remove(node)

    def _remove(self, node: Inode) -> None:
        del self._by_ino[node.ino]
        if self._by_key.get(node.key) == node.ino:
            del self._by_key[node.key]


Factory = Callable[[], FileData | DirData | SymlinkData]


def node_spec(node: Node, parent: int) -> tuple[bytes, Factory]:
    """(inode key, data factory) of a node found under directory inode `parent`."""
    if isinstance(node, FileNode):
        return file_key(node.digest, node.size, node.executable), lambda: FileData(
            node.digest, node.size, node.executable
        )
    if isinstance(node, SymlinkNode):
        return symlink_key(node.target), lambda: SymlinkData(node.target)
    return dir_key(parent, node.name), lambda: DirData(parent, node.digest, "tree", node.size, name=node.name)
