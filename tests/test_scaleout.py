"""Scaling out with real servers: blobs and Directories in a SeaweedFS bucket, Directories and
path infos in PostgreSQL, real daemons and real FUSE mounts (tests/servers.py, conftest's
session fixtures).

- a direct mount (no daemon) of bucket + database, `diff -r` against the imported tree;
- two daemons over one bucket and one database: import through one, read through the other,
  kill the first, reads of what was never read go on;
- a read-only mount over plain HTTP (`python3 -m http.server` serving an objectstore+file dir);
- S3 or PostgreSQL stopped: one CLI line and exit 1, gRPC UNAVAILABLE from a daemon, EIO on a
  mount, within the deadline; everything works again once the server is back, no restart;
  and S3 stopped and restarted under a load of concurrent Stats and Puts through a daemon.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import GUARANTEE_SLACK, Daemon, cli, one_line_error
from fixtures import make_tree, random_bytes
from mountutil import MountProc, requires_fuse
from servers import PostgreSQL, SeaweedFS, free_port

from tvix_store.core.digest import B3Digest
from tvix_store.protocol.g1 import rpc_blobstore_pb2, rpc_blobstore_pb2_grpc

TIMEOUT = 3.0


def tree(root: Path, seed: int) -> Path:
    make_tree(root, seed=seed)
    (root / "big.bin").write_bytes(random_bytes((2 << 20) + 123, seed=seed))  # several FastCDC chunks
    for i in range(10):
        (root / "many" / f"f{i}").parent.mkdir(exist_ok=True)
        (root / "many" / f"f{i}").write_bytes(random_bytes(1000 * i, seed=seed * 100 + i))
    return root


def diff(a: Path, b: Path) -> None:
    p = subprocess.run(["diff", "-r", "--no-dereference", str(a), str(b)], capture_output=True)
    assert p.returncode == 0, p.stdout.decode(errors="replace") + p.stderr.decode(errors="replace")


def imported(*store_args: str, path: Path) -> str:
    out = cli("import", *store_args, str(path)).stdout.decode().strip()
    return out.rsplit("/", 1)[1]


@pytest.fixture
def bucket_db(seaweed: SeaweedFS, postgres: PostgreSQL) -> tuple[str, str]:
    """A fresh prefix in the bucket and a fresh database."""
    return seaweed.url(), postgres.fresh_db()


def services(bucket: str, db: str) -> list[str]:
    return ["--blob-store", bucket, "--directory-store", bucket, "--pathinfo-store", db]


@pytest.mark.mount
@requires_fuse
def test_direct_mount_of_bucket_and_database(tmp_path: Path, bucket_db: tuple[str, str]) -> None:
    bucket, db = bucket_db
    src = tree(tmp_path / "src", seed=1)
    name = imported(*services(bucket, db), path=src)
    listed = cli("path", "list", *services(bucket, db)).stdout.decode()
    assert name in listed
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    m = MountProc(mnt, bucket, "--pathinfo-store", db, "--timeout", str(TIMEOUT))
    try:
        assert name in os.listdir(mnt / "store")
        diff(src, mnt / "store" / name)
    finally:
        m.release()


@pytest.mark.mount
@requires_fuse
def test_two_daemons_over_one_bucket_and_one_database(tmp_path: Path, bucket_db: tuple[str, str]) -> None:
    bucket, db = bucket_db
    extra = ("--pathinfo-store", db, "--timeout", str(TIMEOUT))
    first = Daemon(bucket, extra=extra)
    second = Daemon(bucket, extra=extra)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    m: MountProc | None = None
    try:
        one = imported("--store", first.url, path=tree(tmp_path / "one", seed=2))
        two = imported("--store", first.url, path=tree(tmp_path / "two", seed=3))
        m = MountProc(mnt, second.url, "--timeout", str(TIMEOUT))
        diff(tmp_path / "one", mnt / "store" / one)
        first.stop(signal.SIGKILL)
        diff(tmp_path / "two", mnt / "store" / two)  # never read before: from the bucket through the second
    finally:
        if m is not None:
            m.release()
        first.stop()
        second.stop()


@pytest.mark.mount
@requires_fuse
def test_read_only_mount_over_plain_http(tmp_path: Path, postgres: PostgreSQL) -> None:
    db = postgres.fresh_db()
    root = tmp_path / "bucket"
    src = tree(tmp_path / "src", seed=4)
    name = imported(*services(f"objectstore+file://{root}", db), path=src)
    port = free_port()
    http = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(root), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    m: MountProc | None = None
    try:
        url = f"objectstore+http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 30
        while not _listening(port):
            assert http.poll() is None and time.monotonic() < deadline, "http.server never listened"
            time.sleep(0.05)
        m = MountProc(mnt, url, "--pathinfo-store", db, "--timeout", str(TIMEOUT))
        diff(src, mnt / "store" / name)
        new = tmp_path / "new"
        new.mkdir()
        (new / "f").write_bytes(b"not in the bucket yet")
        p = cli("import", "--store", url, "--pathinfo-store", db, str(new), check=False)
        one_line_error(p, 1, "read-only")
    finally:
        if m is not None:
            m.release()
        http.terminate()
        http.wait(10)


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


# --- failures ---------------------------------------------------------------------------------


@pytest.fixture
def stoppable(seaweed: SeaweedFS, postgres: PostgreSQL) -> Iterator[tuple[SeaweedFS, PostgreSQL]]:
    """The session servers, started again whatever the test stopped."""
    try:
        yield seaweed, postgres
    finally:
        if seaweed.proc is None:
            seaweed.start()
        try:
            postgres.start()
        except RuntimeError:
            pass  # already running


def _stat_blob(address: str, digest: bytes) -> grpc.StatusCode:
    with grpc.insecure_channel(address) as ch:
        stub = rpc_blobstore_pb2_grpc.BlobServiceStub(ch)
        try:
            stub.Stat(rpc_blobstore_pb2.StatBlobRequest(digest=digest), timeout=TIMEOUT * 4)
        except grpc.RpcError as e:
            return e.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


@pytest.mark.mount
@requires_fuse
def test_s3_stopped_is_a_clear_error_everywhere_then_recovers(
    tmp_path: Path, stoppable: tuple[SeaweedFS, PostgreSQL]
) -> None:
    seaweed, postgres = stoppable
    bucket, db = seaweed.url(), postgres.fresh_db()
    src = tree(tmp_path / "src", seed=5)
    name = imported(*services(bucket, db), path=src)
    d = Daemon(bucket, extra=("--pathinfo-store", db, "--timeout", str(TIMEOUT)))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    m = MountProc(mnt, bucket, "--pathinfo-store", db, "--timeout", str(TIMEOUT))
    try:
        assert name in os.listdir(mnt / "store")
        seaweed.stop()
        # the CLI: one line, exit 1, within the deadline (with retries)
        t = time.monotonic()
        p = cli("import", *services(bucket, db), "--timeout", str(TIMEOUT), str(src / "sub"), check=False)
        one_line_error(p, 1, "object store")
        assert time.monotonic() - t < 4 * TIMEOUT + GUARANTEE_SLACK + 5  # process start included
        assert "tvix-test" not in p.stderr.decode()  # the credentials are never printed
        # the daemon: UNAVAILABLE
        absent = os.urandom(32)
        assert _stat_blob(d.address, absent) == grpc.StatusCode.UNAVAILABLE
        # the mount: EIO (a file never read, so not cached)
        t = time.monotonic()
        with pytest.raises(OSError) as ei:
            (mnt / "store" / name / "big.bin").read_bytes()
        assert ei.value.errno == errno.EIO
        assert time.monotonic() - t < 2 * TIMEOUT + GUARANTEE_SLACK
        seaweed.start()
        # back: no restart of the daemon or the mount
        assert _stat_blob(d.address, absent) == grpc.StatusCode.NOT_FOUND
        diff(src, mnt / "store" / name)
    finally:
        m.release()
        d.stop()


@pytest.mark.mount
@requires_fuse
def test_postgres_stopped_is_a_clear_error_everywhere_then_recovers(
    tmp_path: Path, stoppable: tuple[SeaweedFS, PostgreSQL]
) -> None:
    seaweed, postgres = stoppable
    bucket, db = f"objectstore+file://{tmp_path / 'bucket'}", postgres.fresh_db()
    src = tree(tmp_path / "src", seed=6)
    d = Daemon(bucket, extra=("--pathinfo-store", db, "--timeout", str(TIMEOUT)))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    m = MountProc(mnt, bucket, "--pathinfo-store", db, "--timeout", str(TIMEOUT))
    try:
        imported("--store", d.url, path=src)
        # a path neither the daemon nor the mount saw (they keep the ones they saw in their caches)
        name = imported(*services(bucket, db), path=tree(tmp_path / "other", seed=7))
        postgres.stop()
        # the CLI: one line naming the database, exit 1
        t = time.monotonic()
        p = cli("path", "list", *services(bucket, db), "--timeout", str(TIMEOUT), check=False)
        one_line_error(p, 1, "database", "unavailable")
        assert time.monotonic() - t < 2 * TIMEOUT + GUARANTEE_SLACK + 5  # process start included
        # the daemon: UNAVAILABLE, which the gRPC client says in one line
        p = cli("path", "info", "--store", d.url, name, "--timeout", str(TIMEOUT * 3), check=False)
        one_line_error(p, 1, "unavailable")
        # the mount: EIO for a look-up it cannot answer
        t = time.monotonic()
        with pytest.raises(OSError) as ei:
            os.stat(mnt / "store" / name)
        assert ei.value.errno == errno.EIO
        assert time.monotonic() - t < 2 * TIMEOUT + GUARANTEE_SLACK
        postgres.start()
        # back: no restart of the daemon or the mount
        assert name in cli("path", "info", "--store", d.url, name).stdout.decode()
        diff(tmp_path / "other", mnt / "store" / name)
    finally:
        m.release()
        d.stop()


def test_s3_stopped_and_restarted_under_load(tmp_path: Path, stoppable: tuple[SeaweedFS, PostgreSQL]) -> None:
    """Six clients keep calling a daemon over the bucket (Stat of absent blobs, which always
    reach S3, and Puts of fresh small blobs) while S3 is stopped and started again: every call
    ends within its deadline with a definite answer (NOT_FOUND/OK, or UNAVAILABLE while S3 is
    down, never another code), the outage is seen, calls succeed again without a restart, and
    every Put that answered OK is readable whole afterwards (nothing partial was published)."""
    import threading

    seaweed, postgres = stoppable
    bucket, db = seaweed.url(), postgres.fresh_db()
    d = Daemon(bucket, extra=("--pathinfo-store", db, "--timeout", str(TIMEOUT)))
    stop = threading.Event()
    results: list[tuple[str, grpc.StatusCode, float]] = []  # (phase, code, seconds)
    phase = ["up"]
    stored: list[bytes] = []
    lock = threading.Lock()

    def stats() -> None:
        while not stop.is_set():
            t = time.monotonic()
            code = _stat_blob(d.address, os.urandom(32))
            with lock:
                results.append((phase[0], code, time.monotonic() - t))

    def puts(seed: int) -> None:
        with grpc.insecure_channel(d.address) as ch:
            stub = rpc_blobstore_pb2_grpc.BlobServiceStub(ch)
            n = 0
            while not stop.is_set():
                data = random_bytes(3000 + n, seed=seed * 100_000 + n)
                n += 1
                t = time.monotonic()
                try:
                    stub.Put(iter([rpc_blobstore_pb2.BlobChunk(data=data)]), timeout=TIMEOUT * 4)
                    code = grpc.StatusCode.OK
                except grpc.RpcError as e:
                    code = e.code()
                with lock:
                    results.append((phase[0], code, time.monotonic() - t))
                    if code == grpc.StatusCode.OK:
                        stored.append(data)

    threads = [threading.Thread(target=stats) for _ in range(4)] + [
        threading.Thread(target=puts, args=(i,)) for i in range(2)
    ]
    try:
        for th in threads:
            th.start()
        wait_n = len(results) + 20
        _wait(lambda: len(results) >= wait_n)
        phase[0] = "down"
        seaweed.stop()
        _wait(lambda: sum(1 for p, c, _ in results if p == "down" and c == grpc.StatusCode.UNAVAILABLE) >= 10)
        seaweed.start()
        phase[0] = "back"
        # recovery without a restart: Stats are answered NOT_FOUND again, and Puts stored
        _wait(lambda: sum(1 for p, c, _ in results if p == "back" and c == grpc.StatusCode.NOT_FOUND) >= 10)
        _wait(lambda: sum(1 for p, c, _ in results if p == "back" and c == grpc.StatusCode.OK) >= 5)
    finally:
        stop.set()
        for th in threads:
            th.join(60)
    try:
        allowed = {grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE}
        assert {c for _, c, _ in results} <= allowed, {c for _, c, _ in results} - allowed
        assert not [r for r in results if r[0] == "up" and r[1] == grpc.StatusCode.UNAVAILABLE]
        slowest = max(s for _, _, s in results)
        assert slowest < 2 * TIMEOUT + GUARANTEE_SLACK, slowest  # a deadline guarantee: no hang
        with grpc.insecure_channel(d.address) as ch:
            stub = rpc_blobstore_pb2_grpc.BlobServiceStub(ch)
            for data in stored:
                got = b"".join(
                    m.data
                    for m in stub.Read(
                        rpc_blobstore_pb2.ReadBlobRequest(digest=bytes(B3Digest.of(data))), timeout=TIMEOUT * 4
                    )
                )
                assert got == data
    finally:
        assert d.stop() == 0


def _wait(cond: object, timeout: float = 120) -> None:
    from mountutil import wait_until

    wait_until(cond, timeout, "the load to reach the next phase")  # type: ignore[arg-type]
