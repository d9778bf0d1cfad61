"""The persistent cache combinators (tvix_store.cached and the `cached` backends), without a mount.

In-process doubles are used only to inject faults (a slow, lying or unavailable remote); the
wire-level checks use a real daemon behind tests/tcpproxy.py, and a fake gRPC servicer built
from the generated stubs so the real gRPC client path is exercised.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from conftest import Daemon
from fixtures import coexisting_disk_use, random_bytes
from tcpproxy import TcpProxy

from tvix_store.blobservice import BlobService, BlobWriter
from tvix_store.blobservice.memory import MemoryBlobService
from tvix_store.compose import open_store, with_cache
from tvix_store.core.capabilities import Capabilities
from tvix_store.core.castore import Directory, DirectoryNode, FileNode
from tvix_store.core.chunks import ChunkMeta
from tvix_store.core.digest import EMPTY_DIGEST, B3Digest
from tvix_store.core.errors import IntegrityError, UnavailableError
from tvix_store.core.pathinfo import PathInfo, StorePath
from tvix_store.directoryservice import DirectoryService
from tvix_store.directoryservice.memory import MemoryDirectoryService
from tvix_store.pathinfoservice.memory import MemoryPathInfoService
from tvix_store.protocol import wire
from tvix_store.protocol.g1 import castore_pb2, rpc_blobstore_pb2, rpc_blobstore_pb2_grpc, rpc_directory_pb2_grpc
from tvix_store.store import Store

# --- fault-injecting doubles ------------------------------------------------------------


#: what the doubles declare: a remote that does not verify what it hands out
DOUBLE = Capabilities(is_remote=True, can_list=False, verifies_reads=False)


class FaultyBlobs(BlobService):
    """A remote BlobService double over a MemoryBlobService: counts calls, can be slow, down,
    or lie (wrong bytes, wrong chunk lists). Not a backend: only for fault injection."""

    capabilities = DOUBLE

    def __init__(self) -> None:
        self.inner = MemoryBlobService()
        self.reads: dict[B3Digest, int] = {}
        self.stats = 0
        self.delay = 0.0
        self.down = False
        self.corrupt: set[B3Digest] = set()
        self.lists: dict[B3Digest, list[ChunkMeta]] = {}
        self._lock = threading.Lock()

    def _gate(self) -> None:
        if self.down:
            raise UnavailableError("double: remote down")
        if self.delay:
            time.sleep(self.delay)

    def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        with self._lock:
            self.stats += 1
        self._gate()
        if digest in self.lists:
            return self.lists[digest]
        return self.inner.chunks(digest)

    def read_chunk(self, digest: B3Digest) -> bytes | None:
        with self._lock:
            self.reads[digest] = self.reads.get(digest, 0) + 1
        self._gate()
        data = self.inner.read_chunk(digest)
        if data is not None and digest in self.corrupt:
            data = bytes([data[0] ^ 1]) + data[1:]
        return data

    def open_write(self) -> BlobWriter:
        return self.inner.open_write()


class LyingDirectories(DirectoryService):
    """A remote DirectoryService double that answers a different Directory for one digest."""

    capabilities = DOUBLE

    def __init__(self) -> None:
        self.inner = MemoryDirectoryService()
        self.swap: dict[B3Digest, Directory] = {}

    def get(self, digest: B3Digest) -> Directory | None:
        if digest in self.swap:
            return self.swap[digest]
        return self.inner.get(digest)

    def _store(self, directory: Directory) -> None:
        self.inner._store(directory)


class RemoteDirectories(MemoryDirectoryService):
    capabilities = DOUBLE


class RemotePathInfos(MemoryPathInfoService):
    capabilities = DOUBLE


def far_store(blobs: FaultyBlobs | None = None, dirs: DirectoryService | None = None) -> Store:
    b = blobs or FaultyBlobs()
    d = dirs or RemoteDirectories()
    return Store(b, d, RemotePathInfos(b, d), "double://")


def open_cached_store(far: Store, cache: Path, size: int | None) -> Store:
    return with_cache(far, cache, size)


def chunk_files(cache: Path) -> list[os.DirEntry[str]]:
    out = []
    for sub in ("chunks", "tmp"):
        for root, _, files in os.walk(cache / sub):
            out.extend(e for e in os.scandir(root) if e.is_file())
            del files
    return out


def quiet_fetch_count(store: Store, quiet: float = 0.5, timeout: float = 10) -> int:
    """chunks_fetched once background prefetches are over: nothing in flight and the count
    unchanged for `quiet` seconds (a queued prefetch is not yet "in flight")."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while True:
        c = store.counters.snapshot()
        if c["in_flight"] or c["chunks_fetched"] != last:
            last, since = c["chunks_fetched"], time.monotonic()
        elif time.monotonic() - since >= quiet:
            return last
        assert time.monotonic() < deadline, "background fetches did not settle"
        time.sleep(0.02)


