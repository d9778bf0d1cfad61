"""The walk of an import: one pass over a tree in NAR order computing what `nix-store --add`
would (NAR size and sha256, hence the store path), every file's BLAKE3 and every Directory.

Small files (≤ `SMALL_FILE`) are read whole and kept (within `KEEP_BYTES`) for the upload
phase; big files are settled during the walk, streamed in 1 MiB reads: hashed (BLAKE3) first,
then, only if the store lacks them, read again while the `Uploader` sends them (the second
read also feeds the NAR hash); otherwise read again for the NAR hash only.

Nix's rules are followed, not improved on: a file is executable iff its owner `x` bit is set
(`S_IXUSR`, as `nix-store --dump`), symlinks are stored, never followed (also at the root).
Refused, with a message naming the path: sockets, FIFOs and devices. Names and symlink
targets are bytes, UTF-8 or not, and sizes uint64 (as in `tvix.castore.v1` and
`snix.castore.v1`): files and NARs of 4 GiB and more import, streamed like any big file, never
held in memory (a 2022 `tvix.store.v1` peer is refused what it cannot carry, by its codec).
Directories are walked with an explicit stack and one directory fd, each opened relative to
the one before: depth is bounded neither by the recursion limit nor by PATH_MAX.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, field

from tvix_store import nar
from tvix_store.core.castore import MAX_U64, Directory, FileNode, Node, SymlinkNode, validate_name
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


#: what an entry is, read while its directory is open (a DirEntry may stat lazily)
_DIR, _LINK, _FILE = 0, 1, 2
#: longest path the kernel opens by name (PATH_MAX 4096 with its NUL); deeper files are kept
#: in memory from the walk, as they could not be opened again by path
PATH_MAX = 4095
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class _Frame:
    """A directory being walked: its path (for messages; it may be longer than PATH_MAX), its
    identity (st_dev, st_ino), remaining sorted entries, and the nodes done so far."""

    path: bytes
    name: bytes
    ident: tuple[int, int]
    entries: list[tuple[bytes, int]]
    index: int = 0
    nodes: list[Node] = field(default_factory=list)


class _Cursor:
    """The one directory fd of a walk: opened relative to the one before (never by a full
    path, so depth is not bounded by PATH_MAX), back up by `..` checked against the parent's
    identity (a tree moved meanwhile is an error, never a wrong import)."""

    def __init__(self, root: bytes) -> None:
        self.fd = os.open(root, _DIR_FLAGS)

    def down(self, name: bytes) -> os.stat_result:
        child = os.open(name, _DIR_FLAGS, dir_fd=self.fd)
        os.close(self.fd)
        self.fd = child
        return os.fstat(child)

    def up(self, parent: _Frame) -> None:
        fd = os.open(b"..", _DIR_FLAGS, dir_fd=self.fd)
        os.close(self.fd)
        self.fd = fd
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != parent.ident:
            raise StoreError(f"{show(parent.path)}: directory moved while being imported")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


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
        if self.nar_size + more > MAX_U64:
            raise ValidationError(f"{show(p)}: the NAR serialisation would exceed 2^64 - 1 bytes")

    def walk(self, root: bytes, root_name: bytes) -> Node:
        """Hash the tree (NAR, blobs, Directories); upload missing big blobs. Returns the root node."""
        self.nar(nar.MAGIC)
        st = os.lstat(root)
        if not stat.S_ISDIR(st.st_mode):
            return self.leaf(root, root_name, st.st_mode)
        cur = _Cursor(root)
        try:
            return self._walk_dirs(cur, root, root_name, os.fstat(cur.fd))
        finally:
            cur.close()

    def _walk_dirs(self, cur: _Cursor, root: bytes, root_name: bytes, st: os.stat_result) -> Node:
        self.nar(nar.DIRECTORY_OPEN)
        stack = [_Frame(root, root_name, (st.st_dev, st.st_ino), self.list_dir(cur.fd, root))]
        while True:
            f = stack[-1]
            if f.index < len(f.entries):
                name, kind = f.entries[f.index]
                f.index += 1
                p = f.path + b"/" + name
                self.nar(nar.entry_open(name))
                if kind == _DIR:
                    self.nar(nar.DIRECTORY_OPEN)
                    cst = cur.down(name)
                    stack.append(_Frame(p, name, (cst.st_dev, cst.st_ino), self.list_dir(cur.fd, p)))
                    continue
                if kind == _LINK:
                    f.nodes.append(self.symlink(p, name, cur.fd))
                elif kind == _FILE:
                    f.nodes.append(self.file(p, name, cur.fd))
                else:
                    raise _unsupported(p, kind)
                self.nar(nar.ENTRY_CLOSE)
                continue
            stack.pop()
            self.nar(nar.DIRECTORY_CLOSE)
            d = Directory.from_nodes(f.nodes)
            self.directories.setdefault(d.digest, d)
            dnode = d.as_node(f.name)
            if dnode.size > MAX_U64:
                raise ValidationError(f"{show(f.path)}: more than 2^64 - 1 entries")
            if not stack:
                return dnode
            cur.up(stack[-1])
            stack[-1].nodes.append(dnode)
            self.nar(nar.ENTRY_CLOSE)

    def list_dir(self, fd: int, p: bytes) -> list[tuple[bytes, int]]:
        """The entries of the open directory `fd` (path `p`), sorted bytewise: (name, kind),
        kind `_DIR`, `_LINK`, `_FILE` or else the st_mode of what cannot be imported."""
        out: list[tuple[bytes, int]] = []
        with os.scandir(fd) as it:
            for e in it:
                name = os.fsencode(e.name)
                try:
                    validate_name(name)
                except ValidationError as err:
                    raise ValidationError(f"{show(p + b'/' + name)}: {err}") from None
                if e.is_dir(follow_symlinks=False):
                    kind = _DIR
                elif e.is_symlink():
                    kind = _LINK
                elif e.is_file(follow_symlinks=False):
                    kind = _FILE
                else:
                    kind = e.stat(follow_symlinks=False).st_mode
                out.append((name, kind))
        out.sort()
        return out

    def leaf(self, p: bytes, name: bytes, mode: int) -> Node:
        if stat.S_ISLNK(mode):
            return self.symlink(p, name)
        if stat.S_ISREG(mode):
            return self.file(p, name)
        raise _unsupported(p, mode)

    def symlink(self, p: bytes, name: bytes, dir_fd: int | None = None) -> SymlinkNode:
        target = os.readlink(p if dir_fd is None else name, dir_fd=dir_fd)
        node = SymlinkNode(name, os.fsencode(target))
        try:
            node.validate()
        except ValidationError as err:
            raise ValidationError(f"{show(p)}: {err}") from None
        self.nar(nar.symlink(node.target))
        return node

    def file(self, p: bytes, name: bytes, dir_fd: int | None = None) -> FileNode:
        fd = open_nofollow(p) if dir_fd is None else open_nofollow(name, dir_fd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise _unsupported(p, st.st_mode)
            size = st.st_size
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
            keep = self.kept + size <= KEEP_BYTES or len(p) > PATH_MAX  # (cannot be opened again)
            self.kept += size if keep else 0
            self.pending[digest] = Pending(digest, p, size, data if keep else None)
        return digest

    def big_file(self, fd: int, p: bytes, size: int) -> B3Digest:
        up = self.uploader
        # pass 1: BLAKE3 only (fast), to ask the store before writing anything (a re-import of
        # an unchanged file then costs one read and two hashes)
        h = new_hasher()  # 1 MiB pieces: one thread is faster (measured)
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
        if up.present(digest):
            total = 0
            while n := os.readv(fd, [buf]):
                self.nar(view[:n])
                total += n
                self.report("hashing", total)
            up.settled.add(digest)
        else:
            total, _ = up.stream(fd, p, digest, self.nar, lambda n: self.report("uploading", n))
        if total != size:
            raise StoreError(f"{show(p)}: file changed while being imported")
        return digest

    def report(self, phase: str, partial: int) -> None:
        """Progress within a big file: `partial` bytes of the current file done."""
        if self.progress is not None:
            self.progress(phase, self.files, self.bytes + partial)
