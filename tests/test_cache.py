"""The persistent cache (`compose.with_cache`: the `cached` combinators over a bounded object
store in a cache directory), without a mount.

The remote is a real daemon behind tests/tcpproxy.py, which counts the gRPC calls and bytes
that really cross the wire and can stall, drop or delay it. In-process doubles appear only
where a fault is the point (a remote that lies about bytes, chunk lists, Directories or
path infos). No test waits by sleeping: background work is awaited through its explicit
gauges (`in_flight`, `prefetch_pending`, `write_pending` reach 0).
"""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from conftest import Daemon
from fixtures import coexisting_disk_use, random_bytes
from mountutil import wait_until
from tcpproxy import TcpProxy

from tvix_store.blobservice import BlobService, BlobWriter
from tvix_store.blobservice.memory import MemoryBlobService
from tvix_store.compose import open_store, with_cache
from tvix_store.core.capabilities import Capabilities
from tvix_store.core.castore import Directory, DirectoryNode, FileNode
from tvix_store.core.chunks import ChunkMeta
from tvix_store.core.digest import EMPTY_DIGEST, B3Digest
from tvix_store.core.errors import IntegrityError, StoreError, UnavailableError
from tvix_store.core.pathinfo import PathInfo, StorePath
from tvix_store.directoryservice import DirectoryService
from tvix_store.directoryservice.memory import MemoryDirectoryService
from tvix_store.objects.bounded import disk_charge
from tvix_store.pathinfoservice.memory import MemoryPathInfoService
from tvix_store.protocol import wire
from tvix_store.protocol.g1 import castore_pb2, rpc_blobstore_pb2, rpc_blobstore_pb2_grpc, rpc_directory_pb2_grpc
from tvix_store.store import Store

# --- a real remote -----------------------------------------------------------------------


@dataclass
class Remote:
    daemon: Daemon
    proxy: TcpProxy

    def put(self, data: bytes) -> B3Digest:
        """Store straight into the daemon (not through the proxy: the wire counts stay clean)."""
        with open_store(self.daemon.url) as s:
            return s.blobs.put(data)


@pytest.fixture
def remote(tmp_path: Path) -> Iterator[Remote]:
    d = Daemon(f"local://{tmp_path / 'daemon-store'}")
    try:
        with TcpProxy(int(d.address.rsplit(":", 1)[1])) as px:
            yield Remote(d, px)
    finally:
        d.stop()


def cached(url: str, cache: Path, size: int = 64 << 20, timeout: float = 5) -> Store:
    return open_store(url, cache_dir=cache, cache_size=size, timeout=timeout)


def idle(store: Store, timeout: float = 30) -> dict[str, int]:
    """Wait until the cache's background work is over (explicit gauges); the counters then."""

    def done() -> bool:
        c = store.counters.snapshot()
        return c["in_flight"] == c["prefetch_pending"] == c["write_pending"] == 0

    wait_until(done, timeout, "background fetches and cache writes to finish")
    return store.counters.snapshot()


def cached_chunks(cache: Path) -> set[str]:
    return {p.name for p in (cache / "chunks").rglob("*") if p.is_file()}


# --- chunks: single flight, hits, no negative cache ----------------------------------------


def test_single_flight_one_remote_read_for_concurrent_misses(tmp_path: Path, remote: Remote) -> None:
    data = random_bytes(200_000, seed=1)
    dg = remote.put(data)
    remote.proxy.delay = 0.05  # every call takes ≥ 100 ms: the eight readers overlap
    store = cached(remote.proxy.url, tmp_path / "c")
    try:
        barrier = threading.Barrier(8)

        def read() -> bytes | None:
            barrier.wait()
            return store.blobs.read_chunk(dg)

        remote.proxy.reset_counts()
        with futures.ThreadPoolExecutor(8) as ex:
            results = list(ex.map(lambda _: read(), range(8)))
        assert all(r == data for r in results)
        assert remote.proxy.grpc_calls == 1  # one Read crossed the wire for eight readers
        idle(store)
        remote.proxy.reset_counts()
        assert store.blobs.read_chunk(dg) == data  # now from the cache directory
        assert remote.proxy.grpc_calls == 0
        assert dg.hex() in cached_chunks(tmp_path / "c")
    finally:
        store.close()