def poll(cond: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# --- chunks: single flight, hits, verification ----------------------------------------


def test_single_flight_one_fetch_for_concurrent_misses(tmp_path: Path) -> None:
    far = FaultyBlobs()
    data = random_bytes(200_000, seed=1)
    dg = far.inner.put(data)
    far.delay = 0.3
    store = open_cached_store(far_store(far), tmp_path / "c", 1 << 20)
    try:
        barrier = threading.Barrier(8)

        def read() -> bytes | None:
            barrier.wait()
            return store.blobs.read_chunk(dg)

        with futures.ThreadPoolExecutor(8) as ex:
            results = list(ex.map(lambda _: read(), range(8)))
        assert all(r == data for r in results)
        assert far.reads[dg] == 1
        c = store.counters.snapshot()
        assert c["chunks_fetched"] == 1 and c["single_flight_joins"] == 7
        # later reads are hits, from disk
        far.delay = 0
        assert store.blobs.read_chunk(dg) == data
        assert far.reads[dg] == 1
    finally:
        store.close()


def test_miss_fetch_insert_then_hit_and_no_negative_cache(tmp_path: Path) -> None:
    far = FaultyBlobs()
    store = open_cached_store(far_store(far), tmp_path / "c", 1 << 20)
    try:
        data = random_bytes(5000, seed=2)
        dg = B3Digest.of(data)
        assert store.blobs.chunks(dg) is None
        assert store.blobs.read_chunk(dg) is None
        far.inner.put(data)  # appears later: absence was not remembered
        assert store.blobs.chunks(dg) == [ChunkMeta(dg, 5000)]
        assert store.blobs.read_chunk(dg) == data
        assert store.blobs.read_chunk(dg) == data
        assert far.reads[dg] == 2  # the None answer, then one fetch
        assert store.blobs.chunks(dg) == [ChunkMeta(dg, 5000)]
        assert far.stats == 2
        c = store.counters.snapshot()
        assert c["cache_hits"] == 1 and c["bytes_fetched"] == 5000 and c["meta_hits"] == 1
        # the empty blob: an empty chunk list, no chunk to read
        far.inner.put(b"")
        assert store.blobs.chunks(EMPTY_DIGEST) == []
    finally:
        store.close()


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_corrupt_cached_chunk_is_discarded_and_refetched(tmp_path: Path, damage: str) -> None:
    far = FaultyBlobs()
    data = random_bytes(70_000, seed=3)
    dg = far.inner.put(data)
    store = open_cached_store(far_store(far), tmp_path / "c", 1 << 20)
    try:
        assert store.blobs.read_chunk(dg) == data
        assert store.blobs.flush()  # type: ignore[attr-defined]
        path = tmp_path / "c" / "chunks" / dg.hex()[:2] / dg.hex()
        raw = bytearray(path.read_bytes())
        assert raw == data
        if damage == "flip":
            raw[12345] ^= 0x40
        elif damage == "truncate":
            raw = raw[:1000]
        else:
            raw = bytearray()
        path.write_bytes(raw)
        assert store.blobs.read_chunk(dg) == data
        assert far.reads[dg] == 2
        assert store.counters.snapshot()["cache_corrupt"] == 1
        assert store.blobs.flush()  # type: ignore[attr-defined]
        assert path.read_bytes() == data  # re-inserted, whole
    finally:
        store.close()


def test_remote_chunk_with_wrong_bytes_is_rejected_and_not_cached(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    far = FaultyBlobs()
    data = random_bytes(10_000, seed=4)
    dg = far.inner.put(data)
    far.corrupt.add(dg)
    store = open_cached_store(far_store(far), tmp_path / "c", 1 << 20)
    try:
        with pytest.raises(IntegrityError, match=dg.hex()):
            store.blobs.read_chunk(dg)
        assert dg.hex() in caplog.text
        assert chunk_files(tmp_path / "c") == []
        c = store.counters.snapshot()
        assert c["verify_failures"] == 1 and c["cache_bytes"] == 0
        # a prefetch of it does not cache it either
        store.blobs.prefetch([dg])
        poll(lambda: store.counters.snapshot()["verify_failures"] == 2, 5, "the prefetch")
        assert chunk_files(tmp_path / "c") == []
        far.corrupt.clear()  # an honest answer later is accepted
        assert store.blobs.read_chunk(dg) == data
    finally:
        store.close()


def test_remote_chunk_lists_are_checked(tmp_path: Path) -> None:
    far = FaultyBlobs()
    a = far.inner.put(random_bytes(1000, seed=5))
    b = far.inner.put(random_bytes(2000, seed=6))
    blob = B3Digest.of(random_bytes(3000, seed=7))  # not a+b
    far.lists = {
        blob: [ChunkMeta(a, 1000), ChunkMeta(b, 0)],  # a zero-size chunk
        B3Digest.of(b"x"): [ChunkMeta(a, 1000)],  # one chunk that is not the blob itself
        B3Digest.of(b"y"): [],  # empty list for a non-empty blob
        EMPTY_DIGEST: [ChunkMeta(a, 1000)],  # chunks for the empty blob
    }
    store = open_cached_store(far_store(far), tmp_path / "c", 1 << 20)
    try:
        for d in far.lists:
            with pytest.raises(IntegrityError, match=d.hex()):
                store.blobs.chunks(d)
        assert os.listdir(tmp_path / "c" / "blobs") == []
        assert store.counters.snapshot()["verify_failures"] == 4
    finally:
        store.close()


def test_sequential_read_detects_chunks_that_do_not_add_up(tmp_path: Path) -> None:
    far = FaultyBlobs()
    a = far.inner.put(random_bytes(1000, seed=5))
    b = far.inner.put(random_bytes(2000, seed=6))
    good = random_bytes(1000, seed=5) + random_bytes(2000, seed=6)
    g = B3Digest.of(good)
    bad = B3Digest.of(random_bytes(3000, seed=8))
    far.lists = {g: [ChunkMeta(a, 1000), ChunkMeta(b, 2000)], bad: [ChunkMeta(a, 1000), ChunkMeta(b, 2000)]}
    store = open_cached_store(far_store(far), tmp_path / "c", 1 << 20)
    try:
        r = store.blobs.open_read(g)
        assert r is not None and r.read() == good
        r = store.blobs.open_read(bad)
        assert r is not None
        with pytest.raises(IntegrityError, match=bad.hex()):
            r.read()
        with pytest.raises(IntegrityError):  # and it stays failed
            r.read()
    finally:
        store.close()


def test_wrong_directory_and_pathinfo_are_rejected_and_not_cached(tmp_path: Path) -> None:
    dirs = LyingDirectories()
    leaf = Directory(files=(FileNode(b"f", B3Digest.of(b"f"), 1),))
    other = Directory(files=(FileNode(b"g", B3Digest.of(b"g"), 1),))
    root = Directory(directories=(leaf.as_node(b"sub"),))
    dirs.inner.put_graph([leaf, root])
    far = far_store(dirs=dirs)
    dirs.swap[leaf.digest] = other
    store = open_cached_store(far, tmp_path / "c", 1 << 20)
    try:
        with pytest.raises(IntegrityError, match=leaf.digest.hex()):
            store.directories.get(leaf.digest)
        with pytest.raises(IntegrityError):
            list(store.directories.get_recursive(root.digest))
        assert os.listdir(tmp_path / "c" / "directories") == []
        dirs.swap.clear()
        assert store.directories.get(root.digest) == root
        assert list(store.directories.get_recursive(root.digest)) == [root, leaf]
        # a PathInfo filed under another store path's hash
        sp1 = StorePath.parse_basename("00bgd045z0d4icpbc2yyz4gx48ak44la-one")
        sp2 = StorePath.parse_basename("11bgd045z0d4icpbc2yyz4gx48ak44la-two")
        info = PathInfo(root.as_node(sp2.basename.encode()))
        far.pathinfos._infos[sp1.digest] = info  # type: ignore[attr-defined]
        with pytest.raises(IntegrityError, match=sp1.digest.hex()):
            store.pathinfos.get(sp1.digest)
        assert os.listdir(tmp_path / "c" / "pathinfos") == []
        far.pathinfos._infos[sp2.digest] = info  # type: ignore[attr-defined]
        assert store.pathinfos.get(sp2.digest) == info
        assert store.counters.snapshot()["verify_failures"] == 3
    finally:
        store.close()


# --- bound, eviction, persistence ------------------------------------------------------


def test_lru_bound_holds_under_3x_workload(tmp_path: Path) -> None:
    far = FaultyBlobs()
    rng = random.Random(9)
    blobs = {}
    for i in range(90):
        data = random_bytes(rng.randrange(10_000, 60_000), seed=100 + i)
        blobs[far.inner.put(data)] = data
    total = sum(len(d) for d in blobs.values())
    limit = total // 3
    cache = tmp_path / "c"
    store = open_cached_store(far_store(far), cache, limit)
    over: list[int] = []
    stop = threading.Event()

    def watch() -> None:  # measures the disk while the workload runs
        while not stop.is_set():
            u = coexisting_disk_use(cache)
            if u > limit:
                over.append(u)

    w = threading.Thread(target=watch)
    w.start()
    try:
        digests = list(blobs)

        def worker(seed: int) -> None:
            r = random.Random(seed)
            for _ in range(120):
                d = r.choice(digests)
                assert store.blobs.read_chunk(d) == blobs[d]
                if r.random() < 0.3:
                    store.blobs.prefetch(r.sample(digests, 3))

        with futures.ThreadPoolExecutor(4) as ex:
            list(ex.map(worker, range(4)))
    finally:
        stop.set()
        w.join()
    try:
        assert not over, f"cache used {max(over)} bytes on disk, bound {limit}"
        assert store.blobs.flush()  # type: ignore[attr-defined]
        c = store.counters.snapshot()
        assert c["cache_evictions"] > 0
        assert 0 < c["cache_bytes"] <= limit
        # once background eviction is idle, the accounting is exactly what is on disk
        poll(lambda: store.counters.snapshot()["cache_bytes"] == coexisting_disk_use(cache), 5, "accounting == disk")
        # a chunk larger than the whole cache is served, not cached
        before = c["cache_uncacheable"]
        big = random_bytes(limit + 1, seed=7)
        dg = far.inner.put(big)
        assert store.blobs.read_chunk(dg) == big
        assert store.blobs.flush()  # type: ignore[attr-defined]
        assert not (cache / "chunks" / dg.hex()[:2] / dg.hex()).exists()
        assert store.counters.snapshot()["cache_uncacheable"] == before + 1
    finally:
        store.close()


def test_foreground_eviction_alone_holds_the_bound_exactly_in_lru_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tvix_store.objects.bounded as cached_mod

    monkeypatch.setattr(cached_mod, "HIGH_WATERMARK", 100.0)  # no background eviction
    far = FaultyBlobs()
    rng = random.Random(11)
    datas = [random_bytes(rng.randrange(9_000, 30_000), seed=200 + i) for i in range(40)]
    ds = [far.inner.put(d) for d in datas]
    limit = 200_000
    cache = tmp_path / "c"
    store = open_cached_store(far_store(far), cache, limit)
    try:
        for i, (d, data) in enumerate(zip(ds, datas, strict=True)):
            assert store.blobs.read_chunk(d) == data
            if i % 3 == 0:
                assert store.blobs.read_chunk(ds[0]) == datas[0]  # keep ds[0] recent
            assert store.blobs.flush()  # type: ignore[attr-defined]
            use = coexisting_disk_use(cache)
            assert use <= limit
            if sum(cached_mod.disk_charge(len(x)) for x in datas[: i + 1]) > limit:
                assert use > limit - 2 * 32_768, "evicted more than needed"
        present = {e.name for e in chunk_files(cache)}
        assert ds[0].hex() in present and ds[-1].hex() in present
        assert ds[1].hex() not in present  # least recently used went first
    finally:
        store.close()


def test_cache_survives_reopen_and_keeps_recency(tmp_path: Path) -> None:
    far = FaultyBlobs()
    datas = [random_bytes(40_000, seed=20 + i) for i in range(3)]
    ds = [far.inner.put(d) for d in datas]
    leaf = Directory(files=(FileNode(b"f", ds[0], 40_000),))
    dirs = RemoteDirectories()
    dirs.put(leaf)
    cache = tmp_path / "c"
    store = open_cached_store(far_store(far, dirs), cache, 1 << 20)
    for d in ds:
        assert store.blobs.chunks(d) is not None
        store.blobs.read_chunk(d)
        time.sleep(0.01)  # distinct mtimes (recency is file mtime)
    assert store.directories.get(leaf.digest) == leaf
    store.close()

    far.down = True  # the remote is gone: everything cached still works
    store = open_cached_store(far_store(far), cache, 1 << 20)
    try:
        for d, data in zip(ds, datas, strict=True):
            assert store.blobs.chunks(d) == [ChunkMeta(d, len(data))]
            assert store.blobs.read_chunk(d) == data
            r = store.blobs.open_read(d)
            assert r is not None and r.read() == data
            time.sleep(0.01)
        assert store.blobs.read_chunk(ds[0]) == datas[0]  # LRU order now: ds[1], ds[2], ds[0]
        assert store.directories.get(leaf.digest) == leaf
        assert store.counters.snapshot()["chunks_fetched"] == 0
    finally:
        store.close()
    # reopened with room for two chunks and the Directory (every object counts against the
    # bound): the least recently used go first: the chunk lists (not read since session 1), ds[1]
    store = open_cached_store(far_store(far), cache, 2 * 40_960 + 4096)
    try:
        left = {e.name for e in chunk_files(cache)}
        assert left == {ds[0].hex(), ds[2].hex()}
    finally:
        store.close()


def test_second_process_on_same_cache_dir_reads_but_does_not_write(tmp_path: Path) -> None:
    far = FaultyBlobs()
    a = far.inner.put(random_bytes(3000, seed=30))
    b = far.inner.put(random_bytes(3000, seed=31))
    s1 = open_cached_store(far_store(far), tmp_path / "c", 1 << 20)
    s2 = open_cached_store(far_store(far), tmp_path / "c", 1 << 20)  # flock held by s1: read-only
    try:
        s1.blobs.read_chunk(a)
        assert s1.blobs.flush()  # type: ignore[attr-defined]
        assert s2.blobs.read_chunk(a) is not None and far.reads[a] == 1
        assert s2.blobs.read_chunk(b) is not None
        assert {e.name for e in chunk_files(tmp_path / "c")} == {a.hex()}
    finally:
        s2.close()
        s1.close()


# --- prefetch ----------------------------------------------------------------------------


def test_prefetch_never_blocks_and_fills_the_cache(tmp_path: Path) -> None:
    far = FaultyBlobs()
    ds = [far.inner.put(random_bytes(20_000, seed=50 + i)) for i in range(12)]
    far.delay = 0.2
    store = open_cached_store(far_store(far), tmp_path / "c", 1 << 20)
    try:
        t = time.monotonic()
        store.blobs.prefetch(ds)
        store.blobs.prefetch(ds)  # in flight: skipped
        assert time.monotonic() - t < 0.1
        poll(lambda: len(chunk_files(tmp_path / "c")) == 12, 10, "prefetches")
        assert all(far.reads[d] == 1 for d in ds)
        far.delay = 0
        assert store.blobs.read_chunk(ds[0]) is not None
        assert store.counters.snapshot()["prefetch_started"] == 12
        assert sum(far.reads.values()) == 12
    finally:
        store.close()


def test_bad_cache_dir_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "precious.txt").write_text("x")
    with pytest.raises(Exception, match="not a tvix-store directory"):
        open_cached_store(far_store(), tmp_path / "junk", None)
    assert (tmp_path / "junk" / "precious.txt").read_text() == "x"


# --- a real daemon behind the proxy ------------------------------------------------------


@pytest.fixture
def remote(tmp_path: Path) -> Iterator[tuple[Daemon, TcpProxy]]:
    d = Daemon(f"local://{tmp_path / 'daemon-store'}")
    try:
        with TcpProxy(int(d.address.rsplit(":", 1)[1])) as px:
            yield d, px
    finally:
        d.stop()


def test_real_remote_wire_bytes_stall_and_recovery(tmp_path: Path, remote: tuple[Daemon, TcpProxy]) -> None:
    daemon, px = remote
    data = random_bytes(6 << 20, seed=60)
    with open_store(daemon.url) as s:
        dg = s.blobs.put(data)
    store = open_store(px.url, cache_dir=tmp_path / "c", cache_size=64 << 20, timeout=2)
    try:
        cs = store.blobs.chunks(dg)
        assert cs is not None and len(cs) > 3 and sum(c.size for c in cs) == len(data)
        assert px.total < 16 << 10  # a Stat moves metadata only
        # a read of 1 MiB at an offset moves about 1 MiB (the chunks it covers)
        px.reset_counts()
        r = store.blobs.open_read(dg)
        assert r is not None
        r.seek(3 << 20)
        assert r.read(1 << 20) == data[3 << 20 : 4 << 20]
        assert px.total <= 2 << 20, px.total
        # a full read: everything arrives once, verified end to end
        r.seek(0)
        assert r.read() == data
        fetched = quiet_fetch_count(store)
        px.reset_counts()
        assert store.blobs.open_read(dg).read() == data  # type: ignore[union-attr]
        assert store.counters.snapshot()["chunks_fetched"] == fetched
        assert px.total < 256, px.total  # no data: at most HTTP/2 pings and window updates
        # the remote stalls: a miss fails within the timeout, then at once, then recovers
        with open_store(daemon.url) as s:
            other = s.blobs.put(random_bytes(100_000, seed=61))
        px.mode = "stall"
        t = time.monotonic()
        with pytest.raises(UnavailableError):
            store.blobs.read_chunk(other)
        assert time.monotonic() - t < 2 + 1.5
        t = time.monotonic()
        with pytest.raises(UnavailableError):
            store.blobs.chunks(other)
        assert time.monotonic() - t < 0.2
        assert store.blobs.open_read(dg).read(1000) == data[:1000]  # type: ignore[union-attr]
        px.mode = "pass"
        poll(lambda: store.counters.snapshot()["remote_down"] == 0, 15, "recovery")
        assert store.blobs.read_chunk(other) == random_bytes(100_000, seed=61)
        # dropped connections: UnavailableError fast, recovery after
        px.mode = "drop"
        third = B3Digest.of(b"never stored")
        t = time.monotonic()
        with pytest.raises(UnavailableError):
            store.blobs.chunks(third)
        assert time.monotonic() - t < 2 + 1.5
        px.mode = "pass"
        poll(lambda: store.counters.snapshot()["remote_down"] == 0, 15, "recovery after drop")
        assert store.blobs.chunks(third) is None
    finally:
        store.close()


# --- a lying gRPC server: the real client path -----------------------------------------


class LyingBlobServicer(rpc_blobstore_pb2_grpc.BlobServiceServicer):
    def __init__(self, chunks: dict[bytes, list[ChunkMeta]], data: dict[bytes, bytes]) -> None:
        self.chunks = chunks
        self.data = data

    def Stat(self, request, context):  # noqa: ANN001, ANN201, N802 - grpc servicer signature
        cs = self.chunks.get(request.digest)
        if cs is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "no")
        return wire.chunks_to_proto(cs)

    def Read(self, request, context):  # noqa: ANN001, ANN201, N802
        data = self.data.get(request.digest)
        if data is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "no")
        yield rpc_blobstore_pb2.BlobChunk(data=data)


