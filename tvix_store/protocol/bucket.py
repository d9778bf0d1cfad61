"""The object-store bucket layout of tvix and snix: keys and the bytes of every object.

The one place that knows how tvix/snix's `ObjectStoreBlobService` and
`ObjectStoreDirectoryService` lay out a bucket (so a bucket written by either is readable
here and the other way round):

    blobs/b3/<hex d[0:2]>/<hex d>    a blob's chunk index: protobuf `StatBlobResponse`
                                     {2: repeated ChunkMeta {1: digest, 2: uncompressed size}},
                                     empty (0 bytes) for a blob of 0 or 1 chunks
    chunks/b3/<hex d[0:2]>/<hex d>   one chunk: a single zstd frame (level 3) of its bytes
    dirs/b3/<hex d[0:2]>/<hex d>     a Directory's whole closure, root first: one zstd frame of
                                     repeated (u32 big-endian length, Directory protobuf)

The shard is the first two BYTES of the digest (4 hex digits). Keys are relative to the
bucket prefix. Decoding checks lengths and bounds (a decompression bomb or a frame longer
than the layout allows is an IntegrityError); digests and Directory validation are checked
by the services that read. No I/O here.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator

import zstandard

from tvix_store.core.chunks import ChunkMeta
from tvix_store.core.digest import B3Digest
from tvix_store.core.errors import IntegrityError

#: zstd level tvix/snix write (`zstd::DEFAULT_COMPRESSION_LEVEL`)
ZSTD_LEVEL = 3
#: a chunk never decompresses to more (snix's max chunk is 512 KiB by default; room for others)
MAX_CHUNK = 16 << 20
#: a Directory closure never decompresses to more, nor one frame of it
MAX_CLOSURE = 1 << 30
MAX_FRAME = 1_048_576_000  # snix's MAX_FRAME_LENGTH (its comment says 1 MiB; the value is 1000 MiB)
_LEN = struct.Struct(">I")
_PIECE = 16 << 10  # compressed bytes fed to the decompressor at a time


def _key(kind: str, digest: bytes) -> str:
    return f"{kind}/b3/{digest[:2].hex()}/{digest.hex()}"


def blob_key(digest: bytes) -> str:
    return _key("blobs", digest)


def chunk_key(digest: bytes) -> str:
    return _key("chunks", digest)


def dir_key(digest: bytes) -> str:
    return _key("dirs", digest)


def digest_of_key(key: str) -> B3Digest | None:
    """The digest a `KIND/b3/SHARD/HEX` key names, or None if it is not such a key."""
    parts = key.split("/")
    if len(parts) != 4 or parts[1] != "b3" or len(parts[3]) != 64 or parts[2] != parts[3][:4]:
        return None
    try:
        return B3Digest.from_hex(parts[3])
    except Exception:  # noqa: BLE001 - not hex: not one of ours
        return None


# --- protobuf by hand: two tiny messages, no generated module for the 2024 StatBlobResponse --


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _read_varint(buf: memoryview, pos: int, what: str) -> tuple[int, int]:
    n = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise IntegrityError(f"{what}: truncated or overlong varint")
        b = buf[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            return n, pos
        shift += 7


def _fields(raw: bytes | memoryview, what: str) -> Iterator[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value) of each field; varints as int, length-delimited as view."""
    buf = memoryview(raw)
    pos = 0
    while pos < len(buf):
        tag, pos = _read_varint(buf, pos, what)
        field, wt = tag >> 3, tag & 7
        if wt == 0:
            v, pos = _read_varint(buf, pos, what)
            yield field, wt, v
        elif wt == 2:
            n, pos = _read_varint(buf, pos, what)
            if pos + n > len(buf):
                raise IntegrityError(f"{what}: field {field} runs past the end")
            yield field, wt, buf[pos : pos + n]
            pos += n
        elif wt == 1:
            pos += 8
        elif wt == 5:
            pos += 4
        else:
            raise IntegrityError(f"{what}: unsupported wire type {wt}")
        if pos > len(buf):
            raise IntegrityError(f"{what}: truncated")


