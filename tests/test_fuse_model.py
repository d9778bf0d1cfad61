"""The FUSE filesystem model (tvix_fuse.model) and its adapter, without a mount.

Real memory:// stores; a chunking blob service (below) where chunk boundaries matter, and
a slow/corrupting one for single-flight and error paths (fault injection).
"""

from __future__ import annotations

import errno
import os
import random
import stat
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pyfuse3
import pytest
import trio
from fixtures import HELLO, HELLO_HEX

from tvix_fuse.errors import NoAttribute, NoEntry, ReadOnly, errno_for
from tvix_fuse.model import BLOBS_INO, DIRECTORIES_INO, ROOT_INO, STORE_INO, FsModel
from tvix_fuse.ops import Operations
from tvix_fuse.views import LONG_TTL, SHORT_NEGATIVE_TTL
from tvix_store.blobservice import BlobService, BlobWriter
from tvix_store.blobservice.memory import MemoryBlobService
from tvix_store.compose import open_store
from tvix_store.core.castore import Directory, FileNode, SymlinkNode
from tvix_store.core.chunks import ChunkMeta
from tvix_store.core.digest import B3Digest
from tvix_store.core.errors import IntegrityError, NotFoundError
from tvix_store.core.pathinfo import PathInfo, StorePath
from tvix_store.store import Store


def run(fn: Callable[[], Awaitable[Any]]) -> Any:
    return trio.run(fn)


class ChunkingBlobs(BlobService):
    """A BlobService with real chunk lists: `add(data, sizes)` stores each chunk as a blob and
    the blob as their concatenation. Counts fetches; can be slow, or lie about a chunk."""

    def __init__(self, delay: float = 0.0) -> None:
        self.mem = MemoryBlobService()
        self.lists: dict[B3Digest, list[ChunkMeta]] = {}
        self.fetches: list[B3Digest] = []
        self.prefetched: list[B3Digest] = []
        self.advised: list[B3Digest] = []
        self.delay = delay
        self.corrupt: set[B3Digest] = set()
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()

    def add(self, data: bytes, sizes: list[int]) -> B3Digest:
        assert sum(sizes) == len(data)
        metas, off = [], 0
        for n in sizes:
            d = self.mem.put(data[off : off + n])
            metas.append(ChunkMeta(d, n))
            off += n
        digest = B3Digest.of(data)
        self.lists[digest] = metas
        return digest

    def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        return self.lists.get(digest) or self.mem.chunks(digest)

    def read_chunk(self, digest: B3Digest) -> bytes | None:
        with self._lock:
            self.fetches.append(digest)
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            if self.delay:
                time.sleep(self.delay)
            if digest in self.corrupt:
                raise IntegrityError(f"chunk {digest.hex()} does not match its digest")
            return self.mem.read_chunk(digest)
        finally:
            with self._lock:
                self.active -= 1

    def open_write(self) -> BlobWriter:
        return self.mem.open_write()

    def prefetch(self, digests: list[B3Digest]) -> None:
        self.prefetched += digests

    def advise(self, digests: list[B3Digest]) -> None:
        self.advised += digests

    def iter_digests(self):  # noqa: ANN201
        return iter([*self.lists, *self.mem.iter_digests()])


def chunking_store(delay: float = 0.0) -> tuple[Store, ChunkingBlobs]:
    base = open_store("memory://")
    blobs = ChunkingBlobs(delay)
    return Store(blobs, base.directories, base.pathinfos, "test://"), blobs


def store_path_info(node_kind: str, target: object, name: str = "x") -> PathInfo:
    sp = StorePath(bytes(range(20)), name)
    bn = sp.basename.encode()
    if node_kind == "dir":
        assert isinstance(target, Directory)
        node = target.as_node(bn)
    elif node_kind == "file":
        digest, size = target  # type: ignore[misc]
        node = FileNode(bn, digest, size)
    else:
        node = SymlinkNode(bn, target)  # type: ignore[arg-type]
    return PathInfo(node)


