"""A real mount of a remote store with the persistent cache: laziness on the wire, faults, bound.

The daemon and each mount are separate processes (`tvix-store daemon`, `tvix-store mount
--store grpc+http://… --cache-dir D --cache-size N --timeout 2`); tests/tcpproxy.py sits
between them to count the bytes that really cross the wire and to stall or drop the remote.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import GUARANTEE_SLACK, Daemon, cli
from fixtures import coexisting_disk_use, make_tree, random_bytes
from mountutil import MountProc, is_mounted, pids_serving, requires_fuse, wait_until
from tcpproxy import TcpProxy

from tvix_store.blobservice import BlobService, BlobWriter
from tvix_store.compose import open_store
from tvix_store.core.capabilities import Capabilities
from tvix_store.core.chunks import ChunkMeta
from tvix_store.core.digest import B3Digest
from tvix_store.core.pathinfo import StorePath
from tvix_store.objects.files import FileObjectStore
from tvix_store.serve.grpc import StoreServer
from tvix_store.store import Store
from tvix_store.verify import verify_objects

pytestmark = [pytest.mark.mount, requires_fuse]

BIG = 64 << 20
TIMEOUT = 2.0
MiB = 1 << 20


@dataclass
class Remote:
    store_dir: Path
    daemon: Daemon
    port: int
    big: bytes
    big_digest: B3Digest
    tree: Path
    store_path: str  # basename of the imported tree

    def restart(self) -> None:
        """(Re)start the daemon on the same port (after a test killed it)."""
        if self.daemon.proc.poll() is None:
            return
        deadline = time.monotonic() + 20
        while True:
            try:
                self.daemon = Daemon(f"local://{self.store_dir}", listen=f"127.0.0.1:{self.port}")
                return
            except AssertionError:  # the port may still be held for a moment
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Remote]:
    base = tmp_path_factory.mktemp("remote")
    store_dir = base / "daemon-store"
    d = Daemon(f"local://{store_dir}")
    r = Remote(store_dir, d, int(d.address.rsplit(":", 1)[1]), b"", B3Digest.of(b""), base / "tree", "")
    try:
        r.big = random_bytes(BIG, seed=1234)
        with open_store(d.url) as s:
            r.big_digest = s.blobs.put(r.big)
        make_tree(r.tree)
        for i in range(20):
            (r.tree / f"f{i}.bin").write_bytes(random_bytes(30_000 + i * 7000, seed=i))
        out = cli("import", "--store", d.url, str(r.tree)).stdout.decode().strip()
        r.store_path = out.rsplit("/", 1)[1]
        yield r
    finally:
        r.daemon.stop()


@pytest.fixture
def proxy(remote: Remote) -> Iterator[TcpProxy]:
    remote.restart()
    with TcpProxy(remote.port) as px:
        yield px


def mount(tmp_path: Path, url: str, cache: Path, size: str = "256M", name: str = "mnt", *extra: str) -> MountProc:
    mnt = tmp_path / name
    mnt.mkdir(exist_ok=True)
    return MountProc(mnt, url, "--cache-dir", str(cache), "--cache-size", size, "--timeout", str(TIMEOUT), *extra)


def stat_counter(mnt: Path, name: str) -> int:
    return int(os.getxattr(mnt, f"user.tvix.stats.{name}"))


def pread_random(path: Path, off: int, n: int) -> bytes:
    """One plain read at an offset, as any program does it (no fadvise): the kernel's own
    read-ahead counts against the wire budget too."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, n, off)
    finally:
        os.close(fd)


def read_tree(root: Path) -> dict[str, bytes]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            if not p.is_symlink():
                out[str(p.relative_to(root))] = p.read_bytes()
    return out


def idle(mnt: Path, timeout: float = 30) -> None:
    """Wait until the mount's background work is over: no fetch in flight, no prefetch or
    read-ahead pending, nothing waiting to be written to the cache (explicit gauges).

    The gauges are read one at a time, so in the order work flows (a stage counts what it hands
    on before it stops counting itself): the walk-order read-ahead and the chunk read-ahead,
    then prefetches, fetches in flight, writes. Read the other way round, a walk that queues
    its prefetches between two reads looks idle (it did: 349 prefetches still pending)."""
    gauges = ("mount.walk_pending", "mount.readahead_pending", "prefetch_pending", "in_flight", "write_pending")
    wait_until(lambda: all(stat_counter(mnt, g) == 0 for g in gauges), timeout, "the mount to go idle")