def encode_index(chunks: list[ChunkMeta]) -> bytes:
    """The `blobs/b3/…` object of a blob with these chunks (0 bytes for fewer than two)."""
    if len(chunks) < 2:
        return b""
    out = bytearray()
    for c in chunks:
        meta = b"\x0a\x20" + bytes(c.digest) + b"\x10" + _varint(c.size)
        out += b"\x12" + _varint(len(meta)) + meta
    return bytes(out)


def decode_index(raw: bytes, name: str) -> list[ChunkMeta]:
    """The chunks a `blobs/b3/…` object lists ([] for 0 or 1 chunk); IntegrityError if malformed."""
    what = f"chunk index of blob {name}"
    out = []
    for field, wt, value in _fields(raw, what):
        if field != 2 or wt != 2:
            continue  # bao (3) is never set; unknown fields are skipped as protobuf does
        assert isinstance(value, memoryview)
        digest, size = b"", 0
        for f, w, v in _fields(value, what):
            if f == 1 and w == 2:
                digest = bytes(v)  # type: ignore[arg-type]
            elif f == 2 and w == 0:
                size = int(v)  # type: ignore[arg-type]
        if len(digest) != 32 or size <= 0 or size > MAX_CHUNK:
            raise IntegrityError(f"{what}: chunk {len(out)} has a {len(digest)}-byte digest and size {size}")
        out.append(ChunkMeta(B3Digest(digest), size))
    if len(out) == 1:
        raise IntegrityError(f"{what}: lists a single chunk (the layout writes an empty index then)")
    return out


# --- zstd -----------------------------------------------------------------------------------


def compress(data: bytes | bytearray | memoryview) -> bytes:
    """One zstd frame, level 3 (with the content size in its header)."""
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(data)


def decompress(raw: bytes, limit: int, what: str) -> bytes:
    """The first zstd frame of `raw` (frames without a content size too); IntegrityError if it
    is not zstd, is truncated, or would exceed `limit` bytes (checked as it goes: a small
    object that inflates without bound is stopped early)."""
    d = zstandard.ZstdDecompressor().decompressobj()
    out = bytearray()
    mv = memoryview(raw)
    try:
        for off in range(0, len(mv), _PIECE):
            out += d.decompress(mv[off : off + _PIECE])
            if len(out) > limit:
                raise IntegrityError(f"{what}: decompresses to more than {limit} bytes")
            if d.eof:
                break
    except zstandard.ZstdError as e:
        raise IntegrityError(f"{what}: not a valid zstd frame: {e}") from None
    if not d.eof:
        raise IntegrityError(f"{what}: truncated zstd frame")
    return bytes(out)


def chunk_size_hint(head: bytes) -> int | None:
    """The uncompressed size a chunk object's zstd frame header states (None if it states none)."""
    try:
        n = zstandard.get_frame_parameters(head).content_size
    except zstandard.ZstdError:
        return None
    return n if 0 < n < (1 << 62) else None


# --- Directory closures -----------------------------------------------------------------------


def encode_closure(frames: Iterable[bytes]) -> bytes:
    """The `dirs/b3/…` object of a closure, given its Directories' encodings, root first."""
    body = bytearray()
    for f in frames:
        body += _LEN.pack(len(f)) + f
    return compress(body)


def decode_closure(raw: bytes, name: str) -> list[bytes]:
    """The Directory encodings a `dirs/b3/…` object holds, in stored order (root first)."""
    what = f"directory closure {name}"
    body = memoryview(decompress(raw, MAX_CLOSURE, what))
    out, pos = [], 0
    while pos < len(body):
        if pos + 4 > len(body):
            raise IntegrityError(f"{what}: truncated length field")
        (n,) = _LEN.unpack_from(body, pos)
        pos += 4
        if n > MAX_FRAME or pos + n > len(body):
            raise IntegrityError(f"{what}: frame of {n} bytes runs past the end")
        out.append(bytes(body[pos : pos + n]))
        pos += n
    if not out:
        raise IntegrityError(f"{what}: holds no directory")
    return out
