"""Reading a NAR (Nix ARchive) into a store: the reverse of `tvix_store.nar`.

`read_nar(store, source)` parses a NAR byte stream (a binary file-like object, an iterable
of byte pieces, or a bytes object), puts its file contents into the store's BlobService and
its directories into the DirectoryService, and returns the root node together with the
NAR's size and sha256, computed over exactly the bytes read. The stream is read
incrementally: memory stays bounded by the largest directory and the nesting depth (file
contents go to blob writers in pieces of at most 1 MiB; small files are held until a
batch of `SETTLE_BYTES` is settled; `FLUSH_ENTRIES` bounds the Directories held), so a
10 GiB NAR needs no more memory than a small one (measured on the 2-core VM: a 10 GiB NAR
from a generator into a local store in ≈ 37 s at 36 MiB peak RSS; `tests/test_nar_reader.py`
checks a 900 MiB one). Directories are parsed with an explicit
stack (no recursion limit on depth).

Strict: accepted is exactly what `nix-store --dump` writes, i.e. PROTOCOL.md's grammar
    "nix-archive-1" node
    node  = "(" "type" ( "regular" ["executable" ""] "contents" DATA
                       | "symlink" "target" TARGET
                       | "directory" entry* ) ")"
    entry = "entry" "(" "name" NAME "node" node ")"
with every string a little-endian u64 length, the bytes and zero padding to 8. Rejected
with `ValidationError`, naming what is wrong and the byte offset: another magic or token,
non-zero padding, entries not strictly ascending bytewise by name (duplicates included),
names that are not valid castore names (empty, `.`, `..`, `/` or NUL, over 255 bytes; any
other bytes, UTF-8 or not, are names), symlink targets that are not valid (empty, NUL, over
4095 bytes),
anything after the root node, and a stream that ends early. No length prefix makes it
allocate more than the limit of what it announces (tokens 64 bytes, names 255, targets 4095,
file contents stream). Sizes are uint64 (`tvix.castore.v1`, `snix.castore.v1`): files and
NARs of 4 GiB and more are read like any other, streamed.

Nothing half-written: this module stores no PathInfo at all (its caller does, after it
returned). Blobs are written as they are read (harmless: content-addressed, unreferenced
until a Directory or PathInfo references them). Directories are put only as complete,
valid subgraphs, leaves first, each after the blobs it references: all of them at the
end, in one `put_graph`; a NAR with more than `FLUSH_ENTRIES` directory entries also puts,
every time that many more are held, each complete subtree closed so far that has at least
`MIN_SUBGRAPH` entries (one `put_graph` each; smaller ones stay held). So a NAR rejected
midway stores no Directory unless it is that big, and never a Directory whose children are
missing; the root Directory only once the whole NAR was read.

Not a NAR renderer (`tvix_store.nar`), no PathInfo, no store path computation, no
decompression (pass a decompressing stream), no references scanning. Big files (over
`SMALL_FILE`) are written without asking the store first (a stream cannot be read twice);
small ones are settled in batches that upload only what the store lacks (`Uploader`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from tvix_store import nar
from tvix_store.core.castore import (
    MAX_NAME_LEN,
    MAX_TARGET_LEN,
    Directory,
    DirectoryNode,
    FileNode,
    Node,
    SymlinkNode,
    validate_name,
    validate_target,
)
from tvix_store.core.digest import B3Digest
from tvix_store.core.errors import IntegrityError, ValidationError
from tvix_store.importer import WORKERS
from tvix_store.importer.upload import Pending, Uploader
from tvix_store.importer.walk import SMALL_FILE
from tvix_store.store import Store

__all__ = ["FLUSH_ENTRIES", "SETTLE_BYTES", "NarResult", "read_nar"]

#: Bytes asked of a file-like source per read (file contents: up to PIECE at once).
READ_SIZE = 1 << 16
#: File contents go to a blob writer in pieces of at most this many bytes.
PIECE = 1 << 20
#: Small files held in memory before they are settled (uploaded if the store lacks them).
SETTLE_BYTES = 16 << 20
#: Directory entries held in parsed Directories before complete subgraphs are put.
FLUSH_ENTRIES = 1 << 16
#: Complete subtrees of fewer entries are not put early (one `put_graph` each is not worth it).
MIN_SUBGRAPH = 64
#: The longest token string read to show it in an error (every keyword is shorter).
MAX_TOKEN = 64


class _Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes | None: ...


Source = _Readable | Iterable[bytes | bytearray | memoryview] | bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class NarResult:
    """What `read_nar` ingested: the root node (named as asked), the NAR's size and sha256."""

    node: Node
    nar_size: int
    nar_sha256: bytes