async def ls(m: FsModel, ino: int, take: Callable[[int], int] | None = None) -> list[tuple[bytes, int, int]]:
    """Read a whole directory like the kernel: batches of `take(i)` accepted entries, then
    one refused, resuming at the last accepted next_id. Returns (name, ino, mode)."""
    fh = await m.opendir(ino)
    out, pos, rounds = [], 0, 0
    while True:
        entries = await m.readdir(fh, pos)
        if not entries:
            break
        limit = take(rounds) if take else len(entries)
        rounds += 1
        for k, e in enumerate(entries):
            a = m.entry_attr(e)
            if k == limit:
                m.entry_refused(e, a.ino)
                break
            m.entry_taken(e, a.ino)
            out.append((e.name, a.ino, a.mode))
            pos = e.next_id
    m.releasedir(fh)
    return out


# --- look-up and attributes ------------------------------------------------------------


def test_root_layout_and_blob_lookup() -> None:
    s = open_store("memory://")
    d = s.blobs.put(HELLO)
    assert d.hex() == HELLO_HEX
    m = FsModel(s)

    async def main() -> None:
        names = [n for n, _, _ in await ls(m, ROOT_INO)]
        assert names == [b".", b"..", b"blobs", b"directories", b"store"]
        a = await m.lookup(ROOT_INO, b"blobs")
        assert a.ino == BLOBS_INO and stat.S_ISDIR(a.mode) and a.mode & 0o777 == 0o555
        f = await m.lookup(BLOBS_INO, HELLO_HEX.encode())
        assert stat.S_ISREG(f.mode) and f.mode & 0o777 == 0o444 and f.size == len(HELLO)
        assert (await m.getattr(f.ino)) == f
        fh = await m.open(f.ino, os.O_RDONLY)
        assert await m.read(fh, 0, 100) == HELLO
        assert await m.read(fh, 6, 3) == HELLO[6:9]
        assert await m.read(fh, len(HELLO), 10) == b""
        m.release(fh)
        listed = await ls(m, BLOBS_INO)
        assert (HELLO_HEX.encode(), f.ino, f.mode) in listed

    run(main)


@pytest.mark.parametrize(
    ("name", "ttl"),
    [
        (HELLO_HEX.upper().encode(), LONG_TTL),  # lowercase hex only
        (b"b3:" + b"x" * 10, LONG_TTL),
        (HELLO_HEX[:-2].encode(), LONG_TTL),
        (b"0" * 64, SHORT_NEGATIVE_TTL),  # well-formed, absent: may arrive later
    ],
)
def test_bad_or_absent_blob_names(name: bytes, ttl: float) -> None:
    s = open_store("memory://")
    s.blobs.put(HELLO)
    m = FsModel(s)

    async def main() -> None:
        for parent in (BLOBS_INO, DIRECTORIES_INO):
            with pytest.raises(NoEntry) as ei:
                await m.lookup(parent, name)
            assert ei.value.ttl == ttl
            assert errno_for(ei.value) == errno.ENOENT

    run(main)


def make_tree_store() -> tuple[Store, dict[str, Any]]:
    s = open_store("memory://")
    data = b"#!/bin/sh\necho hi\n"
    d = s.blobs.put(data)
    inner = Directory.from_nodes([FileNode(b"same", d, len(data))])
    s.directories.put(inner)
    root = Directory.from_nodes(
        [
            FileNode(b"plain", d, len(data)),
            FileNode(b"plain2", d, len(data)),
            FileNode(b"exe", d, len(data), executable=True),
            SymlinkNode(b"link", b"plain"),
            inner.as_node(b"sub1"),
            inner.as_node(b"sub2"),
        ]
    )
    s.directories.put(root)
    info = store_path_info("dir", root, "tree")
    s.pathinfos.put(info)
    return s, {"blob": d, "data": data, "root": root, "inner": inner, "basename": info.node.name}  # type: ignore[union-attr]


