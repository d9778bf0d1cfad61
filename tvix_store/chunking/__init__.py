"""Content-defined chunking: where a byte stream is cut into chunks (FastCDC-style gear hash).

This module decides chunk boundaries only; it does not hash chunks or store them (that
is `tvix_store.blobservice.local`). The hot loop is the C extension `tvix_store.chunking._cdc`;
`_py_scan` below is the pure-Python reference with identical results, used by the tests
to check the C code and as a (very slow, ~5 MB/s, logged with a warning) fallback when
the extension was not built. `TVIX_CDC=python` forces the reference implementation.

Algorithm (FastCDC with normalized chunking, level 2):
- gear hash: `h = (h << 1) + GEAR[byte]` (mod 2^64), `GEAR` from splitmix64 of a fixed
  seed; reset to 0 at the start of every chunk.
- the first `min_size` bytes of a chunk are skipped (never hashed, never a cut);
- while the chunk is at most `normal_size` bytes long, a cut follows the byte after
  which `h & mask_s == 0`; after that, `h & mask_l == 0`; a cut is forced at `max_size`.
  `mask_s` is the top `log2(normal)+2` bits, `mask_l` the top `log2(normal)-2` bits
  (the top bits depend on the last ≥ 46 bytes, the window of the rolling hash).
- The end of the stream ends the last chunk (it may be shorter than `min_size`).

Parameters (`DEFAULT`): min 64 KiB, normal ("average") 256 KiB, max 1 MiB. Why:
- remote reads (BENCH.md): a 1 MiB read at a random offset must move ≤ 2 MiB over the
  wire. It touches the chunks covering it: ≈ 1 MiB + one mean chunk on average, and at
  most 1 MiB + 2 × max in the worst case, so chunks much larger than 256 KiB hurt;
- per-chunk costs in Python (a file, a record entry, a gRPC message, a cache entry) argue
  against small chunks: ~2,000 chunks per 512 MiB keep those costs negligible;
- with these masks the measured mean chunk is ≈ 300 KiB and sizes stay within
  [64 KiB, 1 MiB] by construction.

Measured (2-core VM shared with other jobs, 512 MiB of random data fed in 1 MiB pieces):
- C scan: ≈ 2.35 GB/s (3 runs: 2356, 2371, 2373 MiB/s; GIL released); Python reference ≈ 7 MB/s.
- 1,797 chunks, mean 292 KiB, smallest (not last) 66 KiB, none cut at max_size.
- A put of 512 MiB into the local store spends ≈ 0.21 s in this scan, 0.07 s in the blob's
  BLAKE3, 0.12 s in the chunks' BLAKE3; the rest is the kernel creating ~1,800 files (see
  tvix_store/local.py for the comparison with `nix-store --add`).
- With 128 KiB / 512 KiB / 2 MiB a put was ≈ 25 % faster (half the files), but the mean
  chunk would push a remote 1 MiB random read towards the 2 MiB bound: not taken.

Streaming: `Chunker.feed(data)` takes the stream in pieces of any size and returns the
offsets in that piece where a chunk ends; the caller keeps at most one unfinished chunk
(≤ max_size bytes), so memory is bounded for any stream length. Cut points do not
depend on how the stream was split into pieces.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

_M64 = (1 << 64) - 1


def _gear_table() -> tuple[int, ...]:
    """splitmix64 from the seed "tvixstor" (same as `_cdc.c`)."""
    state = 0x7476697873746F72
    out = []
    for _ in range(256):
        state = (state + 0x9E3779B97F4A7C15) & _M64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
        out.append(z ^ (z >> 31))
    return tuple(out)


GEAR = _gear_table()


def _top_bits(n: int) -> int:
    return ((1 << n) - 1) << (64 - n)


@dataclass(frozen=True)
class ChunkParams:
    """Chunk size bounds; `normal_size` must be a power of two (it sets the mask widths)."""

    min_size: int
    normal_size: int
    max_size: int
    mask_s: int = field(init=False)
    mask_l: int = field(init=False)

    def __post_init__(self) -> None:
        if not 1 <= self.min_size <= self.normal_size <= self.max_size:
            raise ValueError(f"need 1 <= min <= normal <= max, got {self.min_size}/{self.normal_size}/{self.max_size}")
        bits = self.normal_size.bit_length() - 1
        if self.normal_size != 1 << bits or bits < 4:
            raise ValueError(f"normal_size must be a power of two >= 16, got {self.normal_size}")
        object.__setattr__(self, "mask_s", _top_bits(bits + 2))
        object.__setattr__(self, "mask_l", _top_bits(bits - 2))

    def args(self) -> tuple[int, int, int, int, int]:
        return self.min_size, self.normal_size, self.max_size, self.mask_s, self.mask_l


DEFAULT = ChunkParams(64 * 1024, 256 * 1024, 1024 * 1024)

ScanResult = tuple[list[int], int, int]
ScanFn = Callable[[bytes | bytearray | memoryview, int, int, int, int, int, int, int], ScanResult]


def _py_scan(
    data: bytes | bytearray | memoryview,
    pos: int,
    h: int,
    min_size: int,
    normal_size: int,
    max_size: int,
    mask_s: int,
    mask_l: int,
) -> ScanResult:
    """Reference implementation of `_cdc.scan` (same arguments, same results)."""
    mv = memoryview(data).cast("B")
    n = len(mv)
    cuts: list[int] = []
    gear = GEAR
    i = 0
    while i < n:
        if pos < min_size:
            skip = min(min_size - pos, n - i)
            i += skip
            pos += skip
            continue
        if pos >= max_size:  # only when min_size == max_size: the skip reached max
            cuts.append(i)
            pos = 0
            continue
        h = ((h << 1) + gear[mv[i]]) & _M64
        i += 1
        pos += 1
        if (h & (mask_s if pos <= normal_size else mask_l)) == 0 or pos >= max_size:
            cuts.append(i)
            pos = 0
            h = 0
    return cuts, pos, h


def _load_c_scan() -> ScanFn | None:
    if os.environ.get("TVIX_CDC") == "python":
        return None
    try:
        from tvix_store.chunking import _cdc
    except ImportError as e:
        log.warning("C chunker tvix_store.chunking._cdc is not built (%s): using the slow pure-Python chunker", e)
        return None
    return _cdc.scan


c_scan: ScanFn | None = _load_c_scan()
"""The C implementation, or None when the extension is missing (or TVIX_CDC=python)."""


class Chunker:
    """Streaming cut-point finder: feed the stream in pieces, get the chunk ends of each piece."""

    __slots__ = ("params", "_scan", "_pos", "_hash", "_args")

    def __init__(self, params: ChunkParams = DEFAULT, scan: ScanFn | None = None) -> None:
        self.params = params
        self._scan: ScanFn = scan or c_scan or _py_scan
        self._args = params.args()
        self._pos = 0
        self._hash = 0

    @property
    def pending(self) -> int:
        """Bytes of the current, unfinished chunk."""
        return self._pos

    def feed(self, data: bytes | bytearray | memoryview) -> list[int]:
        """Offsets in `data` where a chunk ends (exclusive, ascending)."""
        cuts, self._pos, self._hash = self._scan(data, self._pos, self._hash, *self._args)
        return cuts

    def reset(self) -> None:
        self._pos = 0
        self._hash = 0


def chunk_lengths(
    data: bytes | bytearray | memoryview, params: ChunkParams = DEFAULT, scan: ScanFn | None = None
) -> list[int]:
    """Lengths of the chunks of a whole buffer (the last one ends the buffer)."""
    c = Chunker(params, scan)
    out: list[int] = []
    prev = 0
    for cut in c.feed(data):
        out.append(cut - prev)
        prev = cut
    if prev < len(data):
        out.append(len(data) - prev)
    return out


def iter_chunks(data: bytes | bytearray | memoryview, params: ChunkParams = DEFAULT) -> Iterator[memoryview]:
    """The chunks of a whole buffer, as memoryviews into it."""
    mv = memoryview(data).cast("B")
    off = 0
    for n in chunk_lengths(mv, params):
        yield mv[off : off + n]
        off += n
