"""A `Store` backed by a remote `tvix.store.v1` server: gRPC client implementations of
BlobService, DirectoryService and PathInfoService (`open_grpc_store`).

Works against this project's daemon and any tvix-store of the protocol's revision. Not a
cache (see `tvix_store.cached`, which is built on top of this) and not a server.

Errors (mapped once, in `_Remote.error`): NOT_FOUND is a value (`None`) where the
interface allows it; UNAVAILABLE, DEADLINE_EXCEEDED, a stalled stream or a connection
failure → UnavailableError naming the remote; INVALID_ARGUMENT → ValidationError;
anything else → StoreError. Everything received is verified: chunk bytes against their
blake3 digest, Directories against the digest they were asked by (or referenced by),
the digest a Put returns against the locally computed one (IntegrityError otherwise).

Deadline policy (a stalled server never hangs a caller for much more than `timeout`):
- unary calls (Stat, PathInfo Get/Put): a deadline of `timeout` seconds.
- CalculateNAR: the server does work proportional to the tree, so its deadline is
  `timeout` plus one second per 32 MiB for a file node, and `6 × timeout` for a
  directory node (whose total size is unknown up front).
- streams (Read, Directory Get, Blob and Directory Put): no overall deadline (a 2 GiB
  blob may take minutes), but an idle timeout: a watchdog thread cancels a stream that
  made no progress (no message received, no message accepted for sending, no response
  after the last one) for `timeout` seconds, and the caller gets UnavailableError. Time
  a blob writer spends waiting for its own caller to write more does not count.

Chunks: `chunks(d)` asks Stat with include_chunks. A tvix-store without finer chunking
may answer an empty list for a non-empty blob; the blob is then treated as its own
single chunk, and its size (which Stat does not carry) is learned by streaming the blob
once through a hasher (verifying it, holding none of it) and remembered in a bounded
in-memory map. All classes are thread-safe; `read_chunk` may be called from many
threads at once (each call is its own stream on the shared channel).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import blake3
import grpc

from tvix_store import wire
from tvix_store.blobservice import BlobService, BlobWriter, ChunkMeta
from tvix_store.castore import Directory, DirectoryNode, FileNode, Node
from tvix_store.digest import EMPTY_DIGEST, B3Digest
from tvix_store.directoryservice import DirectoryService
from tvix_store.errors import IntegrityError, NotFoundError, StoreError, UnavailableError, ValidationError
from tvix_store.grpc.status import error_from_status
from tvix_store.pathinfo import PathInfo
from tvix_store.pathinfoservice import PathInfoService, check_output_hash
from tvix_store.proto import (
    pathinfo_pb2,
    rpc_blobstore_pb2,
    rpc_blobstore_pb2_grpc,
    rpc_directory_pb2,
    rpc_directory_pb2_grpc,
    rpc_pathinfo_pb2,
    rpc_pathinfo_pb2_grpc,
)
from tvix_store.store import Store

log = logging.getLogger("tvix_store.grpc.client")

DEFAULT_TIMEOUT = 10.0
#: Largest BlobChunk message a writer sends.
PUT_MESSAGE_SIZE = 1 << 20
#: Messages a blob writer buffers ahead of the network (so at most ~8 MiB in flight).
PUT_QUEUE_DEPTH = 8
MAX_MESSAGE_SIZE = 64 << 20
_SIZE_CACHE_ENTRIES = 4096

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_SIZE),
    ("grpc.max_send_message_length", MAX_MESSAGE_SIZE),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
    # recover quickly when the remote comes back
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 1_000),  # also the handshake timeout of a connection attempt
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


class _Watch:
    """One watched stream: progress time, the call to cancel, and whether idling is the caller's choice."""

    __slots__ = ("call", "last", "timed_out", "idle_ok")

    def __init__(self, idle_ok: Callable[[], bool] | None = None) -> None:
        self.call: Any = None
        self.last = time.monotonic()
        self.timed_out = False
        self.idle_ok = idle_ok

    def touch(self) -> None:
        self.last = time.monotonic()


