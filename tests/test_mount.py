"""Real FUSE mounts: `tvix-store mount` processes over a store shared between processes
(local:// when available, else a memory:// daemon reached over gRPC), checked with real
tools (b3sum, diff, dd) and syscalls. Every test leaves no mount and no process behind.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import random
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Daemon, cli
from fixtures import make_tree, random_bytes
from mountutil import MountProc, is_mounted, kill_serving, pids_serving, requires_fuse, unmount, wait_until

from tvix_store.compose import open_store
from tvix_store.core.castore import Directory, DirectoryNode, FileNode
from tvix_store.core.digest import B3Digest
from tvix_store.core.pathinfo import PathInfo, StorePath
from tvix_store.importer import import_path

pytestmark = [pytest.mark.mount, requires_fuse]


@dataclass
class Data:
    url: str
    store_dir: Path | None
    src: Path
    big: Path
    tree_name: str
    big_name: str
    hole_file: str
    hole_dir: str
    big_dir: str
    big_dir_names: list[str]


def _hole_name(tag: str) -> str:
    return StorePath.from_nar_sha256(hashlib.sha256(tag.encode()).digest(), tag).basename


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Data]:
    base = tmp_path_factory.mktemp("mountdata")
    src = make_tree(base / "src")
    (src / "sub" / "mid.bin").write_bytes(random_bytes(3 << 20, seed=11))
    big = base / "big.bin"
    big.write_bytes(random_bytes(5 << 20, seed=12))
    store_dir = base / "store"
    url = f"local://{store_dir}"
    with open_store(url) as store:
        tree = import_path(store, src)
        bigi = import_path(store, big)
        hf, hd = _hole_name("hole-file"), _hole_name("hole-dir")
        store.pathinfos.put(PathInfo(FileNode(hf.encode(), B3Digest.of(b"never stored"), 12)))
        store.pathinfos.put(PathInfo(DirectoryNode(hd.encode(), B3Digest.of(b"no such directory"), 3)))
        one = store.blobs.put(b"1")
        names = [f"entry-{i:05d}" for i in range(10_000)]
        many = Directory.from_nodes([FileNode(n.encode(), one, 1, executable=i % 2 == 1) for i, n in enumerate(names)])
        store.directories.put(many)
    assert tree.node is not None and bigi.node is not None
    yield Data(
        url, store_dir, src, big, tree.node.name.decode(), bigi.node.name.decode(), hf, hd, many.digest.hex(), names
    )


@pytest.fixture
def mount(data: Data, tmp_path: Path) -> Iterator[Path]:
    mp = tmp_path / "mnt"
    mp.mkdir()
    m = MountProc(mp, data.url)
    try:
        yield mp
    finally:
        m.cleanup()
    assert not is_mounted(mp)


def _walk(root: Path) -> dict[str, tuple[int, int, bytes]]:
    """relative path → (file type, exec bits, symlink target) of every entry (lstat, no follow)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            target = os.readlink(p).encode() if stat.S_ISLNK(st.st_mode) else b""
            out[str(p.relative_to(root))] = (stat.S_IFMT(st.st_mode), st.st_mode & 0o111, target)
    return out


# --- content -----------------------------------------------------------------------------


def test_every_blob_hashes_to_its_name(mount: Path) -> None:
    names = sorted(os.listdir(mount / "blobs"))
    assert len(names) >= 8
    out = subprocess.run(["b3sum", *names], cwd=mount / "blobs", capture_output=True, check=True).stdout
    lines = out.decode().splitlines()
    assert [ln.split()[0] for ln in lines] == [ln.split()[1] for ln in lines] == names


def test_store_path_is_the_imported_tree(mount: Path, data: Data) -> None:
    tree = mount / "store" / data.tree_name
    r = subprocess.run(["diff", "-r", "--no-dereference", str(data.src), str(tree)], capture_output=True)
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()
    want = _walk(data.src)
    got = _walk(tree)
    assert got == want  # types, exec bits, symlink targets
    for rel, (kind, _, _) in got.items():
        st = (tree / rel).lstat()
        if kind == stat.S_IFREG:
            assert stat.S_IMODE(st.st_mode) in (0o444, 0o555) and st.st_mtime == 0 and st.st_nlink == 1
        elif kind == stat.S_IFDIR:
            assert stat.S_IMODE(st.st_mode) == 0o555
    # a file as a store path's root node
    assert (mount / "store" / data.big_name).read_bytes() == data.big.read_bytes()