def _show(b: bytes) -> str:
    return b.decode("utf-8", "backslashreplace")


class _Truncated(ValidationError):
    """The stream ended early (`_Reader.read` adds where in the tree)."""


class _Input:
    """The NAR stream: exact reads with the absolute offset, sha256 and size of all pulled."""

    def __init__(self, source: Source) -> None:
        self._next: Callable[[int], bytes | bytearray | memoryview | None]
        if isinstance(source, bytes | bytearray | memoryview):
            whole: list[bytes] = [bytes(source)]
            self._next = lambda _n: whole.pop() if whole else None
        elif hasattr(source, "read"):
            read = source.read  # type: ignore[union-attr]
            self._next = lambda n: read(n) or None
        else:
            it = iter(source)  # type: ignore[arg-type]
            self._next = lambda _n: next(it, None)
        self._buf = b""
        self._pos = 0
        self._ended = False
        self.offset = 0  # absolute offset of the next byte the parser gets
        self.sha = hashlib.sha256()
        self.size = 0  # bytes pulled from the source

    def _pull(self, want: int) -> bytes | None:
        """The next non-empty piece of the source (hashed and counted), or None at its end."""
        while not self._ended:
            piece = self._next(max(want, READ_SIZE))
            if piece is None:
                self._ended = True
                break
            if not isinstance(piece, bytes):
                piece = bytes(piece)
            if piece:
                self.sha.update(piece)
                self.size += len(piece)
                return piece
        return None

    def _fill(self, n: int) -> bool:
        """Make at least `n` bytes available; False if the source ends first."""
        avail = len(self._buf) - self._pos
        if avail >= n:
            return True
        parts = [self._buf[self._pos :]]  # joined once: tiny pieces must not make this quadratic
        ok = True
        while avail < n:
            piece = self._pull(n - avail)
            if piece is None:
                ok = False
                break
            parts.append(piece)
            avail += len(piece)
        self._buf = b"".join(parts)
        self._pos = 0
        return ok

    def truncated(self, what: str, start: int) -> _Truncated:
        return _Truncated(f"truncated NAR: it ends at byte {self.size}, inside {what} (which starts at byte {start})")

    def take(self, n: int, what: str, start: int) -> bytes:
        """Exactly `n` bytes (`n` is bounded by the caller)."""
        if not self._fill(n):
            raise self.truncated(what, start)
        out = self._buf[self._pos : self._pos + n]
        self._pos += n
        self.offset += n
        return out

    def startswith(self, expected: bytes) -> bool:
        """Whether the next bytes are `expected` (nothing consumed)."""
        return self._fill(len(expected)) and self._buf.startswith(expected, self._pos)

    def skip(self, n: int) -> None:
        """Consume `n` bytes known to be available (after `startswith`)."""
        self._pos += n
        self.offset += n

    def stream(self, n: int, what: str, start: int) -> Iterator[bytes | memoryview]:
        """The next `n` bytes in pieces of at most PIECE bytes (never all of them at once)."""
        left = n
        while left:
            avail = len(self._buf) - self._pos
            if not avail:
                piece = self._pull(min(left, PIECE))
                if piece is None:
                    raise self.truncated(what, start)
                self._buf, self._pos, avail = piece, 0, len(piece)
            k = min(avail, left, PIECE)
            view = memoryview(self._buf)[self._pos : self._pos + k]
            self._pos += k
            self.offset += k
            left -= k
            yield view
        if self._pos == len(self._buf):
            self._buf, self._pos = b"", 0

    def at_end(self) -> bool:
        return len(self._buf) == self._pos and self._pull(1) is None