def expect_eio(fn: object, within: float) -> float:
    """`fn` fails with EIO, within `within` seconds (a deadline the mount guarantees)."""
    t = time.monotonic()
    with pytest.raises(OSError) as ei:
        fn()  # type: ignore[operator]
    took = time.monotonic() - t
    assert ei.value.errno == errno.EIO, ei.value
    assert took < within, f"EIO took {took:.1f} s"
    return took


def expect_fast_eio(fn: object) -> None:
    """EIO without waiting for a deadline: the remote is known to be down (fail fast)."""
    expect_eio(fn, within=TIMEOUT)


# --- laziness --------------------------------------------------------------------------


def test_stat_moves_metadata_and_random_read_moves_about_what_it_reads(
    tmp_path: Path, remote: Remote, proxy: TcpProxy
) -> None:
    m = mount(tmp_path, proxy.url, tmp_path / "cache")
    try:
        blob = m.mountpoint / "blobs" / remote.big_digest.hex()
        assert os.stat(blob).st_size == BIG
        sp = m.mountpoint / "store" / remote.store_path
        assert sorted(os.listdir(sp)) == sorted(os.listdir(remote.tree))
        assert os.stat(sp / "f3.bin").st_size == 30_000 + 3 * 7000
        assert proxy.total < 64 << 10, f"stat moved {proxy.total} bytes"

        proxy.reset_counts()
        off = random.Random(5).randrange(BIG - MiB)
        assert pread_random(blob, off, MiB) == remote.big[off : off + MiB]
        idle(m.mountpoint)
        wire = proxy.total
        fetched = stat_counter(m.mountpoint, "bytes_fetched")
        assert MiB <= fetched <= wire, (fetched, wire)  # counted where it crossed the wire
        assert stat_counter(m.mountpoint, "chunks_fetched") >= 1
        assert wire <= 2 * MiB, f"1 MiB random read moved {wire / MiB:.2f} MiB"
    finally:
        m.cleanup()


# --- faults: stalled, dropped, killed remote -----------------------------------------------


def test_stalled_remote_is_eio_within_timeout_then_fast_and_recovers(
    tmp_path: Path, remote: Remote, proxy: TcpProxy
) -> None:
    m = mount(tmp_path, proxy.url, tmp_path / "cache")
    try:
        blob = m.mountpoint / "blobs" / remote.big_digest.hex()
        assert pread_random(blob, 0, MiB) == remote.big[:MiB]
        proxy.mode = "stall"
        expect_eio(lambda: pread_random(blob, 40 * MiB, 4096), within=TIMEOUT + GUARANTEE_SLACK)
        assert stat_counter(m.mountpoint, "remote_down") == 1
        expect_fast_eio(lambda: pread_random(blob, 50 * MiB, 4096))  # fails fast while down
        assert pread_random(blob, 0, 4096) == remote.big[:4096]  # what was read keeps working
        proxy.mode = "pass"
        deadline = time.monotonic() + 20
        while True:  # recovers by itself, no remount
            try:
                assert pread_random(blob, 50 * MiB, 4096) == remote.big[50 * MiB : 50 * MiB + 4096]
                break
            except OSError:
                assert time.monotonic() < deadline, "mount did not recover"
                time.sleep(0.2)
        assert stat_counter(m.mountpoint, "remote_down") == 0
        # stalled again: unmounting still works promptly
        proxy.mode = "stall"
        expect_eio(lambda: pread_random(blob, 60 * MiB, 4096), within=TIMEOUT + GUARANTEE_SLACK)
        subprocess.run(["fusermount3", "-u", str(m.mountpoint)], check=True, timeout=10)
        assert m.proc.wait(15) == 0
    finally:
        m.cleanup()


