"""Hardening of the daemon against slow and hostile clients, with real processes.

Stalled clients (Put streams that send a little and wait, Reads whose answers are never
taken) cannot lock others out: streaming calls beyond the limit are refused at once with
RESOURCE_EXHAUSTED, unary calls keep being answered, and a stalled stream is cancelled after
the idle timeout, storing nothing.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import Daemon, cli
from fixtures import nix_dump
from mountutil import MountProc, wait_until

from tvix_store.compose import open_store
from tvix_store.core.digest import B3Digest
from tvix_store.core.pathinfo import StorePath
from tvix_store.protocol.g1 import rpc_blobstore_pb2 as rb
from tvix_store.protocol.g1 import rpc_blobstore_pb2_grpc as rbg

pytestmark = pytest.mark.slow

STALLED = 200
IDLE = 5.0


def test_200_stalled_streams_do_not_starve_other_clients(tmp_path: Path) -> None:
    d = Daemon(f"local://{tmp_path / 'store'}", extra=("--idle-timeout", str(IDLE)))
    release = threading.Event()
    channels = [grpc.insecure_channel(d.address) for _ in range(4)]  # HTTP/2 caps streams per connection
    try:
        with open_store(d.url) as s:
            big = s.blobs.put(os.urandom(16 << 20))  # far more than flow control lets through unread
            small = s.blobs.put(b"small")

        def stuck_put() -> Iterator[rb.BlobChunk]:
            yield rb.BlobChunk(data=b"x" * 1000)
            release.wait(60)

        calls = []
        for i in range(STALLED):
            stub = rbg.BlobServiceStub(channels[i % len(channels)])
            if i % 2:
                calls.append(stub.Put.future(stuck_put(), timeout=60))
            else:
                calls.append(stub.Read(rb.ReadBlobRequest(digest=bytes(big)), timeout=60))  # never read
        # a well-behaved client meanwhile: every Stat answered, promptly
        latencies = []
        with grpc.insecure_channel(d.address) as ch:
            stub = rbg.BlobServiceStub(ch)
            for _ in range(200):
                t = time.monotonic()
                stub.Stat(rb.StatBlobRequest(digest=bytes(small)), timeout=10)
                latencies.append(time.monotonic() - t)
            p99 = statistics.quantiles(latencies, n=100)[98]
            print(f"Stat p99 with {STALLED} stalled streams: {p99 * 1000:.1f} ms")
            assert p99 < 2.0, p99  # answered, not queued behind the stalled streams' deadlines
            # the streams beyond the limit were refused at once, and said why
            refused = [c for c in calls[-60:] if c.done() and c.code() is grpc.StatusCode.RESOURCE_EXHAUSTED]
            assert refused and "busy" in refused[0].details()
            # a stalled stream is cancelled after the idle timeout: slots free up, reads work again
            wait_until(lambda: any("cancelled: no progress" in line for line in d.log), IDLE * 4, "idle cancels")
            got = b"".join(m.data for m in stub.Read(rb.ReadBlobRequest(digest=bytes(small)), timeout=10))
            assert got == b"small"
        # every stalled Put ends by the server's idle cancel (the client never half-closes, and
        # does not cancel: a client's cancel races its end of stream, see README): nothing stored
        puts = calls[1::2]
        wait_until(lambda: all(c.done() for c in puts), IDLE * 6, "the idle cancels of every stalled Put")
        with open_store(d.url) as s:
            assert s.blobs.chunks(B3Digest.of(b"x" * 1000)) is None
    finally:
        for ch in channels:
            ch.close()
        assert d.stop() == 0
        release.set()  # only now: a released stream would end normally, and be stored
    assert not any("Traceback" in line for line in d.log), "".join(d.log)


def test_an_import_into_a_busy_daemon_backs_off_and_completes(tmp_path: Path) -> None:
    """A daemon at its limit of streaming calls answers RESOURCE_EXHAUSTED ("retry later"): an
    import of many small files (batches of Puts in flight from several threads) into a daemon
    with `--max-streams 12`, while another client holds 8 of them, backs off, retries and
    completes, and the NAR is `nix-store --dump`'s. (Before: the import failed with "server
    busy" whenever its batches together exceeded the limit, as 4 x 64 exceed the default 128.)"""
    src = tmp_path / "many"
    for d in range(6):
        (src / f"d{d}").mkdir(parents=True)
        for i in range(100):
            (src / f"d{d}" / f"f{i:03}").write_bytes(os.urandom(200 + i))
    d = Daemon(f"local://{tmp_path / 'store'}", extra=("--max-streams", "12", "--idle-timeout", "30"))
    release = threading.Event()
    ch = grpc.insecure_channel(d.address)
    try:

        def held() -> Iterator[rb.BlobChunk]:
            yield rb.BlobChunk(data=b"held")
            release.wait(60)

        stub = rbg.BlobServiceStub(ch)
        holders = [stub.Put.future(held(), timeout=60) for _ in range(8)]
        path = cli("import", "--store", d.url, str(src)).stdout.decode().strip()
        assert not any(h.done() for h in holders)  # the 8 were held all along
        assert cli("nar", "--store", d.url, path).stdout == nix_dump(src)
    finally:
        release.set()
        ch.close()
        assert d.stop() == 0


