"""The gRPC server and client against real daemons: reflection, health, streaming, cancellation,
the client's error mapping and deadlines, verification, and bounded memory for a 2 GiB blob.

In-process servers (`StoreServer`) appear only for fault injection (a store that lies,
fails or stalls); everything else talks to a `tvix-store daemon` process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import blake3
import grpc
import pytest
from conftest import GUARANTEE_SLACK, REPO, Daemon
from fixtures import EMPTY_HEX, HELLO, HELLO_HEX, materialize, nix_nar_hash, pack_bytes
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from mountutil import wait_until

from tvix_store.blobservice import BlobService, BlobWriter
from tvix_store.blobservice.memory import MemoryBlobService
from tvix_store.compose import open_store
from tvix_store.core.castore import Directory, DirectoryNode, FileNode, SymlinkNode
from tvix_store.core.chunks import ChunkMeta
from tvix_store.core.digest import B3Digest
from tvix_store.core.errors import (
    IntegrityError,
    NotFoundError,
    StoreError,
    UnavailableError,
    ValidationError,
)
from tvix_store.core.pathinfo import NarInfo, PathInfo, StorePath
from tvix_store.protocol.g1 import castore_pb2
from tvix_store.protocol.g1 import rpc_blobstore_pb2 as rb
from tvix_store.protocol.g1 import rpc_blobstore_pb2_grpc as rbg
from tvix_store.protocol.g1 import rpc_directory_pb2 as rd
from tvix_store.protocol.g1 import rpc_directory_pb2_grpc as rdg
from tvix_store.remote.status import status_for
from tvix_store.serve.grpc import BlobServicer, StoreServer
from tvix_store.serve.limits import StreamGuard
from tvix_store.store import Store

MiB = 1 << 20


def b3sum(data: bytes, tmp: Path) -> str:
    """The digest as the real `b3sum` computes it (independent of our code)."""
    f = tmp / "b3sum-input"
    f.write_bytes(data)
    return subprocess.run(["b3sum", "--no-names", str(f)], capture_output=True, check=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(f"local://{tmp_path_factory.mktemp('grpc') / 'store'}")
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture(scope="module")
def memd() -> Iterator[Daemon]:
    """A daemon over memory://: every blob is one chunk, so big chunks must be split on Read."""
    d = Daemon("memory://")
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture
def client(served: Daemon) -> Iterator[Store]:
    s = open_store(served.url, timeout=10)
    try:
        yield s
    finally:
        s.close()


# --- reflection and health ---------------------------------------------------------------


def test_reflection_lists_services(served: Daemon) -> None:
    with grpc.insecure_channel(served.address) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        reqs = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="tvix.store.v1.BlobService"),
        ]
        resps = list(stub.ServerReflectionInfo(iter(reqs), timeout=10))
    names = {s.name for s in resps[0].list_services_response.service}
    assert {"tvix.store.v1.BlobService", "tvix.store.v1.DirectoryService", "tvix.store.v1.PathInfoService"} <= names
    assert "grpc.health.v1.Health" in names
    assert resps[1].file_descriptor_response.file_descriptor_proto, "descriptor of BlobService not served"