def test_killed_remote_mid_read_is_eio_and_mount_recovers_after_restart(
    tmp_path: Path, remote: Remote, proxy: TcpProxy
) -> None:
    m = mount(tmp_path, proxy.url, tmp_path / "cache")
    try:
        blob = m.mountpoint / "blobs" / remote.big_digest.hex()
        got = bytearray()
        err: list[OSError] = []
        killed_at: list[float] = []
        failed_at: list[float] = []

        def reader() -> None:
            with open(blob, "rb", buffering=0) as f:
                while True:
                    try:
                        b = f.read(256 << 10)
                    except OSError as e:
                        failed_at.append(time.monotonic())
                        err.append(e)
                        return
                    if not b:
                        return
                    got.extend(b)
                    if len(got) >= 8 * MiB and not killed_at:
                        remote.daemon.proc.kill()  # SIGKILL: no goodbye on the wire
                        remote.daemon.proc.wait()
                        killed_at.append(time.monotonic())

        t = threading.Thread(target=reader)
        t.start()
        t.join(60)
        assert not t.is_alive(), "reader hung"
        assert err and err[0].errno == errno.EIO, err
        assert failed_at[0] - killed_at[0] < TIMEOUT + GUARANTEE_SLACK
        assert bytes(got) == remote.big[: len(got)]  # never a wrong byte
        expect_fast_eio(lambda: pread_random(blob, 60 * MiB, 4096))
        remote.restart()  # same port: the mount finds it again by itself
        deadline = time.monotonic() + 20
        while True:
            try:
                assert pread_random(blob, 60 * MiB, MiB) == remote.big[60 * MiB : 61 * MiB]
                break
            except OSError:
                assert time.monotonic() < deadline, "mount did not recover after the daemon restarted"
                time.sleep(0.2)
        # dropped connections (through the proxy) behave the same
        proxy.mode = "drop"
        expect_eio(lambda: pread_random(blob, 30 * MiB, 4096), within=TIMEOUT + GUARANTEE_SLACK)
        proxy.mode = "pass"
        deadline = time.monotonic() + 20
        while True:
            try:
                assert pread_random(blob, 30 * MiB, 4096) == remote.big[30 * MiB : 30 * MiB + 4096]
                break
            except OSError:
                assert time.monotonic() < deadline, "mount did not recover after drop"
                time.sleep(0.2)
    finally:
        m.cleanup()
        remote.restart()


# --- the cache: bound, persistence, concurrency ----------------------------------------------


@pytest.mark.slow
def test_cache_bound_is_held_while_reading_more_than_fits(tmp_path: Path, remote: Remote, proxy: TcpProxy) -> None:
    cache = tmp_path / "cache"
    limit = 8 * MiB
    m = mount(tmp_path, proxy.url, cache, size="8M")
    over: list[int] = []
    stop = threading.Event()

    # The cache charges each chunk its size rounded up to 4 KiB and keeps that sum <= limit
    # exactly (cache_bytes, asserted below). st_blocks may briefly show a little more while
    # ext4 holds delayed-allocation reservations for a file being written: allow 64 KiB.
    fs_slack = 64 << 10

    def watch() -> None:
        while not stop.is_set():
            if (u := coexisting_disk_use(cache)) > limit + fs_slack:
                over.append(u)
            time.sleep(0.005)

    w = threading.Thread(target=watch)
    w.start()
    try:
        with open(m.mountpoint / "blobs" / remote.big_digest.hex(), "rb") as f:
            assert f.read() == remote.big
    finally:
        stop.set()
        w.join()
    try:
        assert not over, f"cache used {max(over)} bytes on disk, bound {limit}"
        assert 0 < stat_counter(m.mountpoint, "cache_bytes") <= limit
        assert stat_counter(m.mountpoint, "cache_evictions") > 0
        assert coexisting_disk_use(cache) <= limit + fs_slack
    finally:
        m.cleanup()