def test_miss_fetch_insert_then_hit_and_no_negative_cache(tmp_path: Path, remote: Remote) -> None:
    store = cached(remote.proxy.url, tmp_path / "c")
    try:
        data = random_bytes(5000, seed=2)
        dg = B3Digest.of(data)
        assert store.blobs.chunks(dg) is None
        assert store.blobs.read_chunk(dg) is None
        remote.put(data)  # appears later: absence was not remembered
        assert store.blobs.chunks(dg) == [ChunkMeta(dg, 5000)]
        assert store.blobs.read_chunk(dg) == data
        idle(store)
        remote.proxy.reset_counts()
        assert store.blobs.read_chunk(dg) == data
        assert store.blobs.chunks(dg) == [ChunkMeta(dg, 5000)]
        assert remote.proxy.grpc_calls == 0
        remote.put(b"")
        assert store.blobs.chunks(EMPTY_DIGEST) == []  # the empty blob: an empty list
    finally:
        store.close()


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_corrupt_cached_chunk_is_discarded_and_refetched(tmp_path: Path, remote: Remote, damage: str) -> None:
    data = random_bytes(70_000, seed=3)
    dg = remote.put(data)
    store = cached(remote.proxy.url, tmp_path / "c")
    try:
        assert store.blobs.read_chunk(dg) == data
        idle(store)
        path = tmp_path / "c" / "chunks" / dg.hex()[:2] / dg.hex()
        raw = bytearray(path.read_bytes())
        assert raw == data
        raw = {"flip": raw[:12345] + bytes([raw[12345] ^ 0x40]) + raw[12346:], "truncate": raw[:1000]}.get(
            damage, bytearray()
        )
        path.write_bytes(raw)
        remote.proxy.reset_counts()
        assert store.blobs.read_chunk(dg) == data
        assert remote.proxy.grpc_calls == 1  # fetched again
        assert store.counters.get("cache_corrupt") == 1
        idle(store)
        assert path.read_bytes() == data  # re-inserted, whole
    finally:
        store.close()


# --- bound, eviction, persistence ------------------------------------------------------------


def test_lru_bound_holds_under_3x_workload(tmp_path: Path, remote: Remote) -> None:
    rng = random.Random(9)
    blobs = {}
    for i in range(90):
        data = random_bytes(rng.randrange(10_000, 60_000), seed=100 + i)
        blobs[remote.put(data)] = data
    limit = sum(len(d) for d in blobs.values()) // 3
    cache = tmp_path / "c"
    store = cached(remote.proxy.url, cache, limit)
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
        c = idle(store)
        assert c["cache_evictions"] > 0
        assert 0 < c["cache_bytes"] <= limit
        # once background eviction is idle, the accounting is exactly what is on disk
        wait_until(lambda: store.counters.get("cache_bytes") == coexisting_disk_use(cache), 10)
        # a chunk larger than the whole cache is served, not cached
        big = random_bytes(limit + 1, seed=7)
        dg = remote.put(big)
        assert store.blobs.read_chunk(dg) == big
        idle(store)
        assert dg.hex() not in cached_chunks(cache)
        assert store.counters.get("cache_uncacheable") == c["cache_uncacheable"] + 1
    finally:
        store.close()


def test_eviction_order_and_recency_survive_a_reopen_with_the_remote_gone(tmp_path: Path, remote: Remote) -> None:
    """Reads in a known order (no sleeps: recency is stamped in order); after a reopen with
    the remote gone everything is served from the cache; reopened with a smaller bound, the
    least recently used objects go first."""
    datas = [random_bytes(40_000, seed=20 + i) for i in range(4)]
    ds = [remote.put(d) for d in datas]
    cache = tmp_path / "c"
    store = cached(remote.proxy.url, cache, 1 << 20)
    for d in ds:
        store.blobs.read_chunk(d)
    idle(store)
    store.close()

    remote.proxy.mode = "drop"  # the remote is gone: what is cached keeps working
    remote.proxy.reset_counts()
    connections = remote.proxy.connections
    store = cached(remote.proxy.url, cache, 1 << 20)
    try:
        for i in (2, 0, 3, 1):  # recency now: ds[2], ds[0], ds[3], ds[1] (most recent)
            assert store.blobs.read_chunk(ds[i]) == datas[i]
        assert store.blobs.chunks(ds[1]) == [ChunkMeta(ds[1], 40_000)]
        assert remote.proxy.connections == connections and remote.proxy.total == 0
    finally:
        store.close()
    store = cached(remote.proxy.url, cache, 2 * disk_charge(40_000))  # room for two chunks
    try:
        assert cached_chunks(cache) == {ds[3].hex(), ds[1].hex()}
        assert store.counters.get("cache_bytes") == coexisting_disk_use(cache)
    finally:
        store.close()