@dataclass
class _Frame:
    """An open directory: its name, the last entry name seen, the nodes parsed so far."""

    name: bytes
    last: bytes | None = None
    nodes: list[Node] = field(default_factory=list)


def _token(word: bytes) -> bytes:
    return len(word).to_bytes(8, "little") + word + b"\0" * (-len(word) % 8)


_ENCODED = {
    w: _token(w)
    for w in (
        b"(",
        b")",
        b"type",
        b"regular",
        b"executable",
        b"contents",
        b"symlink",
        b"target",
        b"directory",
        b"entry",
        b"name",
        b"node",
    )
}
assert _token(b"nix-archive-1") == nar.MAGIC


class _Reader:
    """One NAR being read into a store (see the module docstring)."""

    def __init__(self, store: Store, source: Source, workers: int, flush_entries: int) -> None:
        self.store = store
        self.inp = _Input(source)
        self.uploader = Uploader(store, None, workers)
        self.flush_entries = flush_entries
        self.stack: list[_Frame] = []
        self.small: dict[B3Digest, Pending] = {}  # small blobs not yet settled
        self.small_bytes = 0
        self.dirs: dict[B3Digest, Directory] = {}  # complete Directories not yet put, leaves first
        self.dir_entries = 0  # their entries (each Directory counts one more)
        self.next_flush = flush_entries
        self.min_subgraph = min(MIN_SUBGRAPH, flush_entries)

    # --- errors and tokens ---

    def where(self) -> str:
        """The innermost open directory as a path inside the NAR (`/` is the root), for messages."""
        if not self.stack:
            return ""
        return ", in /" + _show(b"/".join(f.name for f in self.stack[1:]))

    def error(self, at: int, msg: str) -> ValidationError:
        return ValidationError(f"malformed NAR at byte {at}{self.where()}: {msg}")

    def u64(self, what: str) -> int:
        start = self.inp.offset
        return int.from_bytes(self.inp.take(8, what, start), "little")

    def padding(self, n: int, what: str, start: int) -> None:
        pad = -n % 8
        if pad:
            at = self.inp.offset
            if self.inp.take(pad, what, start) != bytes(pad):
                raise self.error(at, f"non-zero padding after {what} (which starts at byte {start})")

    def string(self, limit: int, what: str) -> bytes:
        """A length-prefixed string of at most `limit` bytes, with its padding."""
        start = self.inp.offset
        n = self.u64(what)
        if n > limit:
            raise self.error(start, f"{what} of {n} bytes is longer than the limit of {limit}")
        data = self.inp.take(n, what, start)
        self.padding(n, what, start)
        return data

    def keyword(self, *expected: bytes) -> bytes:
        """One of the `expected` tokens (the first one fast, the others parsed)."""
        inp = self.inp
        if inp.startswith(_ENCODED[expected[0]]):
            inp.skip(len(_ENCODED[expected[0]]))
            return expected[0]
        start = inp.offset
        alternatives = " or ".join(repr(_show(e)) for e in expected)
        what = f"a token ({alternatives})"
        n = self.u64(what)
        if n > MAX_TOKEN:
            raise self.error(start, f"expected {alternatives}, found a string of {n} bytes")
        word = inp.take(n, what, start)
        self.padding(n, what, start)
        if word not in expected:
            raise self.error(start, f"expected {alternatives}, found {_show(word)!r}")
        return word

    # --- the grammar ---

    def read(self, name: bytes) -> NarResult:
        inp = self.inp
        try:
            if not inp.startswith(nar.MAGIC):
                self.magic()
            inp.skip(len(nar.MAGIC))
            root = self.node(name)
            while root is None:  # a directory is open: its next entry, or its end
                root = self.directory_step()
        except _Truncated as e:
            raise ValidationError(f"{e}{self.where()}") from None
        if not inp.at_end():
            raise self.error(inp.offset, "trailing bytes after the root node")
        self.settle_blobs()
        if isinstance(root, DirectoryNode):
            self.put_root(root.digest)
        return NarResult(root, inp.size, inp.sha.digest())

    def magic(self) -> None:
        """Explain why the stream does not start with the NAR magic (always raises)."""
        what = "the magic 'nix-archive-1'"
        n = self.u64(what)
        if n != len(b"nix-archive-1"):
            raise self.error(0, f"not a NAR: expected {what}, found a string of {n} bytes")
        word = self.inp.take(n, what, 0)
        if word != b"nix-archive-1":
            raise self.error(0, f"not a NAR: expected {what}, found {_show(word)!r}")
        self.padding(n, what, 0)
        raise AssertionError("unreachable: the magic was valid")  # pragma: no cover

    def node(self, name: bytes) -> Node | None:
        """A node after its `node` token (or the magic): a leaf, or None with its directory opened."""
        self.keyword(b"(")
        self.keyword(b"type")
        kind = self.keyword(b"regular", b"directory", b"symlink")
        if kind == b"regular":
            return self.regular(name)
        if kind == b"symlink":
            self.keyword(b"target")
            at = self.inp.offset
            target = self.string(MAX_TARGET_LEN, f"the target of symlink {_show(name)!r}")
            try:
                validate_target(target, name)
            except ValidationError as e:
                raise self.error(at, str(e)) from None
            self.keyword(b")")
            return SymlinkNode(name, target)
        self.stack.append(_Frame(name))
        return None

    def regular(self, name: bytes) -> FileNode:
        executable = self.keyword(b"contents", b"executable") == b"executable"
        if executable:
            at = self.inp.offset
            if self.string(MAX_TOKEN, "the value of 'executable'"):
                raise self.error(at, f"file {_show(name)!r}: 'executable' must be followed by an empty string")
            self.keyword(b"contents")
        start = self.inp.offset
        what = "the contents of a file"
        size = self.u64(what)
        if size <= SMALL_FILE:
            data = self.inp.take(size, what, start)
            digest = B3Digest.of(data)
            if digest not in self.small:
                self.small[digest] = Pending(digest, name, size, data)
                self.small_bytes += size
                if self.small_bytes >= SETTLE_BYTES:
                    self.settle_blobs()
        else:
            with self.store.blobs.open_write() as w:
                for piece in self.inp.stream(size, what, start):
                    w.write(piece)
            digest = w.close()
        self.padding(size, what, start)
        self.keyword(b")")
        return FileNode(name, digest, size, executable)

    def directory_step(self) -> DirectoryNode | None:
        """One entry of the innermost open directory, or its end; the root node once the root
        directory ends, else None."""
        frame = self.stack[-1]
        if self.keyword(b"entry", b")") == b")":
            d = Directory.from_nodes(frame.nodes)
            dnode = d.as_node(frame.name)
            self.stack.pop()
            self.add_dir(d)
            if not self.stack:
                return dnode
            self.stack[-1].nodes.append(dnode)
            self.keyword(b")")  # the end of this directory's entry in its parent
            return None
        self.keyword(b"(")
        self.keyword(b"name")
        at = self.inp.offset
        name = self.string(MAX_NAME_LEN, "an entry name")
        try:
            validate_name(name, "entry name")
        except ValidationError as e:
            raise self.error(at, str(e)) from None
        if frame.last is not None and name <= frame.last:
            problem = "duplicate entry" if name == frame.last else "entries not in ascending bytewise order:"
            raise self.error(at, f"{problem} {_show(name)!r} after {_show(frame.last)!r}")
        frame.last = name
        self.keyword(b"node")
        child = self.node(name)
        if child is not None:
            frame.nodes.append(child)
            self.keyword(b")")
        return None

    # --- into the store ---

    def settle_blobs(self) -> None:
        if self.small:
            self.uploader.settle_small(self.small.values())
            self.small.clear()
            self.small_bytes = 0

    def add_dir(self, d: Directory) -> None:
        if d.digest in self.dirs:
            return
        self.dirs[d.digest] = d
        self.dir_entries += _entries(d)
        if self.dir_entries >= self.next_flush and self.stack:
            self.flush_dirs()
            self.next_flush = self.dir_entries + self.flush_entries

    def flush_dirs(self) -> None:
        """Put the complete subtrees held (one `put_graph` each, leaves first) that have at least
        `min_subgraph` entries, after the blobs they reference; smaller ones stay held (each is
        an entry of an open directory, so they cost memory in proportion to those)."""
        self.settle_blobs()
        held = self.dirs
        referenced = {c.digest for d in held.values() for c in d.directories}
        done: set[B3Digest] = set()
        for top in [dg for dg in held if dg not in referenced]:
            graph = _closure(top, held, done)
            if sum(_entries(d) for d in graph) >= self.min_subgraph:
                self.put_graph(graph)
                done.update(d.digest for d in graph)
        self.dirs = {dg: d for dg, d in held.items() if dg not in done}
        self.dir_entries = sum(_entries(d) for d in self.dirs.values())

    def put_root(self, root: B3Digest) -> None:
        """Put what is held, the NAR's root last (every Directory held is below it), unless the
        store has the root (and so, as a Directory is stored after its children, all of it)."""
        self.settle_blobs()
        held, self.dirs, self.dir_entries = self.dirs, {}, 0
        if not self.store.directories.has(root):
            self.put_graph(list(held.values()))  # in closing order: leaves first, the root last

    def put_graph(self, graph: list[Directory]) -> None:
        got = self.store.directories.put_graph(graph)
        if got != graph[-1].digest:
            raise IntegrityError(f"store returned root directory {got.hex()}, expected {graph[-1].digest.hex()}")