def test_store_lookup_modes_and_inode_sharing_rule() -> None:
    s, t = make_tree_store()
    m = FsModel(s)

    async def main() -> None:
        top = await m.lookup(STORE_INO, t["basename"])
        assert stat.S_ISDIR(top.mode)
        plain = await m.lookup(top.ino, b"plain")
        plain2 = await m.lookup(top.ino, b"plain2")
        exe = await m.lookup(top.ino, b"exe")
        link = await m.lookup(top.ino, b"link")
        blob = await m.lookup(BLOBS_INO, t["blob"].hex().encode())
        assert plain.mode == stat.S_IFREG | 0o444 and exe.mode == stat.S_IFREG | 0o555
        assert link.mode == stat.S_IFLNK | 0o777 and link.size == len(b"plain")
        assert await m.readlink(link.ino) == b"plain"
        # same content and attributes: one inode; executable differs: another
        assert plain.ino == plain2.ino == blob.ino
        assert exe.ino != plain.ino
        # directories are never shared
        sub1 = await m.lookup(top.ino, b"sub1")
        sub2 = await m.lookup(top.ino, b"sub2")
        assert sub1.ino != sub2.ino
        # stable across forget: the kernel drops everything, then looks up again
        before = {n: (await m.lookup(top.ino, n)).ino for n in (b"plain", b"exe", b"sub1", b"link")}
        m.forget([(ino, 10) for ino in list(m.inodes._by_ino) if ino > STORE_INO])
        assert len(m.inodes) == 4  # only the fixed inodes remain
        top2 = await m.lookup(STORE_INO, t["basename"])
        assert top2.ino == top.ino
        after = {n: (await m.lookup(top.ino, n)).ino for n in before}
        assert after == before
        with pytest.raises(NoEntry) as ei:
            await m.lookup(top.ino, b"nope")
        assert ei.value.ttl == LONG_TTL  # immutable tree: cache the absence
        # a store path name with the right hash but the wrong name
        wrong = StorePath.parse_basename(t["basename"]).basename.rsplit("-", 1)[0] + "-other"
        with pytest.raises(NoEntry):
            await m.lookup(STORE_INO, wrong.encode())
        with pytest.raises(NoEntry):
            await m.lookup(STORE_INO, b"not-a-store-path")

    run(main)


def test_store_root_layout() -> None:
    s, t = make_tree_store()
    m = FsModel(s, store_root=True)

    async def main() -> None:
        names = [n for n, _, _ in await ls(m, ROOT_INO)]
        assert names == [b".", b"..", t["basename"]]
        a = await m.lookup(ROOT_INO, t["basename"])
        assert stat.S_ISDIR(a.mode)
        with pytest.raises(NoEntry):
            await m.lookup(ROOT_INO, b"blobs")

    run(main)


def test_readdir_10k_entries_resumes_exactly() -> None:
    s = open_store("memory://")
    d = s.blobs.put(b"x")
    names = [f"f{i:05d}".encode() for i in range(10_000)]
    big = Directory.from_nodes([FileNode(n, d, 1, executable=(i % 3 == 0)) for i, n in enumerate(names)])
    s.directories.put(big)
    m = FsModel(s)
    rng = random.Random(1)

    async def main() -> None:
        a = await m.lookup(DIRECTORIES_INO, big.digest.hex().encode())
        listed = await ls(m, a.ino, take=lambda i: rng.randint(0, 40))
        got = [n for n, _, _ in listed]
        assert got[:2] == [b".", b".."]
        assert got[2:] == names  # every entry once, in order, none skipped
        modes = {n: mode for n, _, mode in listed[2:]}
        assert modes[b"f00000"] == stat.S_IFREG | 0o555 and modes[b"f00001"] == stat.S_IFREG | 0o444
        # readdirplus took one reference per entry: forgetting them empties the table again
        inos = {ino for _, ino, _ in listed[2:]}
        assert len(inos) == 2  # (digest, size, executable) → two distinct inodes
        counts = sum(m.inodes.get(i).lookups for i in inos)  # type: ignore[union-attr]
        assert counts == 10_000
        m.forget([(i, m.inodes.get(i).lookups) for i in inos])  # type: ignore[union-attr]
        assert all(m.inodes.get(i) is None for i in inos)

    run(main)


