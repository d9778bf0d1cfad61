"""Chunks of a blob: `ChunkMeta`, the one chunk-list codec, and the checks a chunk list must pass.

A blob is the concatenation of its chunks, each addressed by its own BLAKE3. The chunk list
(the blob's "record") is what a store keeps for a blob of more than one chunk; this module is
the only place that encodes and decodes it, for every backend that stores one (the embedded
store, the persistent cache) and for the bucket layouts to come.

Record format (version 1): `b"tvixblb1"`, total size (u64 LE), chunk count (u32 LE),
count × (32-byte chunk digest, u32 LE chunk size), then the first 16 bytes of the BLAKE3 of
everything before it, so a damaged record is detected, never misread.

No I/O here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from tvix_store.core.digest import EMPTY_DIGEST, B3Digest, blake3_of
from tvix_store.core.errors import IntegrityError


@dataclass(frozen=True, slots=True)
class ChunkMeta:
    """One chunk of a blob: its digest and length."""

    digest: B3Digest
    size: int


_MAGIC = b"tvixblb1"
_HEAD = struct.Struct("<8sQI")
_ENTRY = struct.Struct("<32sI")
_SUM = 16


def encode_chunk_list(chunks: list[ChunkMeta]) -> bytes:
    """The record of a chunk list (see the module docstring)."""
    body = bytearray(_HEAD.pack(_MAGIC, sum(c.size for c in chunks), len(chunks)))
    for c in chunks:
        body += _ENTRY.pack(bytes(c.digest), c.size)
    return bytes(body) + blake3_of(body)[:_SUM]


def decode_chunk_list(data: bytes, name: str) -> list[ChunkMeta]:
    """Parse a record (`name` names it in messages); IntegrityError if it is damaged."""
    head = _HEAD.size
    if len(data) < head + _SUM:
        raise IntegrityError(f"chunk list {name} is truncated ({len(data)} bytes)")
    magic, total, count = _HEAD.unpack_from(data)
    if magic != _MAGIC or len(data) != head + count * _ENTRY.size + _SUM:
        raise IntegrityError(f"chunk list {name} is damaged (bad header or length)")
    body = memoryview(data)[:-_SUM]
    if blake3_of(body)[:_SUM] != data[-_SUM:]:
        raise IntegrityError(f"chunk list {name} is damaged (checksum mismatch)")
    out = [ChunkMeta(B3Digest(d), s) for d, s in _ENTRY.iter_unpack(body[head:])]
    if sum(c.size for c in out) != total:
        raise IntegrityError(f"chunk list {name} is damaged (chunk sizes do not add up)")
    return out


def check_chunk_list(digest: B3Digest, chunks: list[ChunkMeta], expected_size: int | None = None) -> None:
    """Raise IntegrityError if `chunks` cannot be the chunk list of blob `digest`.

    Checks what can be checked without the bytes: the empty blob and only it has no chunks;
    no chunk is empty; a single chunk is the blob itself; the sizes add up to `expected_size`
    when it is known (from a FileNode). That the chunks' concatenation hashes to `digest` can
    only be checked by reading all of them (a sequential reader to the end does).
    """
    what = f"chunk list of blob {digest.hex()}"
    if not chunks:
        if digest != EMPTY_DIGEST:
            raise IntegrityError(f"{what}: no chunks, but the blob is not the empty blob")
    elif digest == EMPTY_DIGEST:
        raise IntegrityError(f"{what}: the empty blob has {len(chunks)} chunks")
    for i, c in enumerate(chunks):
        if c.size <= 0:
            raise IntegrityError(f"{what}: chunk {i} ({c.digest.hex()}) has size {c.size}")
    if len(chunks) == 1 and chunks[0].digest != digest:
        raise IntegrityError(f"{what}: a single chunk {chunks[0].digest.hex()} that is not the blob itself")
    if expected_size is not None:
        total = sum(c.size for c in chunks)
        if total != expected_size:
            raise IntegrityError(f"{what}: chunk sizes add up to {total}, expected {expected_size}")


def chunk_offsets(chunks: list[ChunkMeta]) -> tuple[list[int], int]:
    """(offset of each chunk in the blob, total size): the index a reader bisects."""
    offsets = []
    total = 0
    for c in chunks:
        offsets.append(total)
        total += c.size
    return offsets, total