# --- prefetch --------------------------------------------------------------------------------


def test_prefetch_returns_at_once_and_fills_the_cache_in_the_background(tmp_path: Path, remote: Remote) -> None:
    datas = [random_bytes(20_000, seed=50 + i) for i in range(12)]
    ds = [remote.put(d) for d in datas]
    remote.proxy.delay = 0.1  # each fetch ≥ 200 ms
    cache = tmp_path / "c"
    store = cached(remote.proxy.url, cache)
    try:
        remote.proxy.reset_counts()
        store.blobs.prefetch(ds)
        store.blobs.prefetch(ds)  # queued or in flight: skipped
        assert not cached_chunks(cache)  # prefetch returned before any fetch could finish
        idle(store)
        assert cached_chunks(cache) == {d.hex() for d in ds}
        assert remote.proxy.grpc_calls == 12 and store.counters.get("prefetch_started") == 12
        remote.proxy.reset_counts()
        assert [store.blobs.read_chunk(d) for d in ds] == datas
        assert remote.proxy.grpc_calls == 0
    finally:
        store.close()


def test_get_recursive_is_cached(tmp_path: Path, remote: Remote) -> None:
    leaf = Directory(files=(FileNode(b"f", B3Digest.of(b"f"), 1),))
    mid = Directory(directories=(leaf.as_node(b"a"),), files=(FileNode(b"g", B3Digest.of(b"g"), 1),))
    root = Directory(directories=(mid.as_node(b"m"), DirectoryNode(b"n", leaf.digest, leaf.size)))
    with open_store(remote.daemon.url) as s:
        s.blobs.put_many([b"f", b"g"])
        s.directories.put_graph([leaf, mid, root])
    store = cached(remote.proxy.url, tmp_path / "c")
    try:
        remote.proxy.reset_counts()
        first = list(store.directories.get_recursive(root.digest))
        assert [d.digest for d in first] == [root.digest, mid.digest, leaf.digest]
        assert remote.proxy.grpc_calls == 1  # the whole closure in one call
        assert list(store.directories.get_recursive(root.digest)) == first
        assert store.directories.get(mid.digest) == mid
        assert remote.proxy.grpc_calls == 1  # then from the cache alone
    finally:
        store.close()


# --- the remote stalls, drops, comes back ----------------------------------------------------


def test_stalled_and_dropped_remote_fail_within_the_timeout_then_fast_and_recover(
    tmp_path: Path, remote: Remote
) -> None:
    data = random_bytes(6 << 20, seed=60)
    dg = remote.put(data)
    other = remote.put(random_bytes(100_000, seed=61))
    timeout = 2.0
    store = cached(remote.proxy.url, tmp_path / "c", timeout=timeout)
    try:
        r = store.blobs.open_read(dg)
        assert r is not None and r.read() == data  # verified end to end
        idle(store)
        remote.proxy.mode = "stall"
        with pytest.raises(UnavailableError):
            store.blobs.read_chunk(other)
        assert store.counters.get("remote_down") == 1
        remote.proxy.reset_counts()
        connections = remote.proxy.connections
        started = store.counters.get("prefetch_started")
        with pytest.raises(UnavailableError, match="is down"):  # fast: the remote is not asked
            store.blobs.chunks(other)
        store.blobs.prefetch([other])  # skipped while down
        assert remote.proxy.total == 0 and remote.proxy.connections == connections
        assert store.counters.get("prefetch_started") == started
        assert store.blobs.open_read(dg).read(1000) == data[:1000]  # type: ignore[union-attr]
        remote.proxy.mode = "pass"
        wait_until(lambda: store.counters.get("remote_down") == 0, 15, "recovery")
        assert store.blobs.read_chunk(other) == random_bytes(100_000, seed=61)
        remote.proxy.mode = "drop"
        with pytest.raises(UnavailableError):
            store.blobs.chunks(B3Digest.of(b"never stored"))
        remote.proxy.mode = "pass"
        wait_until(lambda: store.counters.get("remote_down") == 0, 15, "recovery after the drop")
        assert store.blobs.chunks(B3Digest.of(b"never stored")) is None
    finally:
        store.close()


