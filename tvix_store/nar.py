"""Streaming NAR (Nix ARchive) rendering of a castore node, as `nix-store --dump` writes it.

Every string is a little-endian u64 length, the bytes, zero padding to 8. Entries of a
directory come in bytewise name order. File contents are streamed chunk by chunk from
the BlobService, so memory stays bounded for any blob size. Not a NAR parser.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator

from tvix_store.blobservice import BlobService
from tvix_store.castore import DirectoryNode, FileNode, Node, SymlinkNode
from tvix_store.directoryservice import DirectoryService
from tvix_store.errors import IntegrityError, NotFoundError


def _str(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s + b"\0" * (-len(s) % 8)


_MAGIC = _str(b"nix-archive-1")
_OPEN, _CLOSE = _str(b"("), _str(b")")
_TYPE = _str(b"type")
_REGULAR = _OPEN + _TYPE + _str(b"regular")
_EXEC = _str(b"executable") + _str(b"")
_CONTENTS = _str(b"contents")
_SYMLINK = _OPEN + _TYPE + _str(b"symlink") + _str(b"target")
_DIRECTORY = _OPEN + _TYPE + _str(b"directory")
_ENTRY = _str(b"entry") + _OPEN + _str(b"name")
_NODE = _str(b"node")


def render(node: Node, blobs: BlobService, directories: DirectoryService) -> Iterator[bytes]:
    """Yield the NAR of `node` in pieces. Raises NotFoundError for a missing blob/Directory."""
    yield _MAGIC
    yield from _node(node, blobs, directories)


def _node(node: Node, blobs: BlobService, directories: DirectoryService) -> Iterator[bytes]:
    if isinstance(node, SymlinkNode):
        yield _SYMLINK + _str(node.target) + _CLOSE
    elif isinstance(node, FileNode):
        yield _REGULAR + (_EXEC if node.executable else b"") + _CONTENTS + struct.pack("<Q", node.size)
        yield from _contents(node, blobs)
        yield b"\0" * (-node.size % 8) + _CLOSE
    elif isinstance(node, DirectoryNode):
        d = directories.get(node.digest)
        if d is None:
            raise NotFoundError(f"directory {node.digest.hex()} not found")
        yield _DIRECTORY
        for child in d.nodes():
            yield _ENTRY + _str(child.name) + _NODE
            yield from _node(child, blobs, directories)
            yield _CLOSE
        yield _CLOSE
    else:  # pragma: no cover - Node is a closed union
        raise TypeError(f"not a node: {node!r}")


def _contents(node: FileNode, blobs: BlobService) -> Iterator[bytes]:
    chunks = blobs.chunks(node.digest)
    if chunks is None:
        raise NotFoundError(f"blob {node.digest.hex()} not found")
    total = 0
    for c in chunks:
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
