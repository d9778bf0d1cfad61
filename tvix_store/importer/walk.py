"""The walk of an import: one pass over a tree in NAR order computing what `nix-store --add`
would (NAR size and sha256, hence the store path), every file's BLAKE3 and every Directory.

Small files (≤ `SMALL_FILE`) are read whole and kept (within `KEEP_BYTES`) for the upload
phase; big files are settled during the walk, streamed in 1 MiB reads: hashed (BLAKE3) first,
then, only if the store lacks them, read again while the `Uploader` sends them (the second
read also feeds the NAR hash); otherwise read again for the NAR hash only.

Nix's rules are followed, not improved on: a file is executable iff its owner `x` bit is set
(`S_IXUSR`, as `nix-store --dump`), symlinks are stored, never followed (also at the root).
Refused, with a message naming the path: sockets, FIFOs and devices; names and symlink
targets that are not UTF-8 (they are protobuf strings on the wire); files of 4 GiB or more
(`FileNode.size` is uint32) and trees whose NAR is that big (`NARInfo.nar_size`).
Directories are walked with an explicit stack (no recursion limit on depth).
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, field

from tvix_store import nar
from tvix_store.core.castore import MAX_U32, Directory, FileNode, Node, SymlinkNode, validate_name
from tvix_store.core.digest import B3Digest, new_hasher
from tvix_store.core.errors import StoreError, ValidationError
from tvix_store.importer.upload import Pending, Progress, Uploader, open_nofollow, show

#: Files up to this size are read in one go and settled after the walk; bigger ones stream.
SMALL_FILE = 1 << 20
READ_SIZE = 1 << 20
#: Bytes of small files kept in memory from the walk for the upload phase (beyond: read again).
KEEP_BYTES = 64 << 20


def nix_basename(path: str) -> str:
    """Nix's `baseNameOf`: the last component, one trailing slash ignored (`a/b/` → `b`, `a//` → ``)."""
    if not path:
        return ""
    last = len(path) - 1
    if path[last] == "/" and last > 0:
        last -= 1
    pos = path.rfind("/", 0, last + 1)
    return path[pos + 1 : last + 1]


_KINDS = {
    stat.S_IFSOCK: "socket",
    stat.S_IFIFO: "FIFO",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
}


def _unsupported(p: bytes, mode: int) -> ValidationError:
    kind = _KINDS.get(stat.S_IFMT(mode), f"file of type {stat.S_IFMT(mode):o}")
    return ValidationError(f"{show(p)}: cannot import a {kind}: only regular files, directories and symlinks")


@dataclass
class _Frame:
    """A directory being walked: its path, remaining sorted entries, and the nodes done so far."""

    path: bytes
    name: bytes
    entries: list[os.DirEntry[bytes]]
    index: int = 0
    nodes: list[Node] = field(default_factory=list)


