"""The one read-ahead policy: what to fetch ahead of a reader — the chunks of one blob
(`ReadAhead`), and the small files of a tree read in walk order (`WalkAhead`).

Used by every consumer of blob data: the mount's file reads (`tvix_fuse.readpath`), blob
readers (`BlobService.open_read`: `blob cat`, the gRPC server's Read) and NAR rendering
(`tvix_store.nar`, the nar-bridge). What "fetching ahead" does is the backend's business
(`BlobService.prefetch`: a remote cache starts background fetches, many in flight; a local
store ignores it); this module only decides *what*, and does no I/O of its own.

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

Policy for trees (`WalkAhead`, one per mount): `find | xargs cat`, `tar`, `cp -r`, `rsync` and
`diff -r` read a tree's files one after the other in walk order (depth first, each
directory's entries by name, a subdirectory's files at its place). When a small file (≤
`small`) is read, the small files that follow it in that order are fetched ahead, up to
`budget` bytes (4 MiB) and `max_files` (1024) past the reader, refilled once half of it is
consumed. A read of a file that is not among those (the reader went elsewhere) starts over
from there. Listing or stat-ing a tree fetches no file data (`ls -lR` moves metadata only);
a single small-file read moves at most the budget.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from tvix_store.core.castore import DirectoryNode, FileNode, Node
from tvix_store.core.chunks import ChunkMeta, chunk_offsets
from tvix_store.core.digest import B3Digest

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


# --- trees: small files in walk order ------------------------------------------------------

WALK_BUDGET = 4 << 20
WALK_MAX_FILES = 1024
SMALL_FILE = 256 << 10

#: a position in a walk: (the containing Directory's digest, the entry's name)
Position = tuple[B3Digest, bytes]


def walk_files(
    stack: list[tuple[B3Digest, list[Node], int]], get: Callable[[B3Digest], list[Node] | None]
) -> Iterator[tuple[Position, FileNode]]:
    """Continue a depth-first walk in `find` order from `stack` (the path from the top, each
    level: a Directory's digest, its entries by name, the index of its next entry), yielding
    each file with its position. `get(digest)` gives a subdirectory's entries by name (None:
    unavailable, skipped)."""
    dirs = [(d, nodes) for d, nodes, _ in stack]
    nxt = [i for _, _, i in stack]  # the next entry's index, per level
    while dirs:
        d, nodes = dirs[-1]
        i = nxt[-1]
        if i >= len(nodes):
            dirs.pop()
            nxt.pop()
            continue
        nxt[-1] = i + 1
        n = nodes[i]
        if isinstance(n, FileNode):
            yield (d, n.name), n
        elif isinstance(n, DirectoryNode):
            sub = get(n.digest)
            if sub is not None:
                dirs.append((n.digest, sub))
                nxt.append(0)


class WalkAhead:
    """The walk-order read-ahead of one mount (see the module docstring). Not thread-safe: one
    caller at a time (the mount serialises it)."""

    def __init__(self, budget: int = WALK_BUDGET, max_files: int = WALK_MAX_FILES, small: int = SMALL_FILE) -> None:
        self.budget = budget
        self.max_files = max_files
        self.small = small
        self._walk: Iterator[tuple[Position, FileNode]] | None = None
        self._done = False  # the walk of this run reached its end
        self._ahead: deque[tuple[Position, int]] = deque()  # hinted, not yet read: (position, size)
        self._hinted: set[Position] = set()  # the positions in `_ahead`
        self._bytes = 0

    def at(self, pos: Position) -> bool:
        """The reader reads the file at `pos`: record it; True if `refill` should run now (cheap,
        no I/O: call it where blocking is not allowed)."""
        if pos in self._hinted:  # on the predicted path: what was hinted before it is consumed
            while self._ahead:
                p, size = self._ahead.popleft()
                self._hinted.discard(p)
                self._bytes -= size
                if p == pos:
                    break
            return not self._done and self._bytes <= self.budget // 2 and len(self._ahead) <= self.max_files // 2
        self._walk = None  # somewhere else: start over from here
        self._done = False
        self._ahead.clear()
        self._hinted.clear()
        self._bytes = 0
        return True

    def refill(self, walk: Callable[[], Iterator[tuple[Position, FileNode]]]) -> list[FileNode]:
        """The files to fetch ahead now; `walk()` starts the walk right after the reader's
        position when a new run starts (it may block: directories are fetched as it goes)."""
        if self._walk is None:
            self._walk = walk()
        out = []
        while self._bytes < self.budget and len(self._ahead) < self.max_files:
            nxt = next(self._walk, None)
            if nxt is None:
                self._done = True
                break
            p, node = nxt
            if not 0 < node.size <= self.small or p in self._hinted:
                continue
            self._ahead.append((p, node.size))
            self._hinted.add(p)
            self._bytes += node.size
            out.append(node)
        return out

    def after(self, pos: Position, walk: Callable[[], Iterator[tuple[Position, FileNode]]]) -> list[FileNode]:
        """`at` and, when due, `refill`: the files to fetch ahead after a read at `pos`."""
        return self.refill(walk) if self.at(pos) else []