def test_directories_and_store_listings() -> None:
    s, t = make_tree_store()
    m = FsModel(s)

    async def main() -> None:
        dirs = sorted(n for n, _, _ in (await ls(m, DIRECTORIES_INO))[2:])
        assert dirs == sorted([t["root"].digest.hex().encode(), t["inner"].digest.hex().encode()])
        store = [n for n, _, _ in (await ls(m, STORE_INO))[2:]]
        assert store == [t["basename"]]
        blobs = [n for n, _, _ in (await ls(m, BLOBS_INO))[2:]]
        assert blobs == [t["blob"].hex().encode()]

    run(main)


# --- reads -------------------------------------------------------------------------------


def test_reads_at_chunk_boundaries_fetch_only_covering_chunks() -> None:
    s, blobs = chunking_store()
    rng = random.Random(7)
    sizes = [rng.randint(1, 5000) for _ in range(40)]
    data = rng.randbytes(sum(sizes))
    digest = blobs.add(data, sizes)
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    m = FsModel(s, cache_bytes=0)  # no LRU: count every fetch

    async def main() -> None:
        a = await m.lookup(BLOBS_INO, digest.hex().encode())
        assert a.size == len(data)
        fh = await m.open(a.ino, os.O_RDONLY)
        blobs.fetches.clear()
        assert await m.read(fh, 10**6, 1) == b""
        assert await m.read(fh, len(data) - 1, 100) == data[-1:]
        # one byte in the middle of a large blob: exactly one chunk fetched
        blobs.fetches.clear()
        assert await m.read(fh, bounds[20] + 1, 1) == data[bounds[20] + 1 : bounds[20] + 2]
        assert blobs.fetches == [blobs.lists[digest][20].digest]
        for b in bounds[1:-1]:
            for off, n in ((b - 1, 2), (b, 1), (b - 1, 1), (b, sizes[0] + 3000)):
                blobs.fetches.clear()
                got = await m.read(fh, off, n)
                assert got == data[off : off + n], (off, n)
                first = max(i for i in range(len(bounds) - 1) if bounds[i] <= off)
                last = max(i for i in range(len(bounds) - 1) if bounds[i] < min(off + n, len(data)))
                assert sorted(blobs.fetches) == sorted(c.digest for c in blobs.lists[digest][first : last + 1])
        for _ in range(200):
            off = rng.randrange(len(data))
            n = rng.randrange(1, 20000)
            assert await m.read(fh, off, n) == data[off : off + n]
        m.release(fh)

    run(main)


def test_chunk_lru_serves_consecutive_requests() -> None:
    s, blobs = chunking_store()
    data = random.Random(3).randbytes(100_000)
    digest = blobs.add(data, [60_000, 40_000])
    m = FsModel(s)

    async def main() -> None:
        a = await m.lookup(BLOBS_INO, digest.hex().encode())
        fh = await m.open(a.ino, os.O_RDONLY)
        out = b"".join([await m.read(fh, off, 4096) for off in range(0, len(data), 4096)])
        assert out == data
        assert len(blobs.fetches) == 2  # each chunk fetched once
        assert m.counters.get("chunk_cache_hits") > 0

    run(main)


def test_single_flight_and_limiter() -> None:
    s, blobs = chunking_store(delay=0.2)
    data = random.Random(5).randbytes(300_000)
    digest = blobs.add(data, [100_000] * 3)
    other = blobs.add(random.Random(6).randbytes(20 * 1000), [1000] * 20)
    m = FsModel(s, threads=4)

    async def main() -> None:
        a = await m.lookup(BLOBS_INO, digest.hex().encode())
        results: list[bytes] = []

        async def reader() -> None:
            fh = await m.open(a.ino, os.O_RDONLY)
            results.append(await m.read(fh, 150_000, 1000))

        async with trio.open_nursery() as n:
            for _ in range(16):
                n.start_soon(reader)
        assert results == [data[150_000:151_000]] * 16
        assert blobs.fetches == [blobs.lists[digest][1].digest]  # one fetch for 16 readers
        assert m.counters.get("single_flight_joins") == 15
        # 20 different chunks at once: never more than `threads` store calls in flight
        b = await m.lookup(BLOBS_INO, other.hex().encode())
        fh = await m.open(b.ino, os.O_RDONLY)
        blobs.delay = 0.05
        async with trio.open_nursery() as n:
            for i in range(20):
                n.start_soon(m.read, fh, i * 1000, 1000)
        assert blobs.max_active == 4

    run(main)