def test_undecodable_requests_are_invalid_argument_with_bounded_logs_and_sigterm_still_works(tmp_path: Path) -> None:
    """Garbage where a message should be: INVALID_ARGUMENT naming the message type, no
    traceback, at most a few log lines a minute however many arrive; a Put stream made of a
    valid message followed by garbage stores nothing; SIGTERM afterwards ends the daemon."""
    d = Daemon(f"local://{tmp_path / 'store'}")
    try:
        with grpc.insecure_channel(d.address) as ch:
            stat = ch.unary_unary("/tvix.store.v1.BlobService/Stat", request_serializer=bytes)
            put = ch.stream_unary("/tvix.store.v1.BlobService/Put", request_serializer=bytes)
            for i in range(2000):
                with pytest.raises(grpc.RpcError) as ei:
                    stat(b"\xff\xff\xff\xff" + bytes([i % 256]), timeout=10)
                assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not a valid tvix.store.v1.StatBlobRequest" in ei.value.details()
            prefix = b"valid prefix " * 100
            good = rb.BlobChunk(data=prefix).SerializeToString()
            for _ in range(20):
                with pytest.raises(grpc.RpcError) as ei:
                    put(iter([good, b"\xff\x01garbage"]), timeout=10)
                assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "message #1 of the request stream" in ei.value.details()
        with open_store(d.url) as s:
            assert s.blobs.chunks(B3Digest.of(prefix)) is None  # nothing of the failed Puts
        assert d.stop(timeout=30) == 0  # SIGTERM ends it
    finally:
        d.stop()
    log = "".join(d.log)
    assert "Traceback" not in log and "Exception deserializing" not in log
    malformed = [line for line in d.log if "malformed request" in line]
    assert 1 <= len(malformed) <= 12, len(malformed)  # rate-limited, not one per request


def test_a_1500_level_tree_imports_renders_and_mounts(tmp_path: Path) -> None:
    """Nothing recurses per level: import, the NAR (local and through the daemon's CalculateNAR),
    the daemon's closure stream and a mount's look-ups all handle a tree 1,500 directories deep
    (beyond Python's recursion limit of 1,000; deeper absolute paths pass PATH_MAX, which
    nix-store --dump cannot open either)."""
    depth = 1500
    assert depth > sys.getrecursionlimit()
    root = tmp_path / "deep"
    rel = "/".join(["d"] * depth)
    at = str(root)
    os.mkdir(at)
    for _ in range(depth):  # pathlib's and os.makedirs' parents= recurse per level
        at += "/d"
        os.mkdir(at)
    Path(at, "leaf").write_bytes(b"at the bottom\n")
    try:
        _deep_checks(tmp_path, root, depth, rel)
    finally:  # shutil.rmtree (pytest's clean-up of old temp dirs) recurses per level
        os.unlink(f"{at}/leaf")
        while at != str(root):
            os.rmdir(at)
            at = os.path.dirname(at)