def test_cache_survives_remount_and_serves_with_the_remote_gone(
    tmp_path: Path, remote: Remote, proxy: TcpProxy
) -> None:
    cache = tmp_path / "cache"
    region = (10 * MiB, 14 * MiB)
    m = mount(tmp_path, proxy.url, cache)
    try:
        sp = m.mountpoint / "store" / remote.store_path
        first = read_tree(sp)
        assert first == read_tree(remote.tree)
        blob = m.mountpoint / "blobs" / remote.big_digest.hex()
        assert pread_random(blob, region[0], region[1] - region[0]) == remote.big[region[0] : region[1]]
        idle(m.mountpoint)  # let prefetches started by the sequential read land in the cache
    finally:
        m.cleanup()
    assert not list((cache / "tmp").iterdir())

    # a second mount, same cache: no call crosses the wire, even though the remote is up
    with TcpProxy(remote.port) as px2:
        m = mount(tmp_path, px2.url, cache, name="mnt2")
        try:
            sp = m.mountpoint / "store" / remote.store_path
            assert read_tree(sp) == first
            blob = m.mountpoint / "blobs" / remote.big_digest.hex()
            assert pread_random(blob, region[0], region[1] - region[0]) == remote.big[region[0] : region[1]]
            # one call, the look-up that checks the remote is reachable when the mount starts
            assert px2.grpc_calls == 1 and px2.total < 2048, f"{px2.grpc_calls} calls, {px2.total} bytes"
            assert stat_counter(m.mountpoint, "chunks_fetched") == 0
        finally:
            m.cleanup()

    # and with the remote gone (connections dropped): still served, uncached data is EIO
    proxy.mode = "drop"
    proxy.reset_counts()
    m = mount(tmp_path, proxy.url, cache, name="mnt3")
    try:
        sp = m.mountpoint / "store" / remote.store_path
        assert read_tree(sp) == first
        blob = m.mountpoint / "blobs" / remote.big_digest.hex()
        assert pread_random(blob, region[0], MiB) == remote.big[region[0] : region[0] + MiB]
        expect_eio(lambda: pread_random(blob, 40 * MiB, 4096), within=TIMEOUT + GUARANTEE_SLACK)
        assert proxy.total == 0
    finally:
        m.cleanup()


def test_16_concurrent_readers(tmp_path: Path, remote: Remote, proxy: TcpProxy) -> None:
    m = mount(tmp_path, proxy.url, tmp_path / "cache", size="16M")
    try:
        blob = m.mountpoint / "blobs" / remote.big_digest.hex()
        sp = m.mountpoint / "store" / remote.store_path
        want_tree = read_tree(remote.tree)

        def worker(i: int) -> int:
            rng = random.Random(i)
            n = 0
            for _ in range(6):
                off = rng.randrange(BIG - 300_000)
                size = rng.randrange(1, 300_000)
                assert pread_random(blob, off, size) == remote.big[off : off + size]
                n += size
            name = f"f{i % 20}.bin"
            assert (sp / name).read_bytes() == want_tree[name]
            return n

        with futures.ThreadPoolExecutor(16) as ex:
            total = sum(ex.map(worker, range(16)))
        assert total > 0
        assert stat_counter(m.mountpoint, "verify_failures") == 0
        m.proc.send_signal(signal.SIGUSR1)  # logs the counters; the mount keeps serving
        assert os.stat(blob).st_size == BIG
    finally:
        m.cleanup()


# --- metadata under faults, lying remotes, corrupt cache, two mounts, a killed mount ----------


def test_metadata_of_uncached_paths_is_eio_within_the_timeout(tmp_path: Path, remote: Remote, proxy: TcpProxy) -> None:
    """Look-up, stat and listing of what the cache does not hold, with the remote stalled and
    then killed: EIO within --timeout (plus slack), never a hang; what is cached still works
    (a store path's whole Directory closure is fetched with its first look-up)."""
    other = tmp_path / "other"
    (other / "d1" / "d2").mkdir(parents=True)
    (other / "d1" / "d2" / "f").write_bytes(b"x")
    other_sp = cli("import", "--store", remote.daemon.url, str(other)).stdout.decode().strip().rsplit("/", 1)[1]
    with open_store(remote.daemon.url) as s:
        info = s.pathinfos.get(StorePath.parse_basename(other_sp).digest)
        assert info is not None and info.node is not None
        other_root = info.node.digest.hex()  # type: ignore[union-attr]
    m = mount(tmp_path, proxy.url, tmp_path / "cache")
    try:
        store_dir = m.mountpoint / "store"
        sp = store_dir / remote.store_path
        assert "f3.bin" in os.listdir(sp)
        # the closure streams in after the first look-up returns: a look-up below waits for it
        # (no call of its own), so once this answers the whole closure is in
        assert sorted(os.listdir(sp / "sub" / "deeper")) == ["data.bin"]
        proxy.mode = "stall"
        expect_eio(lambda: os.stat(store_dir / other_sp), within=TIMEOUT + GUARANTEE_SLACK)
        expect_fast_eio(lambda: os.listdir(m.mountpoint / "directories" / other_root))
        expect_fast_eio(lambda: os.stat(m.mountpoint / "blobs" / ("ab" * 32)))
        assert sorted(os.listdir(sp / "sub" / "deeper")) == ["data.bin"]  # the closure is cached
        proxy.mode = "pass"
        wait_until(lambda: stat_counter(m.mountpoint, "remote_down") == 0, 20, "recovery")
        remote.daemon.proc.kill()
        remote.daemon.proc.wait()
        expect_eio(lambda: os.listdir(m.mountpoint / "directories" / other_root), within=TIMEOUT + GUARANTEE_SLACK)
        expect_fast_eio(lambda: os.stat(store_dir / other_sp))
        assert (sp / "f3.bin").stat().st_size == 30_000 + 3 * 7000
    finally:
        m.cleanup()
        remote.restart()