def test_sequential_reads_hint_prefetch_with_bounded_window() -> None:
    """A sequential reader hints each chunk ahead once, never more than the policy's window
    (doubling from INITIAL_WINDOW to MAX_WINDOW) past what it read; random access hints nothing."""
    from tvix_store.readahead import INITIAL_WINDOW, MAX_WINDOW

    s, blobs = chunking_store()
    chunk = 64 * 1024
    data = random.Random(9).randbytes(256 * chunk)  # 16 MiB
    digest = blobs.add(data, [chunk] * 256)
    index = {c.digest: i for i, c in enumerate(blobs.lists[digest])}
    m = FsModel(s)

    async def main() -> None:
        a = await m.lookup(BLOBS_INO, digest.hex().encode())
        fh = await m.open(a.ino, os.O_RDONLY)
        for off in range(0, 64 * chunk, chunk):
            await m.read(fh, off, chunk)
            ahead = blobs.prefetched
            assert len(ahead) == len(set(ahead))  # a chunk is hinted once
            furthest = max(index[d] for d in ahead)
            assert (furthest + 1) * chunk <= off + chunk + MAX_WINDOW  # bounded window
            if off == 0:
                assert (furthest + 1) * chunk <= chunk + INITIAL_WINDOW  # it starts small
        assert max(index[d] for d in blobs.prefetched) * chunk >= 64 * chunk + MAX_WINDOW // 2  # and grows
        # random access: no hints
        blobs.prefetched.clear()
        fh2 = await m.open(a.ino, os.O_RDONLY)
        for off in (50 * chunk, 3 * chunk, 200 * chunk, 10 * chunk):
            await m.read(fh2, off + 100, 100)
        assert blobs.prefetched == []

    run(main)


