"""The one read-ahead policy: which chunks of a blob to fetch ahead of a reader.

Used by every sequential consumer of blob data: the mount's file reads (`tvix_fuse.readpath`),
blob readers (`BlobService.open_read`: `blob cat`, the gRPC server's Read) and NAR rendering
(`tvix_store.nar`, the nar-bridge). What "fetching ahead" does is the backend's business
(`BlobService.prefetch`: a remote cache starts background fetches; a local store ignores it);
this module only decides *what*, and does no I/O.

Policy (per reader, over one blob's chunk list):
- A read of `[off, end)` continues a run when `off` is where the previous read ended; any other
  offset is a seek and starts a new run (window back to `initial`, nothing re-hinted).
- A run is *sequential* once it started at offset 0 or has covered `sequential_min` bytes
  (2 MiB): one large read at a random offset, which the kernel splits into several
  consecutive requests, must fetch nothing beyond its own range.
- While sequential, the chunks after the last one read are fetched ahead, up to `window`
  bytes past the read; the window starts at `initial` (1 MiB) and doubles with every read
  of the run up to `maximum` (8 MiB). Each chunk is handed out once per run.
- Stop rule: a seek, or the end of the blob. The policy never asks for more than `maximum`
  bytes beyond what the reader has asked for.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from tvix_store.core.chunks import ChunkMeta, chunk_offsets

INITIAL_WINDOW = 1 << 20
MAX_WINDOW = 8 << 20
SEQUENTIAL_MIN_BYTES = 2 << 20


@dataclass(frozen=True, slots=True)
class Ahead:
    """The answer for one read: chunk indices `[start, stop)` to fetch ahead (maybe empty), and
    whether the reader is in a sequential run (`sequential`)."""

    start: int
    stop: int
    sequential: bool

    def __bool__(self) -> bool:
        return self.stop > self.start


class ReadAhead:
    """The read-ahead state of one reader of one blob (see the module docstring). Not thread-safe:
    one reader, one thread (or the trio loop)."""

    __slots__ = (
        "chunks",
        "offsets",
        "size",
        "initial",
        "maximum",
        "sequential_min",
        "_next",
        "_run",
        "_window",
        "_hinted",
    )

    def __init__(
        self,
        chunks: list[ChunkMeta],
        *,
        offsets: list[int] | None = None,
        initial: int = INITIAL_WINDOW,
        maximum: int = MAX_WINDOW,
        sequential_min: int = SEQUENTIAL_MIN_BYTES,
    ) -> None:
        self.chunks = chunks
        if offsets is None:
            offsets, self.size = chunk_offsets(chunks)
        else:
            self.size = offsets[-1] + chunks[-1].size if chunks else 0
        self.offsets = offsets
        self.initial = initial
        self.maximum = max(maximum, initial)
        self.sequential_min = sequential_min
        self._next = 0  # where the previous read ended
        self._run = 0  # where the current run began
        self._window = initial
        self._hinted = -1  # highest chunk index handed out in this run

    def index(self, pos: int) -> int:
        """The index of the chunk holding byte `pos`."""
        return bisect.bisect_right(self.offsets, pos) - 1

    def after(self, off: int, end: int) -> Ahead:
        """Record a read of `[off, end)`; the chunks to fetch ahead of it."""
        if end <= off or not self.chunks:
            return Ahead(0, 0, False)
        last = self.index(end - 1)
        if off != self._next:  # a seek: a new run
            self._run = off
            self._window = self.initial
            self._hinted = last
        elif self._hinted >= last:  # the run goes on and the window was used: grow it
            self._window = min(self._window * 2, self.maximum)
        self._next = end
        if self._run != 0 and end - self._run < self.sequential_min:
            self._hinted = max(self._hinted, last)
            return Ahead(0, 0, False)
        stop = last + 1
        ahead = 0
        while stop < len(self.chunks) and ahead < self._window:
            ahead += self.chunks[stop].size
            stop += 1
        start = max(last + 1, self._hinted + 1)
        if start >= stop:
            return Ahead(stop, stop, True)
        self._hinted = stop - 1
        return Ahead(start, stop, True)