def test_a_mount_of_an_unreachable_remote_with_an_empty_cache_answers_eio(tmp_path: Path) -> None:
    """Started with nothing listening and nothing cached, with `--offline-ok`: the mount comes
    up and every access that needs the remote is EIO within the timeout."""
    with TcpProxy(1) as px:  # port 1: refused
        px.mode = "drop"
        m = mount(tmp_path, px.url, tmp_path / "cache", "256M", "mnt", "--offline-ok")
        try:
            expect_eio(lambda: os.stat(m.mountpoint / "store" / ("0" * 32 + "-x")), within=TIMEOUT + GUARANTEE_SLACK)
            expect_eio(lambda: os.stat(m.mountpoint / "blobs" / ("cd" * 32)), within=TIMEOUT + GUARANTEE_SLACK)
            assert sorted(os.listdir(m.mountpoint)) == ["blobs", "directories", "store"]
        finally:
            m.cleanup()


def test_a_mount_of_an_unreachable_remote_fails_unless_offline_ok(tmp_path: Path) -> None:
    """Nothing listening, nothing cached, no `--offline-ok`: one line, exit 1, nothing mounted
    (background mode, as a user runs it), within the timeout."""
    with TcpProxy(1) as px:  # port 1: refused
        px.mode = "drop"
        mp = tmp_path / "mnt"
        mp.mkdir()
        t = time.monotonic()
        p = cli(
            "mount", "--store", px.url, "--cache-dir", str(tmp_path / "cache"), "--timeout", str(TIMEOUT), str(mp),
            check=False, timeout=60,
        )  # fmt: skip
        took = time.monotonic() - t
        err = p.stderr.decode()
        assert p.returncode == 1 and err.count("\n") == 1 and "not mounted (--offline-ok" in err, err
        assert px.url.split("//")[1] in err  # names the remote
        assert took < 3 * TIMEOUT + GUARANTEE_SLACK, took
        assert not is_mounted(mp) and not pids_serving(mp)


class CorruptingBlobs(BlobService):
    """A remote's blob service (fault injection) that hands out one chunk with a flipped bit and
    does not check it, as a broken or malicious server would."""

    capabilities = Capabilities(can_list=False, verifies_reads=False)

    def __init__(self, inner: BlobService, bad: B3Digest) -> None:
        self.inner = inner
        self.bad = bad

    def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        return self.inner.chunks(digest)

    def read_chunk(self, digest: B3Digest) -> bytes | None:
        data = self.inner.read_chunk(digest)
        if data is not None and digest == self.bad:
            data = data[:100] + bytes([data[100] ^ 1]) + data[101:]
        return data

    def open_write(self) -> BlobWriter:
        return self.inner.open_write()