class TreeWalk:
    """One walk (see the module docstring); `walk()` returns the root node, then `pending`
    holds the small blobs to settle and `directories` the Directories, leaves first."""

    def __init__(self, uploader: Uploader, progress: Progress | None) -> None:
        self.uploader = uploader
        self.progress = progress
        self.sha = hashlib.sha256()
        self.nar_size = 0
        self.directories: dict[B3Digest, Directory] = {}  # leaves first (insertion order), deduplicated
        self.pending: dict[B3Digest, Pending] = {}  # small blobs, settled after the walk
        self.kept = 0
        self.files = 0
        self.bytes = 0

    def nar(self, piece: bytes | memoryview) -> None:
        self.sha.update(piece)
        self.nar_size += len(piece)

    def check_nar_room(self, p: bytes, more: int) -> None:
        if self.nar_size + more > MAX_U32:
            raise ValidationError(
                f"{show(p)}: the NAR serialisation would exceed 4 GiB - 1 bytes (NARInfo.nar_size is uint32)"
            )

    def walk(self, root: bytes, root_name: bytes) -> Node:
        """Hash the tree (NAR, blobs, Directories); upload missing big blobs. Returns the root node."""
        self.nar(nar.MAGIC)
        st = os.lstat(root)
        if not stat.S_ISDIR(st.st_mode):
            return self.leaf(root, root_name, st.st_mode)
        self.nar(nar.DIRECTORY_OPEN)
        stack = [_Frame(root, root_name, self.list_dir(root))]
        while True:
            f = stack[-1]
            if f.index < len(f.entries):
                e = f.entries[f.index]
                f.index += 1
                self.nar(nar.entry_open(e.name))
                if e.is_dir(follow_symlinks=False):
                    self.nar(nar.DIRECTORY_OPEN)
                    stack.append(_Frame(e.path, e.name, self.list_dir(e.path)))
                    continue
                if e.is_symlink():
                    f.nodes.append(self.symlink(e.path, e.name))
                elif e.is_file(follow_symlinks=False):
                    f.nodes.append(self.file(e.path, e.name))
                else:
                    raise _unsupported(e.path, os.lstat(e.path).st_mode)
                self.nar(nar.ENTRY_CLOSE)
                continue
            stack.pop()
            self.nar(nar.DIRECTORY_CLOSE)
            d = Directory.from_nodes(f.nodes)
            self.directories.setdefault(d.digest, d)
            dnode = d.as_node(f.name)
            if dnode.size > MAX_U32:
                raise ValidationError(f"{show(f.path)}: more than 4 GiB - 1 entries")
            if not stack:
                return dnode
            stack[-1].nodes.append(dnode)
            self.nar(nar.ENTRY_CLOSE)

    def list_dir(self, p: bytes) -> list[os.DirEntry[bytes]]:
        with os.scandir(p) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            try:
                validate_name(e.name)
            except ValidationError as err:
                raise ValidationError(f"{show(e.path)}: {err}") from None
        return entries

    def leaf(self, p: bytes, name: bytes, mode: int) -> Node:
        if stat.S_ISLNK(mode):
            return self.symlink(p, name)
        if stat.S_ISREG(mode):
            return self.file(p, name)
        raise _unsupported(p, mode)

    def symlink(self, p: bytes, name: bytes) -> SymlinkNode:
        node = SymlinkNode(name, os.readlink(p))
        try:
            node.validate()
        except ValidationError as err:
            raise ValidationError(f"{show(p)}: {err}") from None
        self.nar(nar.symlink(node.target))
        return node

    def file(self, p: bytes, name: bytes) -> FileNode:
        fd = open_nofollow(p)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise _unsupported(p, st.st_mode)
            size = st.st_size
            if size > MAX_U32:
                raise ValidationError(
                    f"{show(p)}: file of {size} bytes is larger than 4 GiB - 1 (FileNode.size is uint32)"
                )
            executable = bool(st.st_mode & stat.S_IXUSR)
            header = nar.regular_header(executable, size)
            trailer = nar.regular_trailer(size)
            self.check_nar_room(p, len(header) + size + len(trailer))
            self.nar(header)
            if size <= SMALL_FILE:
                digest = self.small_file(fd, p, size)
            else:
                digest = self.big_file(fd, p, size)
            self.nar(trailer)
        finally:
            os.close(fd)
        self.files += 1
        self.bytes += size
        if self.progress is not None:
            self.progress("hashing", self.files, self.bytes)
        return FileNode(name, digest, size, executable)

    def small_file(self, fd: int, p: bytes, size: int) -> B3Digest:
        data = os.read(fd, size) if size else b""
        while len(data) < size:  # short reads: rare for regular files, but allowed
            more = os.read(fd, size - len(data))
            if not more:
                raise StoreError(f"{show(p)}: file shrank while being imported")
            data += more
        self.nar(data)
        digest = B3Digest.of(data)
        if digest not in self.pending:
            keep = self.kept + size <= KEEP_BYTES
            self.kept += size if keep else 0
            self.pending[digest] = Pending(digest, p, size, data if keep else None)
        return digest

    def big_file(self, fd: int, p: bytes, size: int) -> B3Digest:
        # pass 1: BLAKE3 only (fast), to ask the store before uploading anything
        h = new_hasher(large=True)
        buf = bytearray(READ_SIZE)
        view = memoryview(buf)
        total = 0
        while n := os.readv(fd, [buf]):
            h.update(view[:n])
            total += n
            if total > size:
                break
            self.report("hashing", total)
        if total != size:
            raise StoreError(f"{show(p)}: file changed size while being imported")
        digest = B3Digest(h.digest())
        # pass 2: the NAR hash, and the upload if the store lacks the blob
        os.lseek(fd, 0, os.SEEK_SET)
        up = self.uploader
        if up.present(digest):
            total = 0
            while n := os.readv(fd, [buf]):
                self.nar(view[:n])
                total += n
                self.report("hashing", total)
            up.settled.add(digest)
        else:
            total = up.stream(fd, p, digest, self.nar, lambda n: self.report("uploading", n))
        if total != size:
            raise StoreError(f"{show(p)}: file changed while being imported")
        return digest

    def report(self, phase: str, partial: int) -> None:
        """Progress within a big file: `partial` bytes of the current file done."""
        if self.progress is not None:
            self.progress(phase, self.files, self.bytes + partial)
