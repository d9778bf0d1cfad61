"""`tvix-store daemon` as a process: listen addresses, readiness line, signals, bad addresses, --mount."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import Daemon, cli
from mountutil import requires_fuse

from tvix_store.compose import open_store
from tvix_store.protocol.g1 import rpc_blobstore_pb2 as rb
from tvix_store.protocol.g1 import rpc_blobstore_pb2_grpc as rbg

MiB = 1 << 20


def wait_for(pred, timeout: float = 20, what: str = "condition") -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_ephemeral_port_is_reported(tmp_path: Path) -> None:
    d = Daemon("memory://", listen="127.0.0.1:0")
    try:
        host, port = d.address.rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0
        assert sum("listening on" in line for line in d.log) == 1
        with socket.create_connection((host, int(port)), timeout=5):
            pass
    finally:
        assert d.stop() == 0


def test_unix_socket(tmp_path: Path) -> None:
    sock = tmp_path / "daemon.sock"
    d = Daemon("memory://", listen=f"unix:{sock}")
    try:
        assert d.address == f"unix:{sock}"
        assert sock.is_socket()
        with open_store(d.url, timeout=10) as store:
            digest = store.blobs.put(b"over a unix socket")
            assert store.blobs.read_chunk(digest) == b"over a unix socket"
        with grpc.insecure_channel(d.address) as ch:
            r = rbg.BlobServiceStub(ch).Stat(rb.StatBlobRequest(digest=bytes(digest)), timeout=10)
            assert r == rb.BlobMeta()
    finally:
        assert d.stop() == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_inflight_call_finishes_it(sig: int) -> None:
    """A Read stream that has started (its first message arrived) survives the signal and completes."""
    d = Daemon("memory://")
    data = os.urandom(32 * MiB)
    try:
        with grpc.insecure_channel(d.address) as ch:
            stub = rbg.BlobServiceStub(ch)
            digest = stub.Put(iter(rb.BlobChunk(data=data[i : i + MiB]) for i in range(0, len(data), MiB)), timeout=60)
            call = stub.Read(rb.ReadBlobRequest(digest=digest.digest), timeout=60)
            received = [next(call).data]  # the server's handler is running now
            d.proc.send_signal(sig)
            wait_for(lambda: any("shutting down" in line for line in d.log), what="shutdown to begin")
            try:
                received += [m.data for m in call]
            except grpc.RpcError as e:
                d.proc.wait(30)
                raise AssertionError(f"in-flight Read failed: {e.code()}; daemon log:\n" + "".join(d.log)) from None
            assert b"".join(received) == data
        assert d.proc.wait(30) == 0
        # the daemon stopped accepting: a new connection is refused
        host, port = d.address.rsplit(":", 1)
        with pytest.raises(OSError):
            socket.create_connection((host, int(port)), timeout=5).close()
    finally:
        d.stop()


def test_sigint_idle_exits_0() -> None:
    d = Daemon("memory://")
    assert d.stop(signal.SIGINT) == 0
    assert not any("Traceback" in line for line in d.log)


def _busy_port() -> Iterator[int]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


@pytest.fixture
def busy_port() -> Iterator[int]:
    yield from _busy_port()


@pytest.mark.parametrize(
    ("listen", "word", "code"),
    [
        # malformed: a usage error (CLI.md: exit 2)
        ("nonsense", "invalid listen address", 2),
        ("127.0.0.1:99999", "invalid listen address", 2),
        ("127.0.0.1:", "invalid listen address", 2),
        # well-formed but not usable here: an operational error (exit 1)
        ("unix:/nonexistent-dir/x.sock", "does not exist", 1),
        ("no-such-host.invalid:8000", "cannot listen", 1),
        ("BUSY", "in use", 1),
    ],
)
def test_bad_address_one_line(listen: str, word: str, code: int, busy_port: int) -> None:
    if listen == "BUSY":
        listen = f"127.0.0.1:{busy_port}"
    p = cli("daemon", "--listen", listen, "--store", "memory://", check=False, timeout=30)
    err = p.stderr.decode()
    assert p.returncode == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("tvix-store: error:") and word in lines[0].lower(), err
    assert "Traceback" not in err


@pytest.mark.mount
@requires_fuse
def test_daemon_with_mount(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    d = Daemon(f"local://{tmp_path / 'store'}", extra=("--mount", str(mnt)))
    try:
        line = next(line for line in d.log if "listening on" in line)
        assert re.search(r"mounted at", line)
        assert os.path.ismount(mnt)
        with open_store(d.url, timeout=10) as store:
            digest = store.blobs.put(b"served and mounted")
        assert (mnt / "blobs" / digest.hex()).read_bytes() == b"served and mounted"
        assert d.stop() == 0
        assert not os.path.ismount(mnt)
    finally:
        d.stop()
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
