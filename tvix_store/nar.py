"""Streaming NAR (Nix ARchive) rendering of a castore node, as `nix-store --dump` writes it.

Every string is a little-endian u64 length, the bytes, zero padding to 8. Entries of a
directory come in bytewise name order. File contents are streamed chunk by chunk from
the BlobService, with prefetch hints from the one read-ahead policy (`tvix_store.readahead`),
so memory stays bounded for any blob size and a caching remote fetches ahead. Directories
are walked with an explicit stack (no recursion limit on depth). `render(…, start)` begins at
a byte offset (HTTP Range requests of nar-bridge) without reading the file contents or chunks
that end before it. The grammar's pieces are
public for `tvix_store.importer`, which hashes the same bytes from the filesystem. Not a
NAR parser.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterator

from tvix_store.blobservice import BlobService
from tvix_store.core.castore import Directory, DirectoryNode, FileNode, Node, SymlinkNode
from tvix_store.core.digest import B3Digest
from tvix_store.core.errors import IntegrityError, NotFoundError
from tvix_store.directoryservice import DirectoryService
from tvix_store.readahead import SMALL_FILE, WALK_BUDGET, WALK_MAX_FILES, ReadAhead


def _str(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s + b"\0" * (-len(s) % 8)


_OPEN, _CLOSE = _str(b"("), _str(b")")
_TYPE = _str(b"type")
_EXEC = _str(b"executable") + _str(b"")

# The NAR grammar in pieces, shared by `render` (from the store) and `tvix_store.importer`
# (from the filesystem), so both produce the same bytes.
MAGIC = _str(b"nix-archive-1")
DIRECTORY_OPEN = _OPEN + _TYPE + _str(b"directory")
DIRECTORY_CLOSE = _CLOSE
ENTRY_CLOSE = _CLOSE
_REGULAR = _OPEN + _TYPE + _str(b"regular")
_CONTENTS = _str(b"contents")
_SYMLINK = _OPEN + _TYPE + _str(b"symlink") + _str(b"target")
_ENTRY = _str(b"entry") + _OPEN + _str(b"name")
_NODE = _str(b"node")


def regular_header(executable: bool, size: int) -> bytes:
    """Everything of a regular file's node before its contents."""
    return _REGULAR + (_EXEC if executable else b"") + _CONTENTS + struct.pack("<Q", size)


def regular_trailer(size: int) -> bytes:
    """Everything of a regular file's node after its `size` bytes of contents."""
    return b"\0" * (-size % 8) + _CLOSE


def symlink(target: bytes) -> bytes:
    """A whole symlink node."""
    return _SYMLINK + _str(target) + _CLOSE


def entry_open(name: bytes) -> bytes:
    """A directory entry up to its node (followed by the node, then ENTRY_CLOSE)."""
    return _ENTRY + _str(name) + _NODE


def render(node: Node, blobs: BlobService, directories: DirectoryService, start: int = 0) -> Iterator[bytes]:
    """Yield the NAR of `node` in pieces. Raises NotFoundError for a missing blob/Directory.

    `start` > 0: only the bytes from that offset on (an HTTP Range request); the structure is
    still walked, but file contents and chunks that end before `start` are never read."""
    hint = _walk_ahead(blobs)
    if start <= 0:
        for piece in _pieces(node, directories, hint):
            if isinstance(piece, FileNode):
                yield from _contents(piece, blobs)
            else:
                yield piece
        return
    pos = 0
    for piece in _pieces(node, directories, hint):
        n = piece.size if isinstance(piece, FileNode) else len(piece)
        if pos + n <= start:
            pos += n
            continue
        skip = max(0, start - pos)
        pos += n
        if isinstance(piece, FileNode):
            yield from _contents(piece, blobs, skip)
        else:
            yield piece[skip:] if skip else piece


def _walk_ahead(blobs: BlobService) -> Callable[[Directory], None]:
    """The small files of a directory just opened are read next, in this order: hint them (as
    the tree policy of `tvix_store.readahead` does, within its budget) so a remote cache fetches
    them together and a local store reads ahead, instead of one round trip per file."""

    def hint(d: Directory) -> None:
        small: list[B3Digest] = []
        total = 0
        for f in d.files:
            if 0 < f.size <= SMALL_FILE:
                small.append(f.digest)
                total += f.size
                if total >= WALK_BUDGET or len(small) >= WALK_MAX_FILES:
                    break
        if len(small) > 1:
            blobs.advise(small)
            blobs.prefetch(small)

    return hint


def _pieces(
    node: Node, directories: DirectoryService, opened: Callable[[Directory], None] = lambda d: None
) -> Iterator[bytes | FileNode]:
    """The NAR of `node` as bytes, with each file's contents left as its FileNode; `opened` is
    told of each Directory as it is entered."""
    yield MAGIC
    stack: list[Iterator[Node]] = []  # the entries still to render of each open directory
    pending: Node | None = node
    while True:
        if pending is not None:
            if isinstance(pending, DirectoryNode):
                d = directories.get(pending.digest)
                if d is None:
                    raise NotFoundError(f"directory {pending.digest.hex()} not found")
                opened(d)
                yield DIRECTORY_OPEN
                stack.append(iter(d.nodes()))
            else:
                yield from _leaf(pending)
                if stack:
                    yield ENTRY_CLOSE
            pending = None
        if not stack:
            return
        child = next(stack[-1], None)
        if child is None:
            stack.pop()
            yield DIRECTORY_CLOSE
            if stack:
                yield ENTRY_CLOSE
            continue
        yield entry_open(child.name)
        pending = child


def _leaf(node: Node) -> Iterator[bytes | FileNode]:
    if isinstance(node, SymlinkNode):
        yield symlink(node.target)
    elif isinstance(node, FileNode):
        yield regular_header(node.executable, node.size)
        yield node
        yield regular_trailer(node.size)
    else:  # pragma: no cover - Node is a closed union
        raise TypeError(f"not a node: {node!r}")


def _contents(node: FileNode, blobs: BlobService, skip: int = 0) -> Iterator[bytes]:
    """The file's bytes from offset `skip` on (chunks wholly before it are not read)."""
    chunks = blobs.chunks(node.digest)
    if chunks is None:
        raise NotFoundError(f"blob {node.digest.hex()} not found")
    ahead = ReadAhead(chunks) if len(chunks) > 1 else None
    total = 0
    for c in chunks:
        if total + c.size <= skip:
            total += c.size
            continue
        if ahead is not None:  # a hint for caching backends; free for the others
            a = ahead.after(total, total + c.size)
            if a:
                blobs.prefetch([x.digest for x in chunks[a.start : a.stop]])
        data = blobs.read_chunk(c.digest)
        if data is None:
            raise NotFoundError(f"chunk {c.digest.hex()} of blob {node.digest.hex()} not found")
        if len(data) != c.size:
            raise IntegrityError(
                f"chunk {c.digest.hex()} of blob {node.digest.hex()} has {len(data)} bytes, "
                f"its chunk list says {c.size}"
            )
        yield data[skip - total :] if skip > total else data
        total += len(data)
    if total != node.size:
        raise IntegrityError(f"blob {node.digest.hex()} has {total} bytes, but the file node says {node.size}")


def calculate(node: Node, blobs: BlobService, directories: DirectoryService) -> tuple[int, bytes]:
    """(size, sha256) of the NAR of `node`, streaming."""
    h = hashlib.sha256()
    size = 0
    for piece in render(node, blobs, directories):
        h.update(piece)
        size += len(piece)
    return size, h.digest()
