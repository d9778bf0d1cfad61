"""Running it as a service: the `mount.fuse.tvix-store` helper the way `mount(8)` calls it,
the real `mount -t fuse.tvix-store` and an fstab line, systemd readiness (`Type=notify`)
through a fake notify socket, and a stale mount point left by a killed mount.

The real `mount` only looks for helpers in /sbin: the test links ours there for its
duration (and refuses to touch a helper of that name it did not make).
"""

from __future__ import annotations

import errno
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Daemon, cli
from fixtures import make_tree, nix_dump
from mountutil import MountProc, is_mounted, kill_serving, pids_serving, unmount, wait_until

HELPER = Path(sys.executable).parent / "mount.fuse.tvix-store"
SBIN = Path("/sbin/mount.fuse.tvix-store")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, Path, str]]:
    """A daemon over a store holding one tree: (daemon, tree, store path basename)."""
    tmp = tmp_path_factory.mktemp("ops")
    tree = make_tree(tmp / "tree")
    d = Daemon(f"local://{tmp / 'store'}")
    try:
        sp = cli("import", "--store", d.url, str(tree)).stdout.decode().strip()
        yield d, tree, os.path.basename(sp)
    finally:
        d.stop()


def _same_tree(mp: Path, tree: Path, name: str) -> None:
    subprocess.run(["diff", "-r", "--no-dereference", str(tree), str(mp / "store" / name)], check=True)


def _umount(mp: Path) -> None:
    subprocess.run(["umount", str(mp)], check=True)
    wait_until(lambda: not pids_serving(mp), what="the mount process to exit")
    assert not is_mounted(mp)


def test_the_helper_as_mount_calls_it(served: tuple[Daemon, Path, str], tmp_path: Path) -> None:
    d, tree, name = served
    mp = tmp_path / "mnt"
    mp.mkdir()
    opts = "rw,nosuid,nodev,noexec,relatime,noauto,_netdev,nofail,x-systemd.automount,comment=x"
    opts += f",cache-dir={tmp_path / 'cache'},cache-size=64M,timeout=5,no-xattrs,log-level=debug"
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    try:
        p = subprocess.run([str(HELPER), d.url, str(mp), "-o", opts], capture_output=True, env=env, timeout=60)
        assert p.returncode == 0, p.stderr
        assert is_mounted(mp)  # the helper returned: the mount answers now
        _same_tree(mp, tree, name)
        assert any((tmp_path / "cache").iterdir())  # cache-dir reached the mount
        with pytest.raises(OSError):  # and no-xattrs
            os.getxattr(mp / "store" / name, "user.tvix.digest")
        # the serving process got the translated options
        argv = (Path("/proc") / str(pids_serving(mp)[0]) / "cmdline").read_bytes().split(b"\0")
        assert b"--cache-size" in argv and str(64 << 20).encode() in argv
        assert b"--timeout" in argv and b"--no-xattrs" in argv
        _umount(mp)
    finally:
        kill_serving(mp)
        unmount(mp)


def test_the_helper_refuses_what_it_does_not_know(tmp_path: Path) -> None:
    for argv, needle in (
        (["grpc+http://127.0.0.1:1", str(tmp_path), "-o", "ro,bogus=1"], "unknown mount option 'bogus=1'"),
        (["grpc+http://127.0.0.1:1"], "expected SOURCE"),
        (["grpc+http://127.0.0.1:1", str(tmp_path), "-Z"], "unknown argument '-Z'"),
    ):
        p = subprocess.run([str(HELPER), *argv], capture_output=True, timeout=30)
        assert p.returncode == 2 and needle in p.stderr.decode(), (argv, p.stderr)
        assert b"Traceback" not in p.stderr


@pytest.fixture
def sbin_helper() -> Iterator[None]:
    """Our helper linked where mount(8) looks for it, for one test."""
    if SBIN.is_symlink() or SBIN.exists():
        assert SBIN.is_symlink() and os.readlink(SBIN) == str(HELPER), f"{SBIN} exists and is not ours: not touched"
    else:
        SBIN.symlink_to(HELPER)
    try:
        yield
    finally:
        SBIN.unlink(missing_ok=True)


def test_real_mount_t_fuse_tvix_store_and_an_fstab_line(
    served: tuple[Daemon, Path, str], tmp_path: Path, sbin_helper: None
) -> None:
    d, tree, name = served
    mp = tmp_path / "mnt"
    mp.mkdir()
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    try:
        p = subprocess.run(
            ["mount", "-t", "fuse.tvix-store", d.url, str(mp), "-o", f"ro,cache-dir={tmp_path / 'c1'},timeout=5"],
            capture_output=True,
            env=env,
            timeout=60,
        )
        assert p.returncode == 0, p.stderr
        _same_tree(mp, tree, name)
        _umount(mp)
        fstab = tmp_path / "fstab"
        fstab.write_text(
            f"# a test fstab\n{d.url}  {mp}  fuse.tvix-store  ro,noauto,nofail,_netdev,"
            f"cache-dir={tmp_path / 'c2'},cache-size=32M,timeout=5  0 0\n"
        )
        p = subprocess.run(["mount", "--fstab", str(fstab), str(mp)], capture_output=True, env=env, timeout=60)
        assert p.returncode == 0, p.stderr
        assert (mp / "store" / name / "a.txt").read_bytes() == (tree / "a.txt").read_bytes()
        _umount(mp)
    finally:
        kill_serving(mp)
        unmount(mp)