def test_health_serving(served: Daemon) -> None:
    with grpc.insecure_channel(served.address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for name in (
            "",
            "tvix.store.v1.BlobService",
            "tvix.store.v1.DirectoryService",
            "tvix.store.v1.PathInfoService",
        ):
            r = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            assert r.status == health_pb2.HealthCheckResponse.SERVING, name
        with pytest.raises(grpc.RpcError) as ei:
            stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
        assert ei.value.code() == grpc.StatusCode.NOT_FOUND


# --- raw streaming -----------------------------------------------------------------------


@pytest.mark.parametrize("which", ["memd", "served"])
def test_read_messages_at_most_1mib(which: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    d: Daemon = request.getfixturevalue(which)
    data = os.urandom(3 * MiB + 12345)
    want = b3sum(data, tmp_path)
    with grpc.insecure_channel(d.address) as ch:
        stub = rbg.BlobServiceStub(ch)
        # uploaded in odd-sized messages of up to 2 MiB: boundaries carry no meaning
        pieces = [data[i : i + 2 * MiB - 7] for i in range(0, len(data), 2 * MiB - 7)]
        resp = stub.Put(iter(rb.BlobChunk(data=p) for p in pieces), timeout=30)
        assert resp.digest.hex() == want
        msgs = list(stub.Read(rb.ReadBlobRequest(digest=resp.digest), timeout=30))
        assert all(len(m.data) <= MiB for m in msgs), [len(m.data) for m in msgs]
        assert len(msgs) >= 4
        assert b"".join(m.data for m in msgs) == data
        meta = stub.Stat(rb.StatBlobRequest(digest=resp.digest, include_chunks=True), timeout=10)
        assert sum(c.size for c in meta.chunks) == len(data)
        for c in meta.chunks:  # every chunk is readable by its own digest
            got = b"".join(m.data for m in stub.Read(rb.ReadBlobRequest(digest=c.digest), timeout=10))
            assert len(got) == c.size and blake3.blake3(got).digest() == c.digest
        plain = stub.Stat(rb.StatBlobRequest(digest=resp.digest), timeout=10)
        assert list(plain.chunks) == [] and plain.inline_bao == b""
        bao = stub.Stat(rb.StatBlobRequest(digest=resp.digest, include_bao=True), timeout=10)
        assert bao.inline_bao == b""  # unsupported: empty, as the protocol allows


def test_read_not_found_before_any_data(served: Daemon) -> None:
    with grpc.insecure_channel(served.address) as ch:
        call = rbg.BlobServiceStub(ch).Read(rb.ReadBlobRequest(digest=b"\x42" * 32), timeout=10)
        received = []
        with pytest.raises(grpc.RpcError) as ei:
            for m in call:
                received.append(m)
        assert ei.value.code() == grpc.StatusCode.NOT_FOUND
        assert received == []


def test_empty_blob(served: Daemon, client: Store) -> None:
    d = client.blobs.put(b"")
    assert d.hex() == EMPTY_HEX
    assert client.blobs.chunks(d) == []
    assert client.blobs.read_chunk(d) == b""
    assert client.blobs.open_read(d).read() == b""


@pytest.fixture
def debug_daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A daemon that logs at debug level (its log says when it finished with a cancelled call)."""
    d = Daemon(f"local://{tmp_path / 'store'}", log_level="debug")
    try:
        yield d
    finally:
        d.stop()


def test_cancelled_blob_put_stores_nothing_partial(debug_daemon: Daemon, tmp_path: Path) -> None:
    """A Put cancelled while the server holds staged chunks of it: once the server is done with
    the call (it logged the outcome), nothing partial is visible. gRPC delivers a cancellation and
    the end of a request stream as two separate events, so a server may see the end first: the
    bytes received then form a complete, verified (and unreferenced) blob, never a partial one."""
    first = os.urandom(MiB)
    second = os.urandom(MiB)
    asked_third = threading.Event()
    release = threading.Event()
    root = tmp_path / "store"

    def requests() -> Iterator[rb.BlobChunk]:
        yield rb.BlobChunk(data=first)
        yield rb.BlobChunk(data=second)
        asked_third.set()  # both sent: the consumer wants more
        release.wait(30)

    with grpc.insecure_channel(debug_daemon.address) as ch:
        stub = rbg.BlobServiceStub(ch)
        fut = stub.Put.future(requests(), timeout=30)
        assert asked_third.wait(10)
        wait_until(lambda: pack_bytes(root) >= MiB, what="chunks staged by the server")
        fut.cancel()  # while our request stream is still open
        assert fut.cancelled()
        debug_daemon.wait_log("Put: ")  # done with the call: cancelled, or (rarely) stored
        release.set()
        with pytest.raises(grpc.RpcError) as ei:  # never a blob of part of what was received
            stub.Stat(rb.StatBlobRequest(digest=blake3.blake3(first).digest()), timeout=10)
        assert ei.value.code() == grpc.StatusCode.NOT_FOUND
        whole = blake3.blake3(first + second).digest()
        try:
            stub.Stat(rb.StatBlobRequest(digest=whole), timeout=10)
        except grpc.RpcError as e:  # the usual outcome: the server saw the cancel
            assert e.code() == grpc.StatusCode.NOT_FOUND
            assert any("Put: cancelled, nothing stored" in line for line in debug_daemon.log)
        else:  # it saw the end of the stream first: what it stored is complete and verified
            got = b"".join(m.data for m in stub.Read(rb.ReadBlobRequest(digest=whole), timeout=10))
            assert got == first + second
        # the server is fine afterwards, and the same bytes upload normally
        resp = stub.Put(iter([rb.BlobChunk(data=first), rb.BlobChunk(data=second)]), timeout=30)
        assert resp.digest == whole


def test_cancelled_directory_put_stores_nothing_partial(debug_daemon: Daemon) -> None:
    """A Directory Put stream cancelled after a leaf and its parent were sent: once the server
    is done with the call, either nothing of it is stored, or (it saw the end of the stream
    first, see above) the whole valid graph — never the leaf alone."""
    leaf = Directory(files=(FileNode(b"f", B3Digest.of(b""), 0),))
    parent = Directory(directories=(leaf.as_node(b"leaf"),))
    with open_store(debug_daemon.url) as s:
        s.blobs.put(b"")
    sent = threading.Event()
    release = threading.Event()

    def requests() -> Iterator[castore_pb2.Directory]:
        yield castore_pb2.Directory.FromString(leaf.encoded)
        yield castore_pb2.Directory.FromString(parent.encoded)
        sent.set()
        release.wait(30)

    def stored(d: Directory) -> bool:
        try:
            list(stub.Get(rd.GetDirectoryRequest(digest=bytes(d.digest)), timeout=10))
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.NOT_FOUND
            return False
        return True

    with grpc.insecure_channel(debug_daemon.address) as ch:
        stub = rdg.DirectoryServiceStub(ch)
        fut = stub.Put.future(requests(), timeout=30)
        assert sent.wait(10)
        fut.cancel()
        assert fut.cancelled()
        debug_daemon.wait_log("Put: ")  # done with the call: cancelled, or (rarely) stored
        release.set()
        assert stored(leaf) == stored(parent)
        resp = stub.Put(iter([castore_pb2.Directory.FromString(x.encoded) for x in (leaf, parent)]))
        assert resp.root_digest == bytes(parent.digest)


# --- the client backend ------------------------------------------------------------------


def test_client_round_trip(client: Store, tmp_path: Path) -> None:
    data = os.urandom(5 * MiB + 3)
    with client.blobs.open_write() as w:
        for i in range(0, len(data), 777_777):
            w.write(data[i : i + 777_777])
    d = w.close()
    assert d.hex() == b3sum(data, tmp_path)
    assert client.blobs.put(HELLO).hex() == HELLO_HEX
    assert client.blobs.read_chunk(B3Digest.from_hex(HELLO_HEX)) == HELLO
    chunks = client.blobs.chunks(d)
    assert chunks and sum(c.size for c in chunks) == len(data)
    assert client.blobs.size(d) == len(data)
    r = client.blobs.open_read(d)
    assert r is not None and r.read() == data
    r.seek(len(data) - 10)
    assert r.read() == data[-10:]


def test_client_aborted_writer_stores_nothing(client: Store) -> None:
    data = os.urandom(3 * MiB)
    with pytest.raises(RuntimeError), client.blobs.open_write() as w:
        w.write(data)
        raise RuntimeError("caller failed mid-upload")
    w2 = client.blobs.open_write()
    w2.write(data[:MiB])
    w2.abort()
    for d in (data, data[:MiB]):
        assert client.blobs.chunks(B3Digest.of(d)) is None
        assert not client.blobs.has(B3Digest.of(d))


def test_client_not_found_is_none(client: Store) -> None:
    absent = B3Digest.of(b"absent from the daemon")
    assert client.blobs.chunks(absent) is None
    assert client.blobs.read_chunk(absent) is None
    assert client.blobs.open_read(absent) is None
    assert client.directories.get(absent) is None
    assert list(client.directories.get_recursive(absent)) == []
    assert client.pathinfos.get(b"\1" * 20) is None
    with pytest.raises(NotFoundError):
        client.pathinfos.calculate_nar(FileNode(b"f", absent, 3))


def test_client_directories_and_pathinfos(client: Store, served: Daemon, tmp_path: Path) -> None:
    blob = client.blobs.put(b"file contents\n")
    leaf = Directory(files=(FileNode(b"f", blob, 14, True),), symlinks=(SymlinkNode(b"l", b"f"),))
    mid = Directory(directories=(leaf.as_node(b"a"), leaf.as_node(b"b")))
    root = Directory(directories=(mid.as_node(b"m"),), files=(FileNode(b"g", blob, 14),))
    assert client.directories.put_graph([leaf, mid, root]) == root.digest
    assert client.directories.get(root.digest) == root
    got = list(client.directories.get_recursive(root.digest))
    assert got == [root, mid, leaf]  # breadth-first, leaf once
    node = root.as_node(b"x")
    size, sha = client.pathinfos.calculate_nar(node)
    dirs = {bytes(d.digest): d for d in (leaf, mid, root)}
    assert (size, sha) == nix_nar_hash(materialize(node, tmp_path, {bytes(blob): b"file contents\n"}, dirs))
    sp = StorePath.from_nar_sha256(sha, "tree")
    info = PathInfo(root.as_node(sp.basename.encode()), narinfo=NarInfo(size, sha))
    assert client.pathinfos.put(info) == info
    assert client.pathinfos.get(sp.digest) == info
    # without narinfo: snix.store.v1 refuses it, so the client sends it on tvix.store.v1
    bare = PathInfo(root.as_node(StorePath.from_nar_sha256(sha, "bare").basename.encode()))
    assert client.pathinfos.put(bare) == bare
    with open_store(served.url + "?protocol=g1", timeout=10) as g1:
        bare1 = PathInfo(root.as_node(StorePath.from_nar_sha256(sha, "bare1").basename.encode()))
        assert g1.pathinfos.put(bare1) == bare1


def test_client_maps_invalid_argument(client: Store) -> None:
    bad = Directory(files=(FileNode(b"b", B3Digest.of(b""), 0), FileNode(b"a", B3Digest.of(b""), 0)))
    with pytest.raises(ValidationError, match="sorted"):
        client.directories.put_graph([bad])
    missing_child = Directory(directories=(DirectoryNode(b"d", B3Digest.of(b"nope"), 0),))
    with pytest.raises(ValidationError, match="unknown directory"):
        client.directories.put(missing_child)


def test_read_chunk_from_many_threads(client: Store) -> None:
    blobs = [os.urandom(200_000 + i) for i in range(16)]
    digests = [client.blobs.put(b) for b in blobs]
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for j in range(10):
                i = (k + j) % len(blobs)
                assert client.blobs.read_chunk(digests[i]) == blobs[i]
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def all_calls(store: Store) -> dict[str, object]:
    d = B3Digest.of(b"x")
    return {
        "chunks": lambda: store.blobs.chunks(d),
        "read_chunk": lambda: store.blobs.read_chunk(d),
        "put": lambda: store.blobs.put(b"some bytes"),
        "dir get": lambda: store.directories.get(d),
        "dir get_recursive": lambda: list(store.directories.get_recursive(d)),
        "dir put": lambda: store.directories.put(Directory()),
        "pathinfo get": lambda: store.pathinfos.get(b"\1" * 20),
        "pathinfo put": lambda: store.pathinfos.put(
            PathInfo(SymlinkNode(StorePath(b"\1" * 20, "x").basename.encode(), b"t"))
        ),
        "calculate_nar": lambda: store.pathinfos.calculate_nar(SymlinkNode(b"x", b"t")),
    }


def test_unreachable_port_is_unavailable_without_waiting_for_the_deadline() -> None:
    """A refused connection is an answer: no call waits for its (long) deadline."""
    port = free_port()
    deadline = 60.0
    with open_store(f"grpc+http://127.0.0.1:{port}", timeout=deadline) as store:
        for name, call in all_calls(store).items():
            t0 = time.monotonic()
            with pytest.raises(UnavailableError, match=f"127.0.0.1:{port}"):
                call()  # type: ignore[operator]
            assert time.monotonic() - t0 < deadline / 2, name


@pytest.mark.slow
def test_silent_server_is_unavailable_within_timeout() -> None:
    """A listener that accepts TCP connections and never says a word: no call may hang."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)
    port = lsock.getsockname()[1]
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        lsock.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(lsock.accept()[0])
            except TimeoutError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    timeout = 1.0
    try:
        with open_store(f"grpc+http://127.0.0.1:{port}", timeout=timeout) as store:
            for name, call in all_calls(store).items():
                t0 = time.monotonic()
                with pytest.raises(UnavailableError, match=f"127.0.0.1:{port}"):
                    call()  # type: ignore[operator]
                took = time.monotonic() - t0
                assert took < timeout * 6 + GUARANTEE_SLACK, f"{name} took {took:.2f} s"  # ≤ CalculateNAR's deadline
        assert held, "the client never connected"
    finally:
        stop.set()
        t.join()
        for s in held:
            s.close()
        lsock.close()


# --- fault injection: in-process servers over lying / failing / stalling stores ----------


class _Lying(MemoryBlobService):
    """Hands out bytes that do not match their digest (a corrupt store without verification)."""

    def read_chunk(self, digest: B3Digest) -> bytes | None:
        data = super().read_chunk(digest)
        return None if data is None else b"X" + data[1:]


class _UnchunkedServicer(BlobServicer):
    """Stat answers no chunk list at all, like a tvix-store without finer chunking."""

    def Stat(self, request: rb.StatBlobRequest, context: grpc.ServicerContext) -> rb.BlobMeta:  # noqa: N802
        meta = super().Stat(request, context)
        return rb.BlobMeta(inline_bao=meta.inline_bao)


class _Failing(MemoryBlobService):
    def __init__(self, exc: Exception) -> None:
        super().__init__()
        self.exc = exc

    def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        raise self.exc


class _Stalling(MemoryBlobService):
    def __init__(self) -> None:
        super().__init__()
        self.stalling = False
        self.release = threading.Event()

    def read_chunk(self, digest: B3Digest) -> bytes | None:
        if self.stalling:
            self.release.wait(30)
        return super().read_chunk(digest)

    def open_write(self) -> BlobWriter:
        if self.stalling:
            self.release.wait(30)
        return super().open_write()


def serve_inprocess(blobs: BlobService) -> tuple[StoreServer, str]:
    base = open_store("memory://")
    server = StoreServer(Store(blobs, base.directories, base.pathinfos), max_streams=4)
    addr = server.bind("127.0.0.1:0")
    server.start()
    return server, addr


def test_client_verifies_chunk_bytes() -> None:
    blobs = _Lying()
    data = b"these bytes will come back corrupted"
    blobs.put(data)
    server, addr = serve_inprocess(blobs)
    try:
        with open_store(f"grpc+http://{addr}", timeout=5) as store:
            with pytest.raises(IntegrityError, match=B3Digest.of(data).hex()):
                store.blobs.read_chunk(B3Digest.of(data))
    finally:
        server.stop(0)


def test_client_treats_unchunked_blob_as_one_chunk() -> None:
    from concurrent.futures import ThreadPoolExecutor

    st = open_store("memory://")
    data = os.urandom(2 * MiB + 5)
    d = st.blobs.put(data)
    server = grpc.server(ThreadPoolExecutor(4))
    guard = StreamGuard()
    rbg.add_BlobServiceServicer_to_server(_UnchunkedServicer(st, guard), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with open_store(f"grpc+http://127.0.0.1:{port}", timeout=5) as store:
            assert store.blobs.chunks(d) == [ChunkMeta(d, len(data))]
            assert store.blobs.size(d) == len(data)
            assert store.blobs.open_read(d).read() == data
            assert store.blobs.chunks(B3Digest.of(b"absent")) is None
            assert store.blobs.chunks(B3Digest.of(b"")) is None  # absent stays absent, even the empty blob
            st.blobs.put(b"")
            assert store.blobs.chunks(B3Digest.of(b"")) == []
    finally:
        server.stop(0)
        guard.close()


@pytest.mark.parametrize(
    ("exc", "client_exc", "words"),
    [
        (StoreError("disk on fire"), StoreError, "INTERNAL: disk on fire"),
        (RuntimeError("bug"), StoreError, "INTERNAL: internal error: RuntimeError: bug"),
        (IntegrityError("chunk rotted"), IntegrityError, "chunk rotted"),
        (UnavailableError("backend down"), UnavailableError, "backend down"),
    ],
)
def test_server_maps_store_failures(exc: Exception, client_exc: type[StoreError], words: str) -> None:
    server, addr = serve_inprocess(_Failing(exc))
    try:
        with open_store(f"grpc+http://{addr}", timeout=5) as store:
            with pytest.raises(client_exc) as ei:
                store.blobs.chunks(B3Digest.of(b"a"))
            assert type(ei.value) is client_exc
            assert words in str(ei.value)
            assert "Traceback" not in str(ei.value)
    finally:
        server.stop(0)


def test_status_map() -> None:
    assert status_for(ValidationError("v"))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert status_for(NotFoundError("n"))[0] == grpc.StatusCode.NOT_FOUND
    assert status_for(IntegrityError("i"))[0] == grpc.StatusCode.DATA_LOSS
    assert status_for(UnavailableError("u"))[0] == grpc.StatusCode.UNAVAILABLE
    assert status_for(StoreError("s")) == (grpc.StatusCode.INTERNAL, "s")
    code, msg = status_for(KeyError("k\nmultiline"))
    assert code == grpc.StatusCode.INTERNAL and "\n" not in msg


@pytest.mark.slow
def test_stalled_stream_is_unavailable_within_timeout() -> None:
    blobs = _Stalling()
    d = blobs.put(b"stuck")
    blobs.stalling = True
    server, addr = serve_inprocess(blobs)
    try:
        timeout = 1.0
        with open_store(f"grpc+http://{addr}", timeout=timeout) as store:
            t0 = time.monotonic()
            with pytest.raises(UnavailableError, match="no progress"):
                store.blobs.read_chunk(d)
            assert time.monotonic() - t0 < timeout + GUARANTEE_SLACK  # the idle timeout holds
            t0 = time.monotonic()
            with pytest.raises(UnavailableError):
                store.blobs.put(b"x" * (20 * MiB))  # server never reads: flow control stalls the upload
            assert time.monotonic() - t0 < timeout + GUARANTEE_SLACK
    finally:
        blobs.release.set()
        server.stop(0)


def test_slow_writer_caller_is_not_a_stall(client: Store) -> None:
    """Time the caller spends between writes does not count against the idle timeout."""
    with open_store(client.url, timeout=0.5) as s:
        w = s.blobs.open_write()
        w.write(b"part one ")
        done = threading.Event()
        done.wait(1.2)  # the caller is busy elsewhere for longer than the timeout
        w.write(b"part two")
        assert w.close() == B3Digest.of(b"part one part two")


def test_slow_stream_consumer_is_not_a_stall(client: Store) -> None:
    """Time the caller spends with a yielded Directory does not count against the idle timeout."""
    leaf = Directory(symlinks=(SymlinkNode(b"l", b"t"),))
    mid = Directory(directories=(leaf.as_node(b"leaf"),))
    root = Directory(directories=(mid.as_node(b"mid"),))
    client.directories.put_graph([leaf, mid, root])
    busy = threading.Event()
    with open_store(client.url, timeout=0.5) as s:
        got = []
        for d in s.directories.get_recursive(root.digest):
            busy.wait(0.7)  # the caller works on each Directory for longer than the timeout
            got.append(d)
    assert got == [root, mid, leaf]


# --- bounded memory: a 2 GiB blob through client and daemon ------------------------------

_CLIENT_SCRIPT = r"""
import json, sys, blake3
from tvix_store.compose import open_store
url, size = sys.argv[1], int(sys.argv[2])
MiB = 1 << 20
def piece(i):  # unique, cheap, reproducible: blake3 XOF keyed by a counter
    return blake3.blake3(i.to_bytes(8, "little")).digest(length=MiB)
h = blake3.blake3()
with open_store(url, timeout=30) as store:
    with store.blobs.open_write() as w:
        for i in range(size // MiB):
            p = piece(i)
            h.update(p)
            w.write(p)
    d = w.close()
    assert d == h.digest(), "digest mismatch"
    r = store.blobs.open_read(d)
    h2, n = blake3.blake3(), 0
    while buf := r.read(4 * MiB):
        h2.update(buf)
        n += len(buf)
    assert n == size and h2.digest() == d, (n, size)
    chunks = store.blobs.chunks(d)
rss = {l.split(":")[0]: l.split()[1] for l in open("/proc/self/status") if l.startswith(("VmHWM", "VmRSS"))}
print(json.dumps({"digest": d.hex(), "chunks": len(chunks), "hwm_kib": int(rss["VmHWM"])}))
"""


def vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_2gib_blob_bounded_memory(tmp_path: Path) -> None:
    size = 2 << 30
    d = Daemon(f"local://{tmp_path / 'store'}")
    try:
        before = vm_hwm_kib(d.proc.pid)
        p = subprocess.run(
            [sys.executable, "-c", _CLIENT_SCRIPT, d.url, str(size)],
            capture_output=True,
            text=True,
            timeout=540,
            cwd=REPO,
        )
        assert p.returncode == 0, p.stderr[-3000:]
        result = json.loads(p.stdout.strip().splitlines()[-1])
        daemon_hwm = vm_hwm_kib(d.proc.pid)
    finally:
        d.stop()
    print(
        f"\n2 GiB blob {result['digest']} ({result['chunks']} chunks): client peak RSS {result['hwm_kib'] // 1024} MiB,"
        f" daemon peak RSS {daemon_hwm // 1024} MiB (at start {before // 1024} MiB)"
    )
    assert result["chunks"] > 1
    assert result["hwm_kib"] < 400 * 1024
    assert daemon_hwm < 400 * 1024