def test_bad_cache_dir_is_a_clear_error(tmp_path: Path, remote: Remote) -> None:
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "precious.txt").write_text("x")
    with pytest.raises(StoreError, match="not a tvix-store directory"):
        cached(remote.proxy.url, tmp_path / "junk")
    assert (tmp_path / "junk" / "precious.txt").read_text() == "x"


def test_a_cache_dir_of_the_earlier_layout_is_emptied_and_reused(tmp_path: Path, remote: Remote) -> None:
    old = tmp_path / "c"
    (old / "chunks" / "ab").mkdir(parents=True)
    (old / "chunks" / "ab" / ("ab" * 32)).write_bytes(b"old chunk")
    (old / "VERSION").write_bytes(b"tvix-store-cache 1\n")
    dg = remote.put(b"fresh")
    store = cached(remote.proxy.url, old)
    try:
        assert store.blobs.read_chunk(dg) == b"fresh"
        idle(store)
        assert cached_chunks(old) == {dg.hex()}
    finally:
        store.close()


# --- lying remotes: fault injection ------------------------------------------------------------

#: what the doubles declare: a remote that does not verify what it hands out
DOUBLE = Capabilities(is_remote=True, can_list=False, verifies_reads=False)


class LyingBlobs(BlobService):
    """A remote double over memory that can corrupt a chunk or answer made-up chunk lists."""

    capabilities = DOUBLE

    def __init__(self) -> None:
        self.inner = MemoryBlobService()
        self.corrupt: set[B3Digest] = set()
        self.lists: dict[B3Digest, list[ChunkMeta]] = {}

    def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        return self.lists[digest] if digest in self.lists else self.inner.chunks(digest)

    def read_chunk(self, digest: B3Digest) -> bytes | None:
        data = self.inner.read_chunk(digest)
        if data is not None and digest in self.corrupt:
            data = bytes([data[0] ^ 1]) + data[1:]
        return data

    def open_write(self) -> BlobWriter:
        return self.inner.open_write()


class LyingDirectories(DirectoryService):
    """A remote double that answers a different Directory for some digests."""

    capabilities = DOUBLE

    def __init__(self) -> None:
        self.inner = MemoryDirectoryService()
        self.swap: dict[B3Digest, Directory] = {}

    def get(self, digest: B3Digest) -> Directory | None:
        return self.swap.get(digest) or self.inner.get(digest)

    def _store(self, directory: Directory) -> None:
        self.inner._store(directory)


class LyingPathInfos(MemoryPathInfoService):
    capabilities = DOUBLE


def lying(tmp_path: Path) -> tuple[Store, LyingBlobs, LyingDirectories, LyingPathInfos]:
    b, d = LyingBlobs(), LyingDirectories()
    p = LyingPathInfos(b, d)
    return with_cache(Store(b, d, p, "liar://"), tmp_path / "c", 1 << 20), b, d, p


