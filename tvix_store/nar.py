"""Streaming NAR (Nix ARchive) rendering of a castore node, as `nix-store --dump` writes it.

Every string is a little-endian u64 length, the bytes, zero padding to 8. Entries of a
directory come in bytewise name order. File contents are streamed chunk by chunk from
the BlobService, with prefetch hints from the one read-ahead policy (`tvix_store.readahead`),
so memory stays bounded for any blob size and a caching remote fetches ahead. Directories
are walked with an explicit stack (no recursion limit on depth). The grammar's pieces are
public for `tvix_store.importer`, which hashes the same bytes from the filesystem. Not a
NAR parser.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator

from tvix_store.blobservice import BlobService
from tvix_store.core.castore import DirectoryNode, FileNode, Node, SymlinkNode
from tvix_store.core.errors import IntegrityError, NotFoundError
from tvix_store.directoryservice import DirectoryService
from tvix_store.readahead import ReadAhead


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


def render(node: Node, blobs: BlobService, directories: DirectoryService) -> Iterator[bytes]:
    """Yield the NAR of `node` in pieces. Raises NotFoundError for a missing blob/Directory."""
    yield MAGIC
    stack: list[Iterator[Node]] = []  # the entries still to render of each open directory
    pending: Node | None = node
    while True:
        if pending is not None:
            if isinstance(pending, DirectoryNode):
                d = directories.get(pending.digest)
                if d is None:
                    raise NotFoundError(f"directory {pending.digest.hex()} not found")
                yield DIRECTORY_OPEN
                stack.append(iter(d.nodes()))
            else:
                yield from _leaf(pending, blobs)
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


def _leaf(node: Node, blobs: BlobService) -> Iterator[bytes]:
    if isinstance(node, SymlinkNode):
        yield symlink(node.target)
    elif isinstance(node, FileNode):
        yield regular_header(node.executable, node.size)
        yield from _contents(node, blobs)
        yield regular_trailer(node.size)
    else:  # pragma: no cover - Node is a closed union
        raise TypeError(f"not a node: {node!r}")


def _contents(node: FileNode, blobs: BlobService) -> Iterator[bytes]:
    chunks = blobs.chunks(node.digest)
    if chunks is None:
        raise NotFoundError(f"blob {node.digest.hex()} not found")
    ahead = ReadAhead(chunks) if len(chunks) > 1 else None
    total = 0
    for c in chunks:
        if ahead is not None:  # a hint for caching backends; free for the others
            a = ahead.after(total, total + c.size)
            if a:
                blobs.prefetch([x.digest for x in chunks[a.start : a.stop]])
        data = blobs.read_chunk(c.digest)
        if data is None:
            raise NotFoundError(f"chunk {c.digest.hex()} of blob {node.digest.hex()} not found")
        total += len(data)
        yield data
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