def test_a_corrupted_chunk_from_the_remote_is_eio_through_a_real_mount_and_never_cached(tmp_path: Path) -> None:
    base = open_store("memory://")
    data = random_bytes(3 * MiB, seed=77)
    dg = base.blobs.put(data)
    chunks = base.blobs.chunks(dg)
    assert chunks is not None
    good = base.blobs.put(random_bytes(300_000, seed=78))
    bad = chunks[0].digest  # a memory store has no finer chunking: the whole blob
    server = StoreServer(Store(CorruptingBlobs(base.blobs, bad), base.directories, base.pathinfos))
    address = server.bind("127.0.0.1:0")
    server.start()
    cache = tmp_path / "cache"
    m = mount(tmp_path, f"grpc+http://{address}", cache)
    try:
        expect_eio(lambda: pread_random(m.mountpoint / "blobs" / dg.hex(), 0, 4096), within=TIMEOUT + GUARANTEE_SLACK)
        assert pread_random(m.mountpoint / "blobs" / good.hex(), 0, 300_000) == random_bytes(300_000, seed=78)
        idle(m.mountpoint)
        assert stat_counter(m.mountpoint, "verify_failures") >= 1
        cached = {p.name for p in (cache / "chunks").rglob("*") if p.is_file()}
        assert good.hex() in cached and bad.hex() not in cached
    finally:
        m.cleanup()
        server.stop(0)


def test_cache_files_corrupted_under_a_live_mount_are_fetched_again(
    tmp_path: Path, remote: Remote, proxy: TcpProxy
) -> None:
    cache = tmp_path / "cache"
    m = mount(tmp_path, proxy.url, cache)
    try:
        f = m.mountpoint / "store" / remote.store_path / "f5.bin"
        want = (remote.tree / "f5.bin").read_bytes()
        assert f.read_bytes() == want
        idle(m.mountpoint)
        obj = cache / "chunks" / B3Digest.of(want).hex()[:2] / B3Digest.of(want).hex()
        obj.write_bytes(b"rotten" + obj.read_bytes()[6:])
        # push the file out of the mount's own 32 MiB chunk buffer and the kernel's page cache,
        # so the next read has to go to the cache directory
        with open(m.mountpoint / "blobs" / remote.big_digest.hex(), "rb") as big:
            assert big.read(40 * MiB) == remote.big[: 40 * MiB]
        idle(m.mountpoint)
        subprocess.run(["sh", "-c", "sync; echo 1 > /proc/sys/vm/drop_caches"], check=True)
        proxy.reset_counts()
        assert f.read_bytes() == want
        assert proxy.grpc_calls >= 1  # fetched again over the wire
        assert stat_counter(m.mountpoint, "cache_corrupt") == 1
        idle(m.mountpoint)
        assert obj.read_bytes() == want  # and the cache holds the good bytes again
    finally:
        m.cleanup()


def test_two_mounts_on_one_cache_dir_the_second_is_read_only(tmp_path: Path, remote: Remote, proxy: TcpProxy) -> None:
    """The first mount owns the cache (its accounting must be exact); a second one serves what
    is cached and fetches the rest, but writes nothing into the directory."""
    cache = tmp_path / "cache"
    first = mount(tmp_path, proxy.url, cache)
    second: MountProc | None = None
    try:
        sp1 = first.mountpoint / "store" / remote.store_path
        assert (sp1 / "f1.bin").read_bytes() == (remote.tree / "f1.bin").read_bytes()
        idle(first.mountpoint)
        before = sorted(p.relative_to(cache) for p in cache.rglob("*"))
        second = mount(tmp_path, proxy.url, cache, name="mnt2")
        assert "read-only" in second.log
        sp2 = second.mountpoint / "store" / remote.store_path
        proxy.reset_counts()
        assert (sp2 / "f1.bin").read_bytes() == (remote.tree / "f1.bin").read_bytes()
        assert proxy.grpc_calls == 0  # served from the shared cache
        assert (sp2 / "f2.bin").read_bytes() == (remote.tree / "f2.bin").read_bytes()  # fetched, not kept
        idle(second.mountpoint)
        assert sorted(p.relative_to(cache) for p in cache.rglob("*")) == before
    finally:
        if second is not None:
            second.cleanup()
        first.cleanup()