def test_remote_chunk_with_wrong_bytes_is_rejected_and_not_cached(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store, far, _, _ = lying(tmp_path)
    data = random_bytes(10_000, seed=4)
    dg = far.inner.put(data)
    far.corrupt.add(dg)
    try:
        with pytest.raises(IntegrityError, match=dg.hex()):
            store.blobs.read_chunk(dg)
        assert dg.hex() in caplog.text
        store.blobs.prefetch([dg])  # a prefetch of it does not cache it either
        c = idle(store)
        assert c["verify_failures"] == 2 and not cached_chunks(tmp_path / "c")
        far.corrupt.clear()  # an honest answer later is accepted
        assert store.blobs.read_chunk(dg) == data
    finally:
        store.close()


def test_remote_chunk_lists_are_checked(tmp_path: Path) -> None:
    store, far, _, _ = lying(tmp_path)
    a = far.inner.put(random_bytes(1000, seed=5))
    b = far.inner.put(random_bytes(2000, seed=6))
    far.lists = {
        B3Digest.of(random_bytes(3000, seed=7)): [ChunkMeta(a, 1000), ChunkMeta(b, 0)],  # a zero-size chunk
        B3Digest.of(b"x"): [ChunkMeta(a, 1000)],  # one chunk that is not the blob itself
        B3Digest.of(b"y"): [],  # empty list for a non-empty blob
        EMPTY_DIGEST: [ChunkMeta(a, 1000)],  # chunks for the empty blob
    }
    try:
        for d in far.lists:
            with pytest.raises(IntegrityError, match=d.hex()):
                store.blobs.chunks(d)
        assert os.listdir(tmp_path / "c" / "blobs") == []
        assert store.counters.get("verify_failures") == 4
    finally:
        store.close()


def test_sequential_read_detects_chunks_that_do_not_add_up(tmp_path: Path) -> None:
    store, far, _, _ = lying(tmp_path)
    a = far.inner.put(random_bytes(1000, seed=5))
    b = far.inner.put(random_bytes(2000, seed=6))
    good = random_bytes(1000, seed=5) + random_bytes(2000, seed=6)
    g = B3Digest.of(good)
    bad = B3Digest.of(random_bytes(3000, seed=8))
    far.lists = {g: [ChunkMeta(a, 1000), ChunkMeta(b, 2000)], bad: [ChunkMeta(a, 1000), ChunkMeta(b, 2000)]}
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
    store, _, dirs, infos = lying(tmp_path)
    leaf = Directory(files=(FileNode(b"f", B3Digest.of(b"f"), 1),))
    other = Directory(files=(FileNode(b"g", B3Digest.of(b"g"), 1),))
    root = Directory(directories=(leaf.as_node(b"sub"),))
    dirs.inner.put_graph([leaf, root])
    dirs.swap[leaf.digest] = other
    try:
        with pytest.raises(IntegrityError, match=leaf.digest.hex()):
            store.directories.get(leaf.digest)
        with pytest.raises(IntegrityError):
            list(store.directories.get_recursive(root.digest))
        # what verified (the root, received first) is kept; the swapped leaf never is
        kept = {p.name for p in (tmp_path / "c" / "directories").rglob("*") if p.is_file()}
        assert kept == {root.digest.hex()}
        dirs.swap.clear()
        assert store.directories.get(root.digest) == root
        assert list(store.directories.get_recursive(root.digest)) == [root, leaf]
        # a PathInfo filed under another store path's hash
        sp1 = StorePath.parse_basename("00bgd045z0d4icpbc2yyz4gx48ak44la-one")
        sp2 = StorePath.parse_basename("11bgd045z0d4icpbc2yyz4gx48ak44la-two")
        info = PathInfo(root.as_node(sp2.basename.encode()))
        infos._infos[sp1.digest] = info
        with pytest.raises(IntegrityError, match=sp1.digest.hex()):
            store.pathinfos.get(sp1.digest)
        assert os.listdir(tmp_path / "c" / "pathinfos") == []
        infos._infos[sp2.digest] = info
        assert store.pathinfos.get(sp2.digest) == info
        assert store.counters.get("verify_failures") == 3
    finally:
        store.close()


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
    chunks = {bytes(dg): [ChunkMeta(dg, 50_000)], bytes(zero): [ChunkMeta(a, 10), ChunkMeta(dg, 0)]}
    other = Directory(files=(FileNode(b"x", dg, 50_000),))
    asked = Directory(files=(FileNode(b"y", dg, 50_000),))
    server = grpc.server(futures.ThreadPoolExecutor(4))
    rpc_blobstore_pb2_grpc.add_BlobServiceServicer_to_server(
        LyingBlobServicer(chunks, {bytes(dg): bytes(wrong)}), server
    )
    rpc_directory_pb2_grpc.add_DirectoryServiceServicer_to_server(LyingDirectoryServicer(other), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    store = cached(f"grpc+http://127.0.0.1:{port}", tmp_path / "c", 1 << 20, timeout=2)
    try:
        assert store.blobs.chunks(dg) == [ChunkMeta(dg, 50_000)]
        with pytest.raises(IntegrityError, match=dg.hex()):
            store.blobs.read_chunk(dg)
        with pytest.raises(IntegrityError, match=zero.hex()):
            store.blobs.chunks(zero)
        with pytest.raises(IntegrityError):
            store.directories.get(asked.digest)
        assert not cached_chunks(tmp_path / "c")
        assert os.listdir(tmp_path / "c" / "directories") == []
        assert os.listdir(tmp_path / "c" / "blobs") == [dg.hex()[:2]]  # the one honest chunk list
        c = store.counters.snapshot()
        assert c["verify_failures"] == 3 and c["remote_down"] == 0
    finally:
        store.close()
        server.stop(None)
