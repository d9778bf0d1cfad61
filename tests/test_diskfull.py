"""A full disk, and temp files of dead writers, with real processes on a real small tmpfs.

- The embedded store (local, and a daemon's) answers a write that finds no room with
  RESOURCE_EXHAUSTED / one error line naming the store directory, stores nothing partial,
  keeps serving reads, and takes writes again once there is room (no restart).
- A persistent cache whose disk fills before `--cache-size` lowers its bound, warns once and
  keeps serving every read correctly from the remote.
- Temp files of dead writers are reclaimed while the store is open (the periodic sweep),
  never those of a write in progress.

Each tmpfs is mounted by the `tmpfs` fixture (root only) and always unmounted after the
processes using it have ended. No test waits by sleeping: readiness and sweeps are polled.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import blake3
import grpc
import pytest
from conftest import Daemon, cli, one_line_error
from fixtures import HELLO, coexisting_disk_use, make_tree
from mountutil import MountProc, requires_fuse, wait_until

from tvix_store.compose import open_store
from tvix_store.core.castore import Directory, FileNode
from tvix_store.core.chunks import ChunkMeta
from tvix_store.core.digest import B3Digest
from tvix_store.core.errors import ResourceExhaustedError
from tvix_store.core.pathinfo import PathInfo, StorePath
from tvix_store.objects.files import FileObjectStore
from tvix_store.protocol.g1 import rpc_blobstore_pb2 as rb
from tvix_store.protocol.g1 import rpc_blobstore_pb2_grpc as rbg
from tvix_store.verify import verify_objects

pytestmark = pytest.mark.slow

MiB = 1 << 20


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str, int], Path]]:
    """`tmpfs(name, mib)`: a fresh tmpfs of that size at tmp_path/name, unmounted at teardown
    (after the test's own cleanup has ended its processes; lazily if something still uses it)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted: list[Path] = []

    def make(name: str, mib: int) -> Path:
        d = tmp_path / name
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(d)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs: {r.stderr.decode(errors='replace').strip()}")
        mounted.append(d)
        return d

    try:
        yield make
    finally:
        for d in reversed(mounted):
            if subprocess.run(["umount", str(d)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(d)], capture_output=True)


def ballast(disk: Path, mib: int) -> Path:
    """A file taking `mib` MiB of the tmpfs: removing it makes room."""
    p = disk / "ballast"
    p.write_bytes(b"\0" * (mib * MiB))
    return p


def big_tree(root: Path, big: int, big_mib: int, small: int, small_kib: int, seed: int) -> Path:
    """`big` files of `big_mib` MiB and `small` files of `small_kib` KiB of random bytes."""
    rng = random.Random(seed)
    root.mkdir(parents=True)
    for i in range(big):
        (root / f"big{i}.bin").write_bytes(rng.randbytes(big_mib * MiB))
    sub = root / "small"
    sub.mkdir()
    for i in range(small):
        (sub / f"f{i:04}").write_bytes(rng.randbytes(small_kib * 1024))
    return root


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def temp_files(store: Path) -> list[str]:
    tmp = store / "tmp"
    return sorted(p.name for p in tmp.iterdir()) if tmp.exists() else []


# --- 1. disk full: RESOURCE_EXHAUSTED, one line, nothing partial, recovery -----------------


def test_import_into_a_daemon_whose_disk_is_full(tmp_path: Path, tmpfs: Callable[[str, int], Path]) -> None:
    """`import --store grpc+http://…` of a tree bigger than the daemon's 32 MiB tmpfs: exit 1
    with one line naming the full disk, quickly; the daemon logs one warning per failed call,
    no traceback; what was stored before is still served; once there is room (no restart), an
    import works; nothing partial is stored."""
    disk = tmpfs("disk", 32)
    weight = ballast(disk, 6)
    root = disk / "store"
    d = Daemon(f"local://{root}")
    try:
        before = make_tree(tmp_path / "before")
        first = cli("import", "--store", d.url, str(before)).stdout.decode().strip()
        data_bin = (before / "sub" / "deeper" / "data.bin").read_bytes()
        src = big_tree(tmp_path / "big", big=3, big_mib=10, small=200, small_kib=40, seed=1)  # ~38 MiB

        t = time.monotonic()
        p = cli("import", "--store", d.url, str(src), check=False, timeout=120)
        took = time.monotonic() - t
        line = one_line_error(p, 1, "no space left on device", str(root))
        print(f"full import failed after {took:.1f} s: {line}")
        assert took < 60, took  # failed, never hung

        # reads of what was stored before keep working
        with open_store(d.url) as s:
            digest = B3Digest.of(data_bin)
            assert s.blobs.size(digest) == len(data_bin)
            r = s.blobs.open_read(digest)
            assert r is not None and r.read() == data_bin
            sp = StorePath.parse(first)
            info = s.pathinfos.get(sp.digest)
            assert info is not None and info.store_path == sp
        assert cli("nar", "--store", d.url, first).stdout  # the whole tree renders

        # the failed calls left no temp file (once the daemon is done with them)
        wait_until(lambda: not temp_files(root), what="the daemon to drop the failed Puts' temp files")

        # room again: a new import works, with the same daemon
        weight.unlink()
        again = make_tree(tmp_path / "again", seed=9)
        (again / "extra.bin").write_bytes(os.urandom(2 * MiB))
        out = cli("import", "--store", d.url, str(again)).stdout.decode().strip()
        assert out.startswith("/nix/store/")
    finally:
        assert d.stop() == 0
    log = "".join(d.log)
    assert "Traceback" not in log, log
    full = [ln for ln in d.log if "no space left on device" in ln]
    assert full and all(" WARNING " in ln and str(root) in ln for ln in full), full
    assert not [ln for ln in d.log if " ERROR " in ln], log
    with open_store(f"local://{root}") as s:
        rep = verify_objects(s.blobs.objects)  # type: ignore[attr-defined]
        assert rep.ok, rep.problems


def test_import_into_a_full_local_store(tmp_path: Path, tmpfs: Callable[[str, int], Path]) -> None:
    """`import --store local://…` into a store on a full 32 MiB tmpfs: exit 1, one line, no
    traceback, no temp file left, the store verifies; once there is room, an import works."""
    disk = tmpfs("disk", 32)
    weight = ballast(disk, 6)
    root = disk / "store"
    url = f"local://{root}"
    keep = cli("blob", "put", "--store", url, "-", input=HELLO).stdout.decode().strip()
    src = big_tree(tmp_path / "big", big=3, big_mib=10, small=200, small_kib=40, seed=2)
    t = time.monotonic()
    p = cli("import", "--store", url, str(src), check=False, timeout=120)
    took = time.monotonic() - t
    line = one_line_error(p, 1, "no space left on device", str(root))
    print(f"full local import failed after {took:.1f} s: {line}")
    assert took < 60, took
    assert not temp_files(root)
    with open_store(url) as s:
        rep = verify_objects(s.blobs.objects)  # type: ignore[attr-defined]
        assert rep.ok, rep.problems
        assert s.blobs.read_chunk(B3Digest.from_hex(keep)) == HELLO
    weight.unlink()
    small = make_tree(tmp_path / "small", seed=3)
    assert cli("import", "--store", url, str(small)).stdout.decode().startswith("/nix/store/")


def test_every_kind_of_object_write_on_a_full_disk(
    tmpfs: Callable[[str, int], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunk, chunk list, Directory and PathInfo writes into a store whose disk is full fail, at
    the latest once the little room left in the pack's and the index's last pages is used, with
    ResourceExhaustedError naming the directory; what failed is not visible, what was stored
    stays, and once there is room again writes work. (The cache's one-file-per-object layout:
    a failing rename is the same error, no temp file left.)"""
    disk = tmpfs("disk", 2)
    root = disk / "store"
    with open_store(f"local://{root}") as s:
        blob = os.urandom(100_000)
        digest = s.blobs.put(blob)
        big = disk / "ballast"
        fd = os.open(big, os.O_WRONLY | os.O_CREAT, 0o644)
        try:  # fill the disk up to the last page
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError as e:
            assert e.errno == 28, e
        finally:
            os.close(fd)
        n = iter(range(1 << 30))

        def directory() -> Directory:
            return Directory(files=(FileNode(b"f%d" % next(n), digest, len(blob)),))

        def info() -> PathInfo:
            sp = StorePath.from_nar_sha256(B3Digest.of(b"%d" % next(n)), "full")
            return PathInfo(FileNode(sp.basename.encode(), digest, len(blob)))

        def chunk_list(d: B3Digest) -> None:
            s.blobs.put_chunk_list(d, [ChunkMeta(digest, 5)] * 2)

        attempts: list[tuple[str, Callable[[], object], Callable[[object], bool]]] = [
            ("chunk", lambda: os.urandom(200_000), lambda x: s.blobs.put(x)),  # type: ignore[arg-type]
            (
                "chunk list",
                lambda: B3Digest.of(b"%d" % next(n)),
                lambda d: s.blobs.put_chunk_list(d, [ChunkMeta(digest, 5)] * 2),
            ),  # type: ignore[arg-type]
            ("directory", directory, lambda d: s.directories.put(d)),  # type: ignore[arg-type]
            ("path info", info, lambda i: s.pathinfos.put(i)),  # type: ignore[arg-type]
        ]
        for what, make, write in attempts:
            for _ in range(2000):
                x = make()
                try:
                    write(x)
                except ResourceExhaustedError as e:
                    assert f"store directory {root}: no space left on device" in str(e)
                    break
            else:
                raise AssertionError(f"{what}: 2,000 writes into a full store all succeeded")
            if what == "directory":
                assert not s.directories.has(x.digest)  # type: ignore[attr-defined]
            if what == "path info":
                assert s.pathinfos.get(x.store_path.digest) is None  # type: ignore[attr-defined]
        assert s.blobs.read_chunk(digest) == blob
        big.unlink()
        d = directory()
        assert s.directories.put(d) == d.digest
        assert verify_objects(s.blobs.objects).ok  # type: ignore[attr-defined]

    # the cache's layout (one file per object): a rename that finds no room
    objects = FileObjectStore(disk / "cache", exclusive=True)

    def full_rename(a: str, b: str) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as mp:
        mp.setattr(os, "rename", full_rename)
        with pytest.raises(ResourceExhaustedError, match="no space left on device"):
            objects.put("chunks/" + "ab" * 32, b"data")
    assert not temp_files(disk / "cache") and not objects.has("chunks/" + "ab" * 32)
    objects.close()


# --- 2. a full cache disk lowers the cache's bound, warns once ---------------------------


def test_bounded_store_on_a_disk_smaller_than_its_bound(
    tmpfs: Callable[[str, int], Path], caplog: pytest.LogCaptureFixture
) -> None:
    """The object layer alone: puts into a 1 GiB bound on a 4 MiB tmpfs never raise; the first
    ENOSPC lowers the bound below the disk (one warning), the newest objects stay, and the
    bound then holds with no further disk-full failure."""
    from tvix_store.objects.bounded import BoundedObjectStore

    disk = tmpfs("cachedisk", 4)
    b = BoundedObjectStore(FileObjectStore(disk / "cache", exclusive=True), 1 << 30)
    try:
        keys = []
        with caplog.at_level("INFO", logger="tvix_store.cache"):
            for i in range(96):
                key = "chunks/" + blake3.blake3(b"%d" % i).hexdigest()
                b.put(key, os.urandom(128 * 1024))
                keys.append(key)
        full = [r for r in caplog.records if "cache disk full" in r.getMessage()]
        assert len(full) == 1 and full[0].levelname == "WARNING", [r.getMessage() for r in full]
        assert b.limit < 4 * MiB and b.used <= b.limit
        assert b.counters.get("cache_limit") == b.limit
        assert all(b.has(k) for k in keys[-8:])  # the newest were stored after the lowering
        assert not temp_files(disk / "cache")
    finally:
        b.close()


@requires_fuse
@pytest.mark.mount
def test_cache_on_a_disk_smaller_than_its_bound(tmp_path: Path, tmpfs: Callable[[str, int], Path]) -> None:
    """A mount of a daemon serving ~64 MiB with `--cache-dir` on a 16 MiB tmpfs and
    `--cache-size 1G`: every file reads back right, the mount logs exactly one warning about
    the full cache disk (no per-chunk warnings, no traceback), the bound in force drops below
    the disk, and the cache stays within it. A second mount over the same cache directory
    (reading in reverse order: what the first left cached comes first) does the same."""
    src = big_tree(tmp_path / "src", big=6, big_mib=8, small=512, small_kib=32, seed=4)  # 64 MiB
    want = files_of(src)
    total = sum(map(len, want.values()))
    store_root = tmp_path / "remote"
    sp = cli("import", "--store", f"local://{store_root}", str(src)).stdout.decode().strip()
    disk = tmpfs("cachedisk", 16)
    cache = disk / "cache"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    d = Daemon(f"local://{store_root}")
    logs: list[str] = []
    try:
        for rnd, order in enumerate((list(want), list(reversed(want)))):
            m = MountProc(
                mnt, d.url, "--cache-dir", str(cache), "--cache-size", "1G", log_path=tmp_path / f"mount{rnd}.log"
            )
            try:
                base = mnt / "store" / Path(sp).name
                t = time.monotonic()
                for rel in order:
                    assert (base / rel).read_bytes() == want[rel], (rnd, rel)
                    assert coexisting_disk_use(cache) <= 16 * MiB
                took = time.monotonic() - t

                def stat(name: str) -> int:
                    return int(os.getxattr(mnt, f"user.tvix.stats.{name}"))

                limit, used, fetched = stat("cache_limit"), stat("cache_bytes"), stat("bytes_fetched")
                print(f"mount {rnd}: read 64 MiB in {took:.1f} s; bound in force {limit / MiB:.1f} MiB, ", end="")
                print(f"holding {used / MiB:.1f} MiB, {fetched / MiB:.1f} MiB fetched")
                assert limit < 16 * MiB and used <= limit
                if rnd == 1:
                    assert fetched < total - 8 * MiB  # what the first mount left cached was served
                assert m.release()
            finally:
                m.cleanup()
            logs.append(m.log)
    finally:
        d.stop()
    for log in logs:
        lines = log.splitlines()
        full = [ln for ln in lines if "cache disk full" in ln]
        assert len([ln for ln in full if " WARNING " in ln]) == 1, log
        assert not [ln for ln in lines if "cannot cache" in ln], log
        assert "Traceback" not in log, log


# --- 3. temp files of dead writers vanish while the store is open -------------------------


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_dead_writers_torn_packs_are_sealed_while_the_daemon_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A running daemon (sweep every 0.5 s) reclaims, without a restart, the pack of a `blob put`
    killed with SIGKILL mid-write: sealed, its torn tail (staged chunks never indexed) cut; a Put
    the daemon is itself serving meanwhile is not disturbed and completes with the right digest."""
    import sqlite3

    monkeypatch.setenv("TVIX_TMP_SWEEP_SECONDS", "0.5")
    root = tmp_path / "store"
    url = f"local://{root}"
    d = Daemon(url)
    helper: subprocess.Popen[bytes] | None = None
    release = threading.Event()
    data = os.urandom(12 * MiB)
    sent_first = threading.Event()

    def packs_of(pid: int) -> list[tuple[int, int]]:
        db = sqlite3.connect(f"file:{root / 'index.sqlite'}?mode=ro", uri=True)
        try:
            return db.execute("SELECT id, sealed FROM packs WHERE pid=?", (pid,)).fetchall()
        finally:
            db.close()

    try:

        def requests() -> Iterator[rb.BlobChunk]:  # a Put the daemon serves: 6 MiB, then held open
            for off in range(0, 6 * MiB, MiB):
                yield rb.BlobChunk(data=data[off : off + MiB])
            sent_first.set()
            release.wait(60)
            for off in range(6 * MiB, len(data), MiB):
                yield rb.BlobChunk(data=data[off : off + MiB])

        ch = grpc.insecure_channel(d.address)
        fut = rbg.BlobServiceStub(ch).Put.future(requests(), timeout=60)
        assert sent_first.wait(10)
        wait_until(lambda: bool(packs_of(d.proc.pid)), what="the daemon's pack")

        helper = subprocess.Popen(  # a writer process killed mid-write
            [sys.executable, "-m", "tvix_store.cli", "blob", "put", "--store", url, "-"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        assert helper.stdin is not None
        helper.stdin.write(os.urandom(6 * MiB))
        helper.stdin.flush()

        def helper_pack_size() -> int:
            got = packs_of(helper.pid)  # type: ignore[union-attr]
            return (root / "packs" / f"{got[0][0]}.pack").stat().st_size if got else 0

        wait_until(lambda: helper_pack_size() > 2 * MiB, what="the helper's staged chunks")
        helper.kill()
        helper.wait()
        ((pack, sealed),) = packs_of(helper.pid)
        assert sealed == 0
        wait_until(lambda: packs_of(helper.pid) == [(pack, 1)], timeout=15, what="the sweep to seal it")
        assert (root / "packs" / f"{pack}.pack").stat().st_size == 0  # nothing of it was indexed

        release.set()
        resp = fut.result(timeout=30)
        assert resp.digest == blake3.blake3(data).digest()
        ch.close()
        with open_store(d.url) as s:
            r = s.blobs.open_read(B3Digest.of(data))
            assert r is not None and r.read() == data
    finally:
        release.set()
        if helper is not None and helper.poll() is None:
            helper.kill()
        assert d.stop() == 0
    with open_store(url) as s:
        assert verify_objects(s.blobs.objects).ok  # type: ignore[attr-defined]


def test_owner_of_an_exclusive_store_sweeps_every_other_temp_file(tmp_path: Path) -> None:
    """The owner of an exclusive store (a cache: it holds the LOCK) is its only writer: a temp
    file named by a live process is a leftover too; one it holds staged stays."""
    sleeper = subprocess.Popen(["sleep", "120"])
    try:
        ns = os.stat("/proc/self/ns/pid").st_ino
        shared = FileObjectStore(tmp_path / "shared")
        owned = FileObjectStore(tmp_path / "owned", exclusive=True)
        for s in (shared, owned):
            name = f"{ns}.{sleeper.pid}.0123456789ab.1"
            (s.root / "tmp" / name).write_bytes(b"x")
            staged = s.stage(b"staged bytes")
            s.clean_tmp()
            names = set(temp_files(s.root))
            assert (name in names) == (s is shared), names
            assert len(names - {name}) == 1  # the staged object
            staged.commit("chunks/" + blake3.blake3(b"staged bytes").hexdigest())
            s.close()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_tmp_sweep_interval_comes_from_the_environment() -> None:
    code = "from tvix_store.objects import files; print(files.SWEEP_INTERVAL)"
    env = {**os.environ, "TVIX_TMP_SWEEP_SECONDS": "2.5"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, check=True).stdout
    assert out.decode().strip() == "2.5"
    env["TVIX_TMP_SWEEP_SECONDS"] = "nonsense"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, check=True).stdout
    assert out.decode().strip() == "60.0"