def _deep_checks(tmp_path: Path, root: Path, depth: int, rel: str) -> None:
    local = f"local://{tmp_path / 'store'}"
    sp = cli("import", "--store", local, str(root)).stdout.decode().strip()
    dump = cli("nar", "--store", local, sp).stdout
    assert dump == nix_dump(root)
    d = Daemon(local)
    try:
        with open_store(d.url) as s:
            info = s.pathinfos.get(StorePath.parse(sp).digest)
            assert info is not None and info.node is not None
            assert s.pathinfos.calculate_nar(info.node) == (len(dump), hashlib.sha256(dump).digest())
            assert len(list(s.directories.get_recursive(info.node.digest))) == depth + 1  # type: ignore[union-attr]
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        m = MountProc(mnt, d.url)
        try:
            leaf = Path(f"{mnt}/store/{Path(sp).name}/{rel}/leaf")
            assert leaf.read_bytes() == b"at the bottom\n"
        finally:
            assert m.release()
    finally:
        assert d.stop() == 0


def _nar_str(b: bytes) -> bytes:
    return len(b).to_bytes(8, "little") + b + b"\0" * (-len(b) % 8)


def chain_nar(depth: int, leaf: bytes) -> bytes:
    """The NAR of `depth` nested directories `d` holding a file `leaf`, written out by hand
    from the format (nix-store --dump cannot open paths this long)."""
    s = _nar_str
    open_dir = s(b"(") + s(b"type") + s(b"directory")
    entry = s(b"entry") + s(b"(") + s(b"name")
    down = open_dir + entry + s(b"d") + s(b"node")
    bottom = open_dir + entry + s(b"leaf") + s(b"node") + s(b"(") + s(b"type") + s(b"regular")
    bottom += s(b"contents") + s(leaf) + s(b")") + s(b")") + s(b")")
    return s(b"nix-archive-1") + down * depth + bottom + (s(b")") + s(b")")) * depth


def test_a_5000_level_tree_deeper_than_path_max(tmp_path: Path) -> None:
    """5,000 levels: a path of 10,000 bytes, beyond PATH_MAX, so the import walks by directory
    fd; the NAR (local and CalculateNAR) equals the format written out by hand, the closure
    streams, and the mount resolves the leaf one look-up at a time (openat, as `find` does)."""
    depth = 5000
    root = tmp_path / "deep"
    os.mkdir(root)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        leaf = os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(leaf, b"at the bottom\n")
        os.close(leaf)
    finally:
        os.close(fd)
    try:
        expected = chain_nar(depth, b"at the bottom\n")
        local = f"local://{tmp_path / 'store'}"
        sp = cli("import", "--store", local, str(root)).stdout.decode().strip()
        assert cli("nar", "--store", local, sp).stdout == expected
        d = Daemon(local)
        try:
            served = tmp_path / "served"
            d2 = Daemon(f"local://{served}")  # an import through gRPC: the daemon checks the closure
            try:
                assert cli("import", "--store", d2.url, str(root)).stdout.decode().strip() == sp
            finally:
                assert d2.stop() == 0
            assert cli("nar", "--store", f"local://{served}", sp).stdout == expected
            with open_store(d.url) as s:
                info = s.pathinfos.get(StorePath.parse(sp).digest)
                assert info is not None and info.node is not None and info.narinfo is not None
                assert (info.narinfo.nar_size, info.narinfo.nar_sha256) == (
                    len(expected),
                    hashlib.sha256(expected).digest(),
                )
                assert s.pathinfos.calculate_nar(info.node) == (len(expected), hashlib.sha256(expected).digest())
                assert len(list(s.directories.get_recursive(info.node.digest))) == depth + 1  # type: ignore[union-attr]
            mnt = tmp_path / "mnt"
            mnt.mkdir()
            m = MountProc(mnt, d.url)
            try:
                fd = os.open(mnt / "store" / Path(sp).name, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    for _ in range(depth):
                        child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
                        os.close(fd)
                        fd = child
                    leaf = os.open("leaf", os.O_RDONLY, dir_fd=fd)
                    try:
                        assert os.read(leaf, 100) == b"at the bottom\n"
                    finally:
                        os.close(leaf)
                finally:
                    os.close(fd)
            finally:
                assert m.release()
        finally:
            assert d.stop() == 0
    finally:  # shutil.rmtree (pytest's clean-up of old temp dirs) recurses per level; rm does not
        subprocess.run(["rm", "-rf", str(root)], check=True)