def test_readdir_10k_entries(mount: Path, data: Data) -> None:
    d = mount / "directories" / data.big_dir
    assert sorted(os.listdir(d)) == data.big_dir_names
    r = subprocess.run(["ls", "-a", "-f", str(d)], capture_output=True, check=True)
    listed = r.stdout.decode().split()
    assert listed[:2] == [".", ".."] and listed[2:] == data.big_dir_names  # in order, each once
    modes = {e.name: e.stat(follow_symlinks=False).st_mode & 0o777 for e in os.scandir(d)}
    assert modes["entry-00000"] == 0o444 and modes["entry-00001"] == 0o555


def test_random_preads_and_dd(mount: Path, data: Data) -> None:
    want = data.big.read_bytes()
    path = mount / "store" / data.big_name
    rng = random.Random(4)
    fd = os.open(path, os.O_RDONLY)
    try:
        for _ in range(200):
            off = rng.randrange(len(want) + 10)
            n = rng.choice([1, rng.randrange(1, 4096), rng.randrange(1, 2 << 20)])
            assert os.pread(fd, n, off) == want[off : off + n], (off, n)
    finally:
        os.close(fd)
    r = subprocess.run(
        ["dd", f"if={path}", "bs=64K", "skip=7", "count=9", "status=none"], capture_output=True, check=True
    )
    assert r.stdout == want[7 * 65536 : 16 * 65536]


