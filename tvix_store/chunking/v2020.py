"""FastCDC 2020, as tvix and snix cut blobs for their object-store bucket layout.

The Rust `fastcdc` crate (3.1.0, `v2020::AsyncStreamCDC`, normalization level 1) with the
parameters of tvix/snix's `ObjectStoreBlobService`: min 128 KiB, avg 256 KiB, max 512 KiB
(`BUCKET`). Same cut points as that crate, so a blob written here deduplicates against one
written by snix. It is not this project's own chunker (`tvix_store.chunking`, other gear
table and masks), and it does not hash or store chunks.

Algorithm (the crate's `cut`): gear hash `h = (h << 1) + GEAR[b]` from byte `min` of a chunk
on, two bytes per step; before `avg` bytes a cut needs `h & mask_s == 0`, after it
`h & mask_l == 0`; the byte that matches starts the NEXT chunk; a chunk ends at `max` bytes
at the latest. `GEAR[i]` = the first 8 bytes (big-endian) of MD5 of 64 bytes of value `i`;
`mask_s`/`mask_l` = the crate's MASKS for log2(avg) ± 1 bits. The stream variant cuts a
buffer of `max` bytes at a time, which gives the same cut points as the whole buffer.

The hot loop is `_cdc.cut2020` (C); `py_cut` is the reference the tests compare it with.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from tvix_store.chunking import _M64

#: the crate's MASKS by number of bits (6 = 64 B … 24 = 16 MiB; 5 and 25 for the neighbours)
MASKS: dict[int, int] = {
    5: 0x0000000001804110,
    6: 0x0000000001803110,
    7: 0x0000000018035100,
    8: 0x0000001800035300,
    9: 0x0000019000353000,
    10: 0x0000590003530000,
    11: 0x0000D90003530000,
    12: 0x0000D90103530000,
    13: 0x0000D90303530000,
    14: 0x0000D90313530000,
    15: 0x0000D90F03530000,
    16: 0x0000D90303537000,
    17: 0x0000D90703537000,
    18: 0x0000D90707537000,
    19: 0x0000D91707537000,
    20: 0x0000D91747537000,
    21: 0x0000D91767537000,
    22: 0x0000D93767537000,
    23: 0x0000D93777537000,
    24: 0x0000D93777577000,
    25: 0x0000DB3777577000,
}


def _gear() -> tuple[int, ...]:
    return tuple(int.from_bytes(hashlib.md5(bytes([i]) * 64).digest()[:8], "big") for i in range(256))


GEAR = _gear()
_GEAR_BYTES = struct.pack(f"={256}Q", *GEAR)


@dataclass(frozen=True)
class Params2020:
    """min/avg/max chunk sizes; avg a power of two whose neighbouring masks are known."""

    min_size: int
    avg_size: int
    max_size: int

    @property
    def masks(self) -> tuple[int, int]:
        bits = self.avg_size.bit_length() - 1
        return MASKS[bits + 1], MASKS[bits - 1]


#: what tvix/snix's ObjectStoreBlobService uses (avg_chunk_size 256 KiB: min avg/2, max avg*2)
BUCKET = Params2020(128 * 1024, 256 * 1024, 512 * 1024)


def py_cut(src: bytes | bytearray | memoryview, p: Params2020) -> int:
    """Reference implementation of `_cdc.cut2020`: the length of the first chunk of `src`."""
    mv = memoryview(src).cast("B")
    mask_s, mask_l = p.masks
    remaining = len(mv)
    if remaining <= p.min_size:
        return remaining
    center = p.avg_size
    if remaining > p.max_size:
        remaining = p.max_size
    elif remaining < center:
        center = remaining
    index, h = p.min_size // 2, 0
    while index < remaining // 2:
        mask = mask_s if index < center // 2 else mask_l
        a = index * 2
        h = ((h << 1) + GEAR[mv[a]]) & _M64
        if h & mask == 0:
            return a
        h = ((h << 1) + GEAR[mv[a + 1]]) & _M64
        if h & mask == 0:
            return a + 1
        index += 1
    return remaining


def _load_c() -> object | None:
    try:
        from tvix_store.chunking import _cdc
    except ImportError:  # the package logs the missing extension already
        return None
    return getattr(_cdc, "cut2020", None)


_c_cut = _load_c()


def cut(src: bytes | bytearray | memoryview, p: Params2020 = BUCKET) -> int:
    """The length of the first chunk of `src` (C when built, else the slow reference)."""
    if _c_cut is None:
        return py_cut(src, p)
    mask_s, mask_l = p.masks
    return _c_cut(src, _GEAR_BYTES, p.min_size, p.avg_size, p.max_size, mask_s, mask_l)  # type: ignore[operator]


class Stream2020:
    """Streaming FastCDC 2020: `feed` pieces of any size, get whole chunks back; `finish` the rest."""

    def __init__(self, params: Params2020 = BUCKET) -> None:
        self.params = params
        self._buf = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[bytes]:
        self._buf += data
        while len(self._buf) >= self.params.max_size:
            yield self._take()

    def finish(self) -> Iterator[bytes]:
        while self._buf:
            yield self._take()

    def _take(self) -> bytes:
        with memoryview(self._buf) as mv:
            n = cut(mv[: self.params.max_size], self.params)
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out


def chunk_lengths(data: bytes | bytearray | memoryview, params: Params2020 = BUCKET) -> list[int]:
    """Lengths of the chunks of a whole buffer."""
    s = Stream2020(params)
    return [len(c) for c in (*s.feed(data), *s.finish())]