@pytest.mark.slow
def test_a_mount_killed_while_filling_its_cache_leaves_a_consistent_bounded_cache(
    tmp_path: Path, remote: Remote, proxy: TcpProxy
) -> None:
    cache = tmp_path / "cache"
    limit = 24 * MiB
    m = mount(tmp_path, proxy.url, cache, size="24M")
    blob = m.mountpoint / "blobs" / remote.big_digest.hex()
    reader = subprocess.Popen(["cat", str(blob)], stdout=subprocess.DEVNULL)
    try:
        wait_until(lambda: stat_counter(m.mountpoint, "chunks_fetched") >= 8, 60, "the cache to fill")
        m.proc.kill()
        assert m.proc.wait(15) == -signal.SIGKILL
    finally:
        reader.kill()
        reader.wait()
        m.cleanup()
    # reopened by its next owner: temp files gone, every object whole, accounting = disk, bound held
    with open_store(proxy.url, cache_dir=cache, cache_size=limit) as s:
        assert not list((cache / "tmp").iterdir())
        assert s.counters.get("cache_bytes") == coexisting_disk_use(cache) <= limit
    rep = verify_objects(FileObjectStore(cache), complete=False)
    assert rep.ok, rep.problems
    assert rep.chunks > 0


# --- remote without round trips: calls and bytes counted at a delaying proxy ----------------


@pytest.fixture
def slow(remote: Remote) -> Iterator[TcpProxy]:
    """The remote behind a link of 10 ms round trip."""
    remote.restart()
    with TcpProxy(remote.port, delay=0.005) as px:
        yield px


def walk_read(root: Path) -> dict[str, bytes]:
    """What `find | xargs cat` does: list everything first, then read the files in that order."""
    files = []
    for dirpath, dirs, names in os.walk(root):
        dirs.sort()
        for n in sorted(names):
            p = Path(dirpath) / n
            if not p.is_symlink():
                files.append(p)
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def test_ls_lr_of_a_store_path_is_two_calls_and_no_data(tmp_path: Path, remote: Remote, slow: TcpProxy) -> None:
    m = mount(tmp_path, slow.url, tmp_path / "cache")
    try:
        slow.reset_counts()
        out = subprocess.run(["ls", "-lR", str(m.mountpoint / "store" / remote.store_path)], capture_output=True)
        assert out.returncode == 0 and b"f19.bin" in out.stdout
        idle(m.mountpoint)
        assert slow.grpc_calls == 2  # its PathInfo and its whole Directory closure
        assert stat_counter(m.mountpoint, "chunks_fetched") == 0  # listing fetches no file data
    finally:
        m.cleanup()


def test_a_tree_read_fetches_each_file_once_ahead_of_the_reader(tmp_path: Path, remote: Remote, slow: TcpProxy) -> None:
    """`find | xargs cat` over a 10 ms link: every file arrives once, almost all of them fetched
    ahead by the walk-order read-ahead (read from memory when asked for), and the tree reads back
    exactly."""
    m = mount(tmp_path, slow.url, tmp_path / "cache")
    try:
        slow.reset_counts()
        got = walk_read(m.mountpoint / "store" / remote.store_path)
        assert got == walk_read(remote.tree)
        idle(m.mountpoint)
        reads = sum(1 for v in got.values() if v) + 0  # non-empty files need one Read each
        distinct = len({B3Digest.of(v) for v in got.values() if v})
        assert slow.grpc_calls <= 2 + distinct + 2, slow.grpc_calls  # path info, closure, a Read per blob
        assert stat_counter(m.mountpoint, "prefetch_hits") >= distinct - 4, reads
    finally:
        m.cleanup()


def test_one_small_file_read_moves_at_most_the_read_ahead_budget(
    tmp_path: Path, remote: Remote, slow: TcpProxy
) -> None:
    from tvix_store.readahead import WALK_BUDGET

    big_tree = tmp_path / "many"
    for d in range(20):
        (big_tree / f"d{d:02}").mkdir(parents=True)
        for i in range(40):
            (big_tree / f"d{d:02}" / f"f{i:02}").write_bytes(random_bytes(12_000, seed=d * 100 + i))
    sp = cli("import", "--store", remote.daemon.url, str(big_tree)).stdout.decode().strip().rsplit("/", 1)[1]
    total = 20 * 40 * 12_000
    assert total > 2 * WALK_BUDGET
    m = mount(tmp_path, slow.url, tmp_path / "cache")
    try:
        root = m.mountpoint / "store" / sp
        os.listdir(root / "d05")
        slow.reset_counts()
        assert (root / "d05" / "f10").read_bytes() == random_bytes(12_000, seed=510)
        idle(m.mountpoint)
        assert slow.down <= WALK_BUDGET + 12_000 + (64 << 10), slow.down  # the budget, the file, overhead
        seen = {
            c: stat_counter(m.mountpoint, c)
            for c in (
                "mount.walk_hints",
                "prefetch_started",
                "prefetch_dropped",
                "prefetch_skipped",
                "prefetch_failed",
                "chunks_fetched",
            )
        }
        assert slow.down >= WALK_BUDGET // 2, f"{slow.down} {seen}"  # and it did read ahead
    finally:
        m.cleanup()