def test_concurrent_readers(mount: Path, data: Data) -> None:
    files = sorted(p for p in (mount / "blobs").iterdir())
    big = mount / "store" / data.big_name
    want_big = hashlib.sha256(data.big.read_bytes()).hexdigest()
    results: list[bool] = []

    def read_all(p: Path, want: str) -> None:
        h = hashlib.sha256()
        with open(p, "rb", buffering=0) as f:
            while b := f.read(200_000):
                h.update(b)
        results.append(h.hexdigest() == want)

    threads = [threading.Thread(target=read_all, args=(big, want_big)) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 16
    # 16 readers on different blobs at once, verified by b3sum against their names
    procs = [subprocess.Popen(["b3sum", "--no-names", str(p)], stdout=subprocess.PIPE) for p in files[:16]]
    for p, f in zip(procs, files, strict=False):
        out, _ = p.communicate()
        assert out.decode().strip() == f.name  # blobs/<hex>


def test_mmap(mount: Path, data: Data) -> None:
    want = data.big.read_bytes()
    with open(mount / "store" / data.big_name, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
        assert len(mm) == len(want)
        for off in (0, 4095, 1 << 20, len(want) - 10):
            assert mm[off : off + 5000] == want[off : off + 5000]
        assert hashlib.sha256(mm).digest() == hashlib.sha256(want).digest()


def test_xattrs(mount: Path, data: Data) -> None:
    tree = mount / "store" / data.tree_name
    content = (data.src / "a.txt").read_bytes()
    want = B3Digest.of(content).b3_base64().encode()
    assert os.getxattr(tree / "a.txt", "user.tvix.castore.blob.digest") == want
    assert "user.tvix.castore.blob.digest" in os.listxattr(tree / "a.txt")
    d = os.getxattr(tree / "sub", "user.tvix.castore.directory.digest")
    assert d.startswith(b"b3:")
    assert os.listdir(mount / "directories" / B3Digest.parse(d.decode()).hex()) == sorted(os.listdir(data.src / "sub"))
    with pytest.raises(OSError) as ei:
        os.getxattr(tree / "a.txt", "user.nope")
    assert ei.value.errno == errno.ENODATA
    for foreign in ("security.selinux", "system.posix_acl_access"):  # what `ls -l` asks for
        with pytest.raises(OSError) as ei:
            os.getxattr(tree / "a.txt", foreign)
        assert ei.value.errno == errno.ENODATA
    stats = [n for n in os.listxattr(mount) if n.startswith("user.tvix.stats.")]
    assert "user.tvix.stats.mount.lookups" in stats
    assert int(os.getxattr(mount, "user.tvix.stats.mount.lookups")) > 0


def test_no_xattrs_mount_lists_the_same_and_has_no_attributes(data: Data, tmp_path: Path) -> None:
    """`--no-xattrs`: the mount answers ENOSYS once and the kernel then refuses every getxattr
    itself (EOPNOTSUPP); everything else is unchanged (`ls -l` lists the same entries)."""
    mp = tmp_path / "mnt"
    mp.mkdir()
    m = MountProc(mp, data.url, "--no-xattrs")
    try:
        tree = mp / "store" / data.tree_name
        for _ in range(2):
            for target, name in (
                (tree / "a.txt", "user.tvix.castore.blob.digest"),
                (mp, "user.tvix.stats.mount.lookups"),
            ):
                with pytest.raises(OSError) as ei:
                    os.getxattr(target, name)
                assert ei.value.errno == errno.EOPNOTSUPP
        listing = subprocess.run(["ls", "-l", "--time-style=+", str(tree)], capture_output=True, check=True)
        names = [ln.split(None, 5)[5] for ln in listing.stdout.decode().splitlines()[1:]]
        assert [n.split(" -> ")[0] for n in names] == sorted(os.listdir(data.src), key=os.fsencode)
    finally:
        m.cleanup()


def test_read_only_and_bad_names(mount: Path, data: Data) -> None:
    tree = mount / "store" / data.tree_name
    attempts = [
        lambda: open(tree / "new", "wb"),
        lambda: open(tree / "a.txt", "r+b"),
        lambda: os.mkdir(tree / "d"),
        lambda: os.unlink(tree / "a.txt"),
        lambda: os.rename(tree / "a.txt", tree / "b.txt"),
        lambda: os.chmod(tree / "a.txt", 0o644),
        lambda: os.setxattr(tree / "a.txt", "user.x", b"1"),
        lambda: os.symlink("x", tree / "l"),
        lambda: os.truncate(tree / "a.txt", 0),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as ei:
            attempt()
        assert ei.value.errno == errno.EROFS
    blob = B3Digest.of((data.src / "a.txt").read_bytes()).hex()
    assert (mount / "blobs" / blob).read_bytes() == b"hello\n"
    for bad in (
        mount / "blobs" / blob.upper(),
        mount / "blobs" / ("0" * 64),
        mount / "blobs" / "xyz",
        mount / "directories" / ("0" * 64),
        mount / "store" / "not-a-store-path",
        mount / "store" / (data.tree_name.split("-")[0] + "-wrongname"),
        mount / "store" / data.tree_name / "no-such-file",
        mount / "nothing",
    ):
        with pytest.raises(FileNotFoundError):
            os.stat(bad)


def test_holes(mount: Path, data: Data) -> None:
    f = mount / "store" / data.hole_file
    st = f.stat()
    assert st.st_size == 12 and stat.S_ISREG(st.st_mode)
    with pytest.raises(OSError) as ei:
        f.read_bytes()
    assert ei.value.errno == errno.EIO
    d = mount / "store" / data.hole_dir
    assert stat.S_ISDIR(d.stat().st_mode)
    with pytest.raises(OSError) as ei:
        os.listdir(d)
    assert ei.value.errno == errno.EIO
    # the mount goes on
    assert (mount / "store" / data.tree_name / "a.txt").read_bytes() == b"hello\n"


def test_corrupted_chunk_on_disk_is_eio(data: Data, tmp_path: Path) -> None:
    # a private store, so corrupting it does not disturb the other tests
    store_dir = tmp_path / "store"
    payload = random_bytes(300_000, seed=99)
    src = tmp_path / "payload.bin"
    src.write_bytes(payload)
    with open_store(f"local://{store_dir}") as s:
        name = import_path(s, src).node.name.decode()  # type: ignore[union-attr]
    needle = payload[100_000:100_064]
    hit = None
    for p in store_dir.rglob("*"):
        if p.is_file():
            b = p.read_bytes()
            i = b.find(needle)
            if i >= 0:
                hit = (p, i)
                break
    assert hit is not None, "the store keeps no chunk as plain bytes: this test must find another way in"
    p, i = hit
    raw = bytearray(p.read_bytes())
    raw[i] ^= 0xFF
    p.chmod(0o644)
    p.write_bytes(bytes(raw))
    mp = tmp_path / "mnt"
    mp.mkdir()
    m = MountProc(mp, f"local://{store_dir}")
    try:
        with open(mp / "store" / name, "rb") as f:
            with pytest.raises(OSError) as ei:
                f.seek(100_000)
                f.read(64)
            assert ei.value.errno == errno.EIO
        assert "integrity" in m.log.lower() or "mismatch" in m.log.lower()
    finally:
        m.cleanup()


# --- lifecycle ---------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "fusermount3"])
def test_stop_leaves_nothing(data: Data, tmp_path: Path, how: str) -> None:
    mp = tmp_path / "mnt"
    mp.mkdir()
    m = MountProc(mp, data.url)
    try:
        assert os.listdir(mp) == ["blobs", "directories", "store"]
        if how == "fusermount3":
            subprocess.run(["fusermount3", "-u", str(mp)], check=True)
            rc = m.proc.wait(20)
        else:
            rc = m.stop(getattr(signal, how))
        assert rc == 0, m.log
        assert not is_mounted(mp)
        assert pids_serving(mp) == []
        assert os.listdir(mp) == []
    finally:
        m.cleanup()


def test_two_mounts_of_one_store(data: Data, tmp_path: Path) -> None:
    mps = [tmp_path / "a", tmp_path / "b"]
    ms = []
    try:
        for mp in mps:
            mp.mkdir()
            ms.append(MountProc(mp, data.url))
        for mp in mps:
            assert (mp / "store" / data.tree_name / "a.txt").read_bytes() == b"hello\n"
    finally:
        for m in ms:
            m.cleanup()


def test_store_root(data: Data, tmp_path: Path) -> None:
    mp = tmp_path / "mnt"
    mp.mkdir()
    m = MountProc(mp, data.url, "--store-root")
    try:
        names = os.listdir(mp)
        assert data.tree_name in names and data.big_name in names and "blobs" not in names
        assert os.readlink(mp / data.tree_name / "link-rel") == "a.txt"
        assert (mp / data.tree_name / "run.sh").stat().st_mode & 0o777 == 0o555
    finally:
        m.cleanup()


def test_background_mode_returns_when_ready(data: Data, tmp_path: Path) -> None:
    mp = tmp_path / "mnt"
    mp.mkdir()
    env = {"XDG_STATE_HOME": str(tmp_path / "state")}
    try:
        p = cli("mount", "--store", data.url, "--no-xattrs", str(mp), env=env, timeout=60)
        # no polling: the command returned, so the mount answers now
        assert os.path.ismount(mp)
        assert (mp / "store" / data.tree_name / "a.txt").read_bytes() == b"hello\n"
        pids = pids_serving(mp)
        assert len(pids) == 1
        # one line: what, where, the serving pid and its log, named after the mount point
        log = tmp_path / "state" / "tvix-store" / f"mount-{str(mp).strip('/').replace('/', '-')}.log"
        assert p.stderr.decode() == f"mounted {data.url} at {mp} (pid {pids[0]}, log {log})\n"
        with pytest.raises(OSError) as ei:  # the child got every option (here --no-xattrs)
            os.getxattr(mp / "store" / data.tree_name / "a.txt", "user.tvix.digest")
        assert ei.value.errno in (errno.ENOTSUP, errno.ENOSYS)
        os.kill(pids[0], signal.SIGUSR1)  # the counters line names the mount
        wait_until(lambda: f"counters of {mp}:" in log.read_text(), what="the SIGUSR1 line")
        subprocess.run(["umount", str(mp)], check=True)
        wait_until(lambda: not pids_serving(mp), what="the background mount process to exit")
        assert not is_mounted(mp)
        assert f"mounted {data.url} at {mp}" in log.read_text() and "unmounted" in log.read_text()
    finally:
        kill_serving(mp)
        unmount(mp)


@pytest.mark.parametrize("case", ["missing", "not-empty", "bad-url", "unopenable"])
@pytest.mark.parametrize("foreground", [False, True])
def test_errors_one_line_nothing_mounted(data: Data, tmp_path: Path, case: str, foreground: bool) -> None:
    mp = tmp_path / "mnt"
    url = data.url
    if case == "missing":
        pass
    else:
        mp.mkdir()
    if case == "not-empty":
        (mp / "x").write_text("x")
    if case == "bad-url":
        url = "nosuch://x"
    if case == "unopenable":
        url = "local:///proc/version/store"
    args = ["mount", "--store", url, *(["--foreground"] if foreground else []), str(mp)]
    try:
        p = cli(*args, check=False, env={"XDG_STATE_HOME": str(tmp_path / "state")}, timeout=60)
        lines = p.stderr.decode().splitlines()
        assert p.returncode == (2 if case == "bad-url" else 1), lines  # a bad URL is a usage error
        assert len(lines) == 1 and lines[0].startswith("tvix-store: error: "), lines
        assert "Traceback" not in p.stderr.decode()
        assert not is_mounted(mp)
        assert pids_serving(mp) == []
    finally:
        kill_serving(mp)
        unmount(mp)


def test_daemon_with_mount(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    url = f"local://{tmp_path / 'store'}"
    mp = tmp_path / "mnt"
    mp.mkdir()
    d = Daemon(url, extra=("--mount", str(mp)))
    try:
        assert os.path.ismount(mp)  # the ready line comes after the mount answers
        with open_store(d.url) as remote:
            name = import_path(remote, src).node.name.decode()  # type: ignore[union-attr]
        # imported over gRPC into the daemon's store, visible in its mount
        assert (mp / "store" / name / "a.txt").read_bytes() == b"hello\n"
        assert d.stop(signal.SIGTERM) == 0, "".join(d.log)
        assert not is_mounted(mp)
        assert pids_serving(mp) == []
    finally:
        d.stop(signal.SIGKILL)
        kill_serving(mp)
        unmount(mp)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