def _entries(d: Directory) -> int:
    return 1 + len(d.directories) + len(d.files) + len(d.symlinks)


def _closure(top: B3Digest, held: dict[B3Digest, Directory], done: set[B3Digest]) -> list[Directory]:
    """The Directories of `held` reachable from `top` and not in `done`, leaves first (post-order,
    iterative, each once). Children outside `held` or in `done` are stored already."""
    out: list[Directory] = []
    seen = {top}
    stack: list[tuple[Directory, Iterator[DirectoryNode]]] = [(held[top], iter(held[top].directories))]
    while stack:
        d, children = stack[-1]
        for c in children:
            if c.digest in held and c.digest not in done and c.digest not in seen:
                seen.add(c.digest)
                child = held[c.digest]
                stack.append((child, iter(child.directories)))
                break
        else:
            stack.pop()
            out.append(d)
    return out


def read_nar(
    store: Store,
    source: Source,
    *,
    name: bytes = b"",
    workers: int | None = None,
    flush_entries: int = FLUSH_ENTRIES,
) -> NarResult:
    """Read the NAR from `source` into `store`; return its root node (named `name`), size and sha256.

    `source`: a binary file-like object (read in pieces), an iterable of byte pieces, or bytes.
    Raises ValidationError (naming the problem and the byte offset) for anything
    `nix-store --dump` would not write or castore cannot hold; StoreError for store failures;
    whatever the source raises. Stores no PathInfo (see the module docstring for what a
    rejected NAR may leave). `workers`: threads settling small blobs (default: `WORKERS` for
    a remote blob service, else 0). `flush_entries`: Directory entries held before complete
    subgraphs are put early.
    """
    if workers is None:
        workers = WORKERS if store.blobs.capabilities.is_remote else 0
    return _Reader(store, source, workers, max(1, flush_entries)).read(name)