def test_remote_killed_mid_prefetch_is_eio_within_the_timeout_then_recovers(
    tmp_path: Path, remote: Remote, slow: TcpProxy
) -> None:
    m = mount(tmp_path, slow.url, tmp_path / "cache")
    try:
        root = m.mountpoint / "store" / remote.store_path
        files = sorted(p for p in root.iterdir() if p.name.startswith("f") and p.name.endswith(".bin"))
        assert files[0].read_bytes() == (remote.tree / files[0].name).read_bytes()  # starts the read-ahead
        remote.daemon.proc.kill()
        remote.daemon.proc.wait()
        failed = 0
        for p in files[1:]:  # what arrived is served, the rest is EIO within the timeout
            try:
                assert p.read_bytes() == (remote.tree / p.name).read_bytes()
            except OSError as e:
                assert e.errno == errno.EIO
                failed += 1
        expect_eio(
            lambda: pread_random(m.mountpoint / "blobs" / remote.big_digest.hex(), 33 * MiB, 10),
            within=TIMEOUT + GUARANTEE_SLACK,
        )
        remote.restart()
        wait_until(lambda: stat_counter(m.mountpoint, "remote_down") == 0, 30, "recovery")
        for p in files:
            assert p.read_bytes() == (remote.tree / p.name).read_bytes()
    finally:
        m.cleanup()
        remote.restart()


def test_import_over_a_slow_link_gives_the_same_store_path(tmp_path: Path, remote: Remote) -> None:
    """Into a fresh daemon over a 10 ms link: the store path of a local import; the blobs go up
    in batches (a Stat and a Put per blob, many in flight); a re-import asks one question."""
    local = cli("import", "--store", f"local://{tmp_path / 'local'}", str(remote.tree)).stdout
    d = Daemon(f"local://{tmp_path / 'fresh'}")
    try:
        with TcpProxy(int(d.address.rsplit(":", 1)[1]), delay=0.005) as px:
            assert cli("import", "--store", px.url, str(remote.tree)).stdout == local
            blobs = len(
                {B3Digest.of(p.read_bytes()) for p in remote.tree.rglob("*") if p.is_file() and not p.is_symlink()}
            )
            assert px.grpc_calls <= 2 * blobs + 4  # Stat + Put per blob, PathInfo Get/Put, one Directory Put
            px.reset_counts()
            assert cli("import", "--store", px.url, str(remote.tree)).stdout == local
            assert px.grpc_calls == 1  # the path info says it is all there
    finally:
        d.stop()


def test_32_readers_of_a_stalled_remote_all_fail_within_timeout_plus_one_second(
    tmp_path: Path, remote: Remote, proxy: TcpProxy
) -> None:
    """Every read waits at most --timeout + 1 s (a deadline per FUSE request, not per remote
    call), however many requests queue behind the stalled ones."""
    m = mount(tmp_path, proxy.url, tmp_path / "cache")
    try:
        blob = m.mountpoint / "blobs" / remote.big_digest.hex()
        assert pread_random(blob, 0, 4096) == remote.big[:4096]  # the chunk list is cached now
        proxy.mode = "stall"
        took: list[float] = []
        errors: list[int] = []

        def reader(i: int) -> None:
            t = time.monotonic()
            try:
                pread_random(blob, (2 + i) * MiB + 17, 64 << 10)
            except OSError as e:
                errors.append(e.errno or 0)
            took.append(time.monotonic() - t)

        with futures.ThreadPoolExecutor(32) as ex:
            list(ex.map(reader, range(32)))
        print(f"32 readers of a stalled remote: slowest EIO after {max(took):.2f} s (deadline {TIMEOUT + 1:g} s)")
        assert errors == [errno.EIO] * 32
        assert max(took) < TIMEOUT + 1 + GUARANTEE_SLACK
    finally:
        proxy.mode = "pass"
        m.cleanup()