class LyingDirectoryServicer(rpc_directory_pb2_grpc.DirectoryServiceServicer):
    def __init__(self, answer: Directory) -> None:
        self.answer = answer

    def Get(self, request, context):  # noqa: ANN001, ANN201, N802
        yield castore_pb2.Directory.FromString(self.answer.encoded)


def test_lying_grpc_server_is_caught_through_the_real_client(tmp_path: Path) -> None:
    real = random_bytes(50_000, seed=70)
    dg = B3Digest.of(real)
    wrong = bytearray(real)
    wrong[100] ^= 1
    a = B3Digest.of(b"a" * 10)
    zero = B3Digest.of(b"zz")
    chunks = {
        bytes(dg): [ChunkMeta(dg, 50_000)],
        bytes(zero): [ChunkMeta(a, 10), ChunkMeta(dg, 0)],
    }
    other = Directory(files=(FileNode(b"x", dg, 50_000),))
    asked = Directory(files=(FileNode(b"y", dg, 50_000),))
    server = grpc.server(futures.ThreadPoolExecutor(4))
    rpc_blobstore_pb2_grpc.add_BlobServiceServicer_to_server(
        LyingBlobServicer(chunks, {bytes(dg): bytes(wrong)}), server
    )
    rpc_directory_pb2_grpc.add_DirectoryServiceServicer_to_server(LyingDirectoryServicer(other), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    store = open_store(f"grpc+http://127.0.0.1:{port}", cache_dir=tmp_path / "c", cache_size=1 << 20, timeout=2)
    try:
        assert store.blobs.chunks(dg) == [ChunkMeta(dg, 50_000)]
        with pytest.raises(IntegrityError, match=dg.hex()):
            store.blobs.read_chunk(dg)
        with pytest.raises(IntegrityError, match=zero.hex()):
            store.blobs.chunks(zero)
        with pytest.raises(IntegrityError):
            store.directories.get(asked.digest)
        assert chunk_files(tmp_path / "c") == []
        assert os.listdir(tmp_path / "c" / "directories") == []
        assert os.listdir(tmp_path / "c" / "blobs") == [dg.hex()[:2]]  # the one honest chunk list
        c = store.counters.snapshot()
        assert c["verify_failures"] == 3 and c["remote_down"] == 0
    finally:
        store.close()
        server.stop(None)


def test_get_recursive_is_cached(tmp_path: Path) -> None:
    """get_recursive through the cache: the second time it is served from disk alone."""
    far = FaultyBlobs()
    fs = far_store(far)
    leaf = Directory(files=(FileNode(b"f", B3Digest.of(b"f"), 1),))
    mid = Directory(directories=(leaf.as_node(b"a"),), files=(FileNode(b"g", B3Digest.of(b"g"), 1),))
    root = Directory(directories=(mid.as_node(b"m"), DirectoryNode(b"n", leaf.digest, leaf.size)))
    fs.directories.put_graph([leaf, mid, root])
    store = open_cached_store(fs, tmp_path / "c", 1 << 20)
    try:
        first = list(store.directories.get_recursive(root.digest))
        assert [d.digest for d in first] == [root.digest, mid.digest, leaf.digest]
        fs.directories._dirs.clear()  # type: ignore[attr-defined]
        assert list(store.directories.get_recursive(root.digest)) == first
    finally:
        store.close()