class _Watchdog:
    """Cancels watched streams that made no progress for `timeout` seconds (one thread per channel)."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._interval = min(0.25, timeout / 4)
        self._watches: set[_Watch] = set()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def watch(self, idle_ok: Callable[[], bool] | None = None) -> _Watch:
        w = _Watch(idle_ok)
        with self._cond:
            self._watches.add(w)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="grpc-watchdog", daemon=True)
                self._thread.start()
            self._cond.notify()
        return w

    def release(self, w: _Watch) -> None:
        with self._cond:
            self._watches.discard(w)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._watches and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                self._cond.wait(self._interval)
                now = time.monotonic()
                stalled = []
                for w in list(self._watches):
                    if w.idle_ok is not None and w.idle_ok():
                        w.last = now
                    elif w.call is not None and now - w.last > self.timeout:
                        w.timed_out = True
                        stalled.append(w)
                        self._watches.discard(w)
            for w in stalled:
                w.call.cancel()


class _Remote:
    """The channel shared by the three services of one store, and the one error map."""

    def __init__(self, target: str, name: str, timeout: float) -> None:
        self.target = target
        self.name = name or target
        self.timeout = timeout
        self.channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self.watchdog = _Watchdog(timeout)
        self._closed = False
        self._lock = threading.Lock()

    def error(self, e: BaseException, what: str, watch: _Watch | None = None) -> StoreError:
        if watch is not None and watch.timed_out:
            return UnavailableError(
                f"remote store {self.name} unavailable ({what}): no progress for {self.timeout:g} s, call cancelled"
            )
        if isinstance(e, grpc.Call):
            code, details = e.code(), e.details()
            if code is grpc.StatusCode.DEADLINE_EXCEEDED:
                details = f"no answer within the deadline ({details})"
            return error_from_status(code, details, self.name, what)
        if isinstance(e, grpc.FutureCancelledError):
            return UnavailableError(f"remote store {self.name} unavailable ({what}): call cancelled")
        return StoreError(f"remote store {self.name} ({what}): {e}")

    def unary(
        self, method: Any, request: Any, what: str, timeout: float | None = None, none_if_absent: bool = True
    ) -> Any:
        """Call a unary method with a deadline; None for NOT_FOUND (if `none_if_absent`)."""
        try:
            return method(request, timeout=timeout or self.timeout)
        except grpc.RpcError as e:
            if none_if_absent and isinstance(e, grpc.Call) and e.code() is grpc.StatusCode.NOT_FOUND:
                return None
            raise self.error(e, what) from None

    def server_stream(self, method: Any, request: Any, what: str) -> Iterator[Any]:
        """Iterate a response stream under the idle watchdog; NotFoundError for NOT_FOUND.

        Closing the generator early cancels the call."""
        in_caller = False  # time the caller spends with a yielded message is not a stall

        def idle_ok() -> bool:
            return in_caller

        w = self.watchdog.watch(idle_ok)
        call = method(request)
        w.call = call
        try:
            for msg in call:
                in_caller = True
                yield msg
                in_caller = False
                w.touch()
        except grpc.RpcError as e:
            raise self.error(e, what, w) from None
        finally:
            self.watchdog.release(w)
            call.cancel()

    def client_stream(self, method: Any, requests: Iterable[Any], what: str) -> Any:
        """Send a request stream under the idle watchdog; return the response."""
        w = self.watchdog.watch()

        def gen() -> Iterator[Any]:
            for r in requests:
                w.touch()
                yield r
            w.touch()

        fut = method.future(gen())
        w.call = fut
        try:
            return fut.result()
        except (grpc.RpcError, grpc.FutureCancelledError) as e:
            raise self.error(e, what, w) from None
        finally:
            self.watchdog.release(w)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.watchdog.close()
        self.channel.close()


class GrpcBlobService(BlobService):
    """BlobService over a remote BlobService (see module docstring)."""

    def __init__(self, remote: _Remote) -> None:
        self._r = remote
        self._stub = rpc_blobstore_pb2_grpc.BlobServiceStub(remote.channel)
        self._sizes: OrderedDict[B3Digest, int] = OrderedDict()
        self._sizes_lock = threading.Lock()

    def has(self, digest: B3Digest) -> bool:
        req = rpc_blobstore_pb2.StatBlobRequest(digest=bytes(digest))
        return self._r.unary(self._stub.Stat, req, f"Stat {digest.hex()}") is not None

    def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        req = rpc_blobstore_pb2.StatBlobRequest(digest=bytes(digest), include_chunks=True)
        meta = self._r.unary(self._stub.Stat, req, f"Stat {digest.hex()}")
        if meta is None:
            return None
        try:
            chunks = wire.chunks_from_proto(meta)
        except ValidationError as e:
            raise IntegrityError(f"remote store {self._r.name} sent a bad chunk list for {digest.hex()}: {e}") from None
        if chunks or digest == EMPTY_DIGEST:
            return chunks
        # A remote without finer chunking: the blob is its own only chunk, of a size Stat does not say.
        size = self._blob_size(digest)
        return None if size is None else [ChunkMeta(digest, size)]

    def _blob_size(self, digest: B3Digest) -> int | None:
        with self._sizes_lock:
            if (size := self._sizes.get(digest)) is not None:
                self._sizes.move_to_end(digest)
                return size
        size = 0
        h = blake3.blake3()
        try:
            for msg in self._read_stream(digest):
                size += len(msg.data)
                h.update(msg.data)
        except NotFoundError:
            return None
        if h.digest() != digest:
            raise IntegrityError(f"blob {digest.hex()} from {self._r.name} does not hash to its digest")
        with self._sizes_lock:
            self._sizes[digest] = size
            while len(self._sizes) > _SIZE_CACHE_ENTRIES:
                self._sizes.popitem(last=False)
        return size

    def _read_stream(self, digest: B3Digest) -> Iterator[rpc_blobstore_pb2.BlobChunk]:
        req = rpc_blobstore_pb2.ReadBlobRequest(digest=bytes(digest))
        return self._r.server_stream(self._stub.Read, req, f"Read {digest.hex()}")

    def read_chunk(self, digest: B3Digest) -> bytes | None:
        parts: list[bytes] = []
        h = blake3.blake3()
        try:
            for msg in self._read_stream(digest):
                parts.append(msg.data)
                h.update(msg.data)
        except NotFoundError:
            if parts:
                raise StoreError(f"remote store {self._r.name} lost blob {digest.hex()} while sending it") from None
            return None
        if h.digest() != digest:
            raise IntegrityError(f"chunk {digest.hex()} from {self._r.name} does not hash to its digest")
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def open_write(self) -> BlobWriter:
        return _GrpcBlobWriter(self._r, self._stub)

    def close(self) -> None:
        self._r.close()


_END = object()
_ABORT = object()


class _GrpcBlobWriter(BlobWriter):
    """Streams a Put from a bounded queue: the caller's `write` enqueues ≤ 1 MiB messages, gRPC's
    request-consumer thread sends them, so at most PUT_QUEUE_DEPTH messages sit in memory."""

    def __init__(self, remote: _Remote, stub: rpc_blobstore_pb2_grpc.BlobServiceStub) -> None:
        self._r = remote
        self._q: queue.Queue[object] = queue.Queue(maxsize=PUT_QUEUE_DEPTH)
        self._hasher = blake3.blake3()
        self._digest: B3Digest | None = None
        self._done = False  # closed, aborted or failed
        self._closing = False
        self._wanting = False  # the sender waits for the caller to write more: not a stall
        self._watch = remote.watchdog.watch(idle_ok=lambda: self._wanting and not self._closing)
        self._future = stub.Put.future(self._requests())
        self._watch.call = self._future

    def _requests(self) -> Iterator[rpc_blobstore_pb2.BlobChunk]:
        while True:
            self._wanting = True
            item = self._q.get()
            self._wanting = False
            self._watch.touch()
            if item is _END or item is _ABORT:
                return
            assert isinstance(item, bytes)
            yield rpc_blobstore_pb2.BlobChunk(data=item)

    def _failure(self) -> StoreError:
        self._done = True
        self._r.watchdog.release(self._watch)
        try:
            self._future.result(timeout=0)
        except (grpc.RpcError, grpc.FutureCancelledError) as e:
            return self._r.error(e, "Put", self._watch)
        except Exception as e:  # noqa: BLE001 - reported as the store failure it is
            return StoreError(f"remote store {self._r.name} (Put): {e}")
        return StoreError(f"remote store {self._r.name} (Put): call ended before the upload did")

    def _put(self, item: object) -> None:
        while True:
            try:
                self._q.put(item, timeout=0.1)
                return
            except queue.Full:
                if self._future.done():
                    raise self._failure() from None

    def write(self, data: bytes | memoryview) -> int:
        if self._done or self._closing:
            raise ValueError("write to a closed blob writer")
        view = memoryview(data).cast("B")
        self._hasher.update(view)
        for off in range(0, len(view), PUT_MESSAGE_SIZE):
            self._put(bytes(view[off : off + PUT_MESSAGE_SIZE]))
        return len(view)

    def close(self) -> B3Digest:
        if self._digest is not None:
            return self._digest
        if self._done:
            raise ValueError("close of an aborted or failed blob writer")
        self._closing = True
        self._watch.touch()
        self._put(_END)
        try:
            resp = self._future.result()
        except (grpc.RpcError, grpc.FutureCancelledError):
            raise self._failure() from None
        self._done = True
        self._r.watchdog.release(self._watch)
        try:
            remote_digest = wire.digest_from_proto(resp.digest, "digest returned by Put")
        except ValidationError as e:
            raise IntegrityError(f"remote store {self._r.name}: {e}") from None
        local = B3Digest(self._hasher.digest())
        if remote_digest != local:
            raise IntegrityError(
                f"remote store {self._r.name} stored {remote_digest.hex()}, but the bytes sent hash to {local.hex()}"
            )
        self._digest = local
        return local

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        self._r.watchdog.release(self._watch)
        # cancel first, so ending the request stream below can never commit a partial blob
        self._future.cancel()
        while True:
            try:
                self._q.get_nowait()
            except queue.Empty:
                break
        try:
            self._q.put_nowait(_ABORT)
        except queue.Full:  # pragma: no cover - the queue was just drained
            pass


class GrpcDirectoryService(DirectoryService):
    """DirectoryService over a remote DirectoryService; verifies every Directory received."""

    def __init__(self, remote: _Remote) -> None:
        self._r = remote
        self._stub = rpc_directory_pb2_grpc.DirectoryServiceStub(remote.channel)

    def _decode(self, msg: Any) -> Directory:
        try:
            return wire.directory_from_proto(msg)
        except ValidationError as e:
            raise IntegrityError(f"remote store {self._r.name} sent an invalid directory: {e}") from None

    def get(self, digest: B3Digest) -> Directory | None:
        req = rpc_directory_pb2.GetDirectoryRequest(digest=bytes(digest))
        what = f"directory Get {digest.hex()}"
        try:
            msgs = list(self._stub.Get(req, timeout=self._r.timeout))
        except grpc.RpcError as e:
            if isinstance(e, grpc.Call) and e.code() is grpc.StatusCode.NOT_FOUND:
                return None
            raise self._r.error(e, what) from None
        if len(msgs) != 1:
            raise IntegrityError(f"remote store {self._r.name} answered {len(msgs)} directories for {what}")
        d = self._decode(msgs[0])
        if d.digest != digest:
            raise IntegrityError(f"remote store {self._r.name} sent directory {d.digest.hex()} for {digest.hex()}")
        return d

    def get_recursive(self, digest: B3Digest) -> Iterator[Directory]:
        req = rpc_directory_pb2.GetDirectoryRequest(digest=bytes(digest), recursive=True)
        expected: dict[B3Digest, int | None] = {digest: None}  # digest → size its reference states
        received: set[B3Digest] = set()
        try:
            for msg in self._r.server_stream(self._stub.Get, req, f"directory Get {digest.hex()} (recursive)"):
                d = self._decode(msg)
                dg = d.digest
                if dg not in expected:
                    raise IntegrityError(
                        f"remote store {self._r.name} sent directory {dg.hex()}, not referenced by any sent before"
                    )
                if (size := expected[dg]) is not None and size != d.size:
                    raise IntegrityError(f"directory {dg.hex()} has size {d.size}, its reference says {size}")
                if dg in received:
                    continue
                received.add(dg)
                for child in d.directories:
                    expected.setdefault(child.digest, child.size)
                yield d
        except NotFoundError:
            if not received:
                return
            raise
        missing = expected.keys() - received
        if missing:
            m = next(iter(missing))
            raise NotFoundError(f"directory {m.hex()} (below {digest.hex()}) missing from {self._r.name}")

    def _store(self, directory: Directory) -> None:
        self.put_graph([directory])

    def put_graph(self, directories: Iterable[Directory]) -> B3Digest:
        dirs = list(directories)
        if not dirs:
            raise ValidationError("no directories sent")
        resp = self._r.client_stream(
            self._stub.Put, (wire.directory_to_proto(d) for d in dirs), f"directory Put of {len(dirs)}"
        )
        try:
            root = wire.digest_from_proto(resp.root_digest, "root digest returned by directory Put")
        except ValidationError as e:
            raise IntegrityError(f"remote store {self._r.name}: {e}") from None
        if root != dirs[-1].digest:
            raise IntegrityError(
                f"remote store {self._r.name} answered root {root.hex()} for a graph rooted at {dirs[-1].digest.hex()}"
            )
        return root

    def close(self) -> None:
        self._r.close()


class GrpcPathInfoService(PathInfoService):
    """PathInfoService over a remote PathInfoService; CalculateNAR runs on the remote."""

    def __init__(self, remote: _Remote) -> None:
        self._r = remote
        self._stub = rpc_pathinfo_pb2_grpc.PathInfoServiceStub(remote.channel)

    def get(self, output_hash: bytes) -> PathInfo | None:
        check_output_hash(output_hash)
        req = rpc_pathinfo_pb2.GetPathInfoRequest(by_output_hash=output_hash)
        resp = self._r.unary(self._stub.Get, req, f"path info Get {output_hash.hex()}")
        if resp is None:
            return None
        try:
            return wire.pathinfo_from_proto(resp)
        except ValidationError as e:
            raise IntegrityError(f"remote store {self._r.name} sent an invalid path info: {e}") from None

    def put(self, info: PathInfo) -> PathInfo:
        sp = info.validate()
        resp = self._r.unary(
            self._stub.Put, wire.pathinfo_to_proto(info), f"path info Put {sp.basename}", none_if_absent=False
        )
        try:
            return wire.pathinfo_from_proto(resp)
        except ValidationError as e:
            raise IntegrityError(f"remote store {self._r.name} sent an invalid path info: {e}") from None

    def calculate_nar(self, node: Node) -> tuple[int, bytes]:
        t = self._r.timeout
        if isinstance(node, FileNode):
            t += node.size / (32 << 20)
        elif isinstance(node, DirectoryNode):
            t *= 6
        req: pathinfo_pb2.Node = wire.node_to_proto(node)
        resp = self._r.unary(self._stub.CalculateNAR, req, "CalculateNAR", timeout=t, none_if_absent=False)
        if len(resp.nar_sha256) != 32:
            raise IntegrityError(f"remote store {self._r.name} sent a NAR sha256 of {len(resp.nar_sha256)} bytes")
        return resp.nar_size, bytes(resp.nar_sha256)

    def close(self) -> None:
        self._r.close()


def open_grpc_store(target: str, url: str = "", *, timeout: float = DEFAULT_TIMEOUT) -> Store:
    """A Store over the remote at `target` (`HOST:PORT` or `unix:/abs/path`); connects lazily.

    `url` names the remote in error messages; `timeout` is the deadline policy's unit
    (module docstring). Closing the store closes the one channel its services share.
    """
    if timeout <= 0:
        raise ValidationError(f"invalid timeout {timeout!r}: must be positive")
    remote = _Remote(target, url, timeout)
    return Store(GrpcBlobService(remote), GrpcDirectoryService(remote), GrpcPathInfoService(remote), url or target)