class NotifySocket:
    """A fake systemd notify socket: a datagram socket in a temp dir."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(60)

    def next(self) -> dict[str, str]:
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.splitlines())

    def close(self) -> None:
        self.sock.close()


def test_daemon_bridge_and_mount_notify_systemd_when_ready(tmp_path: Path) -> None:
    n = NotifySocket(tmp_path / "notify")
    env = {**os.environ, "NOTIFY_SOCKET": str(n.path)}
    store = f"local://{tmp_path / 'store'}"
    base = [sys.executable, "-m", "tvix_store.cli"]
    procs = []
    try:
        sock = tmp_path / "d.sock"
        procs.append(
            subprocess.Popen(
                [*base, "daemon", "--listen", f"unix:{sock}", "--store", store], env=env, stderr=subprocess.DEVNULL
            )
        )
        msg = n.next()
        assert msg["READY"] == "1" and msg["MAINPID"] == str(procs[0].pid), msg
        # ready means ready: it answers at once
        assert cli("blob", "put", "--store", f"grpc+unix://{sock}", "-", input=b"x").returncode == 0
        procs[0].send_signal(signal.SIGTERM)
        assert n.next() == {"STOPPING": "1"}
        assert procs[0].wait(30) == 0

        procs.append(
            subprocess.Popen(
                [*base, "nar-bridge", "--listen", "127.0.0.1:0", "--store", store], env=env, stderr=subprocess.PIPE
            )
        )
        msg = n.next()
        assert msg["READY"] == "1" and msg["MAINPID"] == str(procs[1].pid) and "http://127.0.0.1:" in msg["STATUS"]
        procs[1].send_signal(signal.SIGTERM)
        assert n.next() == {"STOPPING": "1"}
        assert procs[1].wait(30) == 0

        mp = tmp_path / "mnt"
        mp.mkdir()
        m = subprocess.Popen(
            [*base, "mount", "--foreground", "--store", store, str(mp)], env=env, stderr=subprocess.DEVNULL
        )
        procs.append(m)
        try:
            msg = n.next()
            assert msg["READY"] == "1" and msg["MAINPID"] == str(m.pid)
            assert is_mounted(mp) and sorted(os.listdir(mp)) == ["blobs", "directories", "store"]
            m.send_signal(signal.SIGTERM)
            assert m.wait(30) == 0
        finally:
            unmount(mp)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        n.close()


def test_a_stale_mount_point_of_a_killed_mount_is_cleared(served: tuple[Daemon, Path, str], tmp_path: Path) -> None:
    d, tree, name = served
    mp = tmp_path / "mnt"
    mp.mkdir()
    m = MountProc(mp, d.url)
    m.proc.kill()
    m.proc.wait()
    with pytest.raises(OSError) as ei:  # what users see after a crash
        os.listdir(mp)
    assert ei.value.errno == errno.ENOTCONN  # "Transport endpoint is not connected"
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    try:
        p = cli("mount", "--store", d.url, str(mp), env=env, timeout=60)
        assert f"cleared the stale mount at {mp}" in p.stderr.decode(), p.stderr
        assert (mp / "store" / name / "a.txt").read_bytes() == (tree / "a.txt").read_bytes()
        assert nix_dump(mp / "store" / name) == nix_dump(tree)
        _umount(mp)
    finally:
        kill_serving(mp)
        unmount(mp)


def _scrape(url: str) -> dict[str, float]:
    """`tvix_store_stat{name}` samples of a metrics endpoint, parsed by prometheus_client."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        if fam.name == "tvix_store_stat":
            out.update({s.labels["name"]: s.value for s in fam.samples})
    return out


def test_a_mount_serves_its_counters_as_prometheus_metrics(served: tuple[Daemon, Path, str], tmp_path: Path) -> None:
    d, tree, name = served
    mp = tmp_path / "mnt"
    mp.mkdir()
    m = MountProc(mp, d.url, "--metrics-listen", "127.0.0.1:0", "--cache-dir", str(tmp_path / "cache"))
    try:
        wait_until(lambda: re.search(r"metrics on (http://\S+/metrics)\)", m.log), what="the mounted line")
        found = re.search(r"metrics on (http://\S+/metrics)\)", m.log)
        assert found
        before = _scrape(found.group(1))
        assert (mp / "store" / name / "a.txt").read_bytes() == (tree / "a.txt").read_bytes()
        after = _scrape(found.group(1))
        assert after["mount.reads"] >= before["mount.reads"] + 1
        assert after["chunks_fetched"] >= before["chunks_fetched"] + 1  # the cache in front of the remote
        assert "remote_down" in after
    finally:
        m.cleanup()