def test_one_large_read_at_a_random_offset_fetches_only_its_range() -> None:
    """The kernel splits one large read into sequential requests; that run must not start
    read-ahead or prefetch until it has covered SEQUENTIAL_MIN_BYTES (wire bytes ≤ 2× read)."""
    from tvix_store.readahead import SEQUENTIAL_MIN_BYTES

    s, blobs = chunking_store()
    size = 8 * SEQUENTIAL_MIN_BYTES
    data = random.Random(10).randbytes(size)
    digest = blobs.add(data, [64 * 1024] * (size // (64 * 1024)))
    m = FsModel(s)

    async def main() -> None:
        async with trio.open_nursery() as n:
            m.start_background(n)
            a = await m.lookup(BLOBS_INO, digest.hex().encode())
            fh = await m.open(a.ino, os.O_RDONLY)
            start = 3 * SEQUENTIAL_MIN_BYTES + 12345
            read = 1 << 20
            out = b""
            for off in range(start, start + read, 128 * 1024):  # 1 MiB as 8 kernel requests
                out += await m.read(fh, off, 128 * 1024)
            assert out == data[start : start + read]
            m.start_background(None)
        assert blobs.prefetched == []
        assert m.counters.get("readahead_chunks") == 0
        fetched = sum(blobs.mem.size(d) or 0 for d in set(blobs.fetches))
        assert fetched <= read + 2 * 64 * 1024

    run(main)


def test_small_files_are_read_whole_and_advised_when_their_directory_is_first_used() -> None:
    """A tree's small files: one read_chunk of the blob itself (no chunk-list Stat), and the
    directory's first use passes them (not the big ones) to BlobService.advise."""
    from tvix_fuse.readpath import WHOLE_READ_MAX

    s, blobs = chunking_store()
    small = random.Random(11).randbytes(5000)
    big = random.Random(12).randbytes(WHOLE_READ_MAX + 4096)
    small_d = blobs.mem.put(small)
    big_d = blobs.add(big, [WHOLE_READ_MAX, 4096])
    d = Directory.from_nodes([FileNode(b"small", small_d, len(small)), FileNode(b"big", big_d, len(big))])
    s.directories.put(d)
    s.pathinfos.put(store_path_info("dir", d))
    m = FsModel(s)
    stats: list[B3Digest] = []
    chunks = blobs.chunks
    blobs.chunks = lambda dg: stats.append(dg) or chunks(dg)  # type: ignore[method-assign]

    async def main() -> None:
        top = await m.lookup(STORE_INO, store_path_info("dir", d).node.name)  # type: ignore[union-attr]
        assert blobs.advised == []  # nothing before the directory is used
        a = await m.lookup(top.ino, b"small")
        assert blobs.advised == [small_d]
        fh = await m.open(a.ino, os.O_RDONLY)
        assert await m.read(fh, 100, 50) == small[100:150]
        assert blobs.fetches == [small_d] and stats == []
        b = await m.lookup(top.ino, b"big")
        fh = await m.open(b.ino, os.O_RDONLY)
        assert await m.read(fh, WHOLE_READ_MAX, 10) == big[WHOLE_READ_MAX : WHOLE_READ_MAX + 10]
        assert stats == [big_d]  # a big file's chunk list is asked for, and only its last chunk read
        assert blobs.fetches[1:] == [blobs.lists[big_d][1].digest]

    run(main)


# --- holes and errors ----------------------------------------------------------------------


def test_holes_stat_works_read_and_readdir_fail() -> None:
    s = open_store("memory://")
    missing_blob = B3Digest.of(b"never stored")
    missing_dir = Directory.from_nodes([FileNode(b"f", missing_blob, 12)])
    root = Directory.from_nodes([FileNode(b"file", missing_blob, 12), missing_dir.as_node(b"dir")])
    # the store lacks missing_dir: put the root without validation of its children
    s.directories._store(root)  # type: ignore[attr-defined]
    m = FsModel(s)

    async def main() -> None:
        top = await m.lookup(DIRECTORIES_INO, root.digest.hex().encode())
        f = await m.lookup(top.ino, b"file")
        assert f.size == 12 and stat.S_ISREG(f.mode)
        d = await m.lookup(top.ino, b"dir")
        assert stat.S_ISDIR(d.mode)
        fh = await m.open(f.ino, os.O_RDONLY)
        with pytest.raises(NotFoundError) as ei:
            await m.read(fh, 0, 10)
        assert errno_for(ei.value) == errno.EIO
        dh = await m.opendir(d.ino)
        with pytest.raises(NotFoundError):
            await m.readdir(dh, 0)
        with pytest.raises(NotFoundError):
            await m.lookup(d.ino, b"f")

    run(main)


def test_integrity_error_is_eio_never_bytes(caplog: pytest.LogCaptureFixture) -> None:
    s, blobs = chunking_store()
    data = random.Random(2).randbytes(3000)
    digest = blobs.add(data, [1000, 1000, 1000])
    bad = blobs.lists[digest][1].digest
    blobs.corrupt.add(bad)
    m = FsModel(s)

    async def main() -> None:
        a = await m.lookup(BLOBS_INO, digest.hex().encode())
        fh = await m.open(a.ino, os.O_RDONLY)
        assert await m.read(fh, 0, 1000) == data[:1000]
        with pytest.raises(IntegrityError) as ei:
            await m.read(fh, 500, 1000)
        assert errno_for(ei.value) == errno.EIO
        assert bad.hex() in caplog.text

    run(main)


def test_chunk_list_disagreeing_with_file_node_is_eio() -> None:
    s = open_store("memory://")
    d = s.blobs.put(b"12345")
    root = Directory.from_nodes([FileNode(b"liar", d, 3)])
    s.directories.put(root)
    m = FsModel(s)

    async def main() -> None:
        top = await m.lookup(DIRECTORIES_INO, root.digest.hex().encode())
        f = await m.lookup(top.ino, b"liar")
        fh = await m.open(f.ino, os.O_RDONLY)
        with pytest.raises(IntegrityError):
            await m.read(fh, 0, 3)

    run(main)


def test_xattrs_and_read_only() -> None:
    s, t = make_tree_store()
    s.counters.set("chunks_from_remote", 7)
    m = FsModel(s)

    async def main() -> None:
        top = await m.lookup(STORE_INO, t["basename"])
        plain = await m.lookup(top.ino, b"plain")
        want_blob = ("b3:" + __import__("base64").b64encode(B3Digest.of(t["data"])).decode()).encode()
        assert await m.getxattr(plain.ino, b"user.tvix.castore.blob.digest") == want_blob
        assert await m.listxattr(plain.ino) == [b"user.tvix.castore.blob.digest"]
        want_dir = ("b3:" + __import__("base64").b64encode(t["root"].digest).decode()).encode()
        assert await m.getxattr(top.ino, b"user.tvix.castore.directory.digest") == want_dir
        with pytest.raises(NoAttribute) as ei:
            await m.getxattr(plain.ino, b"user.other")
        assert errno_for(ei.value) == errno.ENODATA
        with pytest.raises(NoAttribute):
            await m.getxattr(top.ino, b"user.tvix.castore.blob.digest")
        root_names = await m.listxattr(ROOT_INO)
        assert b"user.tvix.stats.chunks_from_remote" in root_names
        assert b"user.tvix.stats.mount.lookups" in root_names
        assert await m.getxattr(ROOT_INO, b"user.tvix.stats.chunks_from_remote") == b"7"
        for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
            with pytest.raises(ReadOnly) as e2:
                await m.open(plain.ino, flags)
            assert errno_for(e2.value) == errno.EROFS

    run(main)


# --- the adapter ---------------------------------------------------------------------------


def test_adapter_maps_errors_and_negative_entries() -> None:
    s, t = make_tree_store()
    ops = Operations(FsModel(s))

    async def main() -> None:
        e = await ops.lookup(STORE_INO, t["basename"])
        assert e.st_ino > STORE_INO and e.entry_timeout == LONG_TTL
        neg = await ops.lookup(e.st_ino, b"absent")  # immutable tree: cached negative entry
        assert neg.st_ino == 0 and neg.entry_timeout == LONG_TTL
        neg = await ops.lookup(BLOBS_INO, b"0" * 64)  # may arrive later: cached briefly
        assert neg.st_ino == 0 and neg.entry_timeout == SHORT_NEGATIVE_TTL
        for call in (
            ops.mkdir(ROOT_INO, b"x", 0o755, None),
            ops.unlink(STORE_INO, b"x", None),
            ops.setxattr(ROOT_INO, b"user.x", b"1", None),
            ops.create(ROOT_INO, b"x", 0o644, os.O_WRONLY, None),
            ops.rename(ROOT_INO, b"a", ROOT_INO, b"b", 0, None),
        ):
            with pytest.raises(pyfuse3.FUSEError) as ei:
                await call
            assert ei.value.errno == errno.EROFS
        with pytest.raises(pyfuse3.FUSEError) as ei:
            await ops.getattr(123456789)  # unknown inode: a bug, still only FUSEError
        assert ei.value.errno == errno.EBADF

        async def boom(*a: object) -> None:
            raise RuntimeError("bug")

        ops.model.getattr = boom  # type: ignore[method-assign]
        with pytest.raises(pyfuse3.FUSEError) as ei:
            await ops.getattr(ROOT_INO)
        assert ei.value.errno == errno.EIO

    run(main)


def test_read_ahead_fills_the_lru_in_the_background() -> None:
    s, blobs = chunking_store(delay=0.01)
    data = random.Random(8).randbytes(64 * 1024)
    digest = blobs.add(data, [4096] * 16)
    m = FsModel(s)

    async def main() -> None:
        async with trio.open_nursery() as n:
            m.start_background(n)
            a = await m.lookup(BLOBS_INO, digest.hex().encode())
            fh = await m.open(a.ino, os.O_RDONLY)
            out = b""
            for off in range(0, len(data), 4096):
                out += await m.read(fh, off, 4096)
                await trio.sleep(0.05)  # the application is busy: read-ahead runs meanwhile
            assert out == data
            m.start_background(None)
        assert sorted(blobs.fetches) == sorted(c.digest for c in blobs.lists[digest])  # each chunk once
        assert m.counters.get("readahead_chunks") >= 10
        assert m.counters.get("chunk_cache_hits") >= 10  # the reader found them fetched already

    run(main)
