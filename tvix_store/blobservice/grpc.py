"""BlobService client of a remote BlobService of any protocol generation (`grpc+http://…`,
`grpc+unix://…`): `snix.castore.v1`, `tvix.castore.v1` or `tvix.store.v1`, the newest the
remote serves (`Remote.codec("blob")`: detected once per channel, or forced by `?protocol=`).

Works against this project's daemon, any tvix-store and snix. Every call
goes through the store's shared `tvix_store.remote.channel.Remote` (breaker, deadlines, idle
watchdog, error map). Everything received is verified: chunk bytes against their BLAKE3
digest, the digest a Put returns against the locally computed one (IntegrityError otherwise).

Chunks: `chunks(d)` asks Stat for the chunk list. A tvix-store or snix without finer chunking
answers an empty list for a non-empty blob; the blob is then treated as its own single chunk,
and its size (which Stat does not carry) is learned by streaming the blob once through a
hasher (verifying it, holding none of it) and remembered in a bounded in-memory map.
Thread-safe; `read_chunk` may be called from many threads at once (each call is its own
stream on the shared channel). Not a cache (`blobservice.cached` is).
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import grpc

from tvix_store.blobservice import BlobService, BlobWriter
from tvix_store.core.capabilities import REMOTE
from tvix_store.core.chunks import ChunkMeta
from tvix_store.core.digest import EMPTY_DIGEST, B3Digest, blake3_of, new_hasher
from tvix_store.core.errors import IntegrityError, NotFoundError, StoreError, UnavailableError, ValidationError
from tvix_store.protocol import wire
from tvix_store.protocol.codec import Codec
from tvix_store.remote.channel import Remote

#: Largest BlobChunk message a writer sends.
PUT_MESSAGE_SIZE = 1 << 20
#: Messages a blob writer buffers ahead of the network (so at most ~8 MiB in flight).
PUT_QUEUE_DEPTH = 8
#: Calls the batch methods (`read_many`, `has_many`, `put_many`) keep in flight at once.
WINDOW = 64
_SIZE_CACHE_ENTRIES = 4096


class GrpcBlobService(BlobService):
    """BlobService over a remote BlobService (see module docstring)."""

    capabilities = REMOTE

    def __init__(self, remote: Remote) -> None:
        self._r = remote
        self._stubs: dict[str, Any] = {}
        self._sizes: OrderedDict[B3Digest, int] = OrderedDict()
        self._sizes_lock = threading.Lock()

    def _stub(self, c: Codec) -> Any:
        """A stub of the BlobService of generation `c` on the shared channel."""
        stub = self._stubs.get(c.tag)
        if stub is None:
            stub = self._stubs[c.tag] = c.blobstore_grpc.BlobServiceStub(self._r.channel)
        return stub

    def _codec(self) -> tuple[Codec, Any]:
        """The remote's confirmed generation (probed if need be) and its stub."""
        c = self._r.codec("blob")
        return c, self._stub(c)

    def has(self, digest: B3Digest) -> bool:
        def stat(c: Codec) -> bool:
            return self._r.unary(self._stub(c).Stat, c.stat_request(digest, False), f"Stat {digest.hex()}") is not None

        return self._r.negotiate("blob", stat)

    def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        def stat(c: Codec) -> tuple[Codec, Any]:
            return c, self._r.unary(self._stub(c).Stat, c.stat_request(digest, True), f"Stat {digest.hex()}")

        c, meta = self._r.negotiate("blob", stat)
        if meta is None:
            return None
        try:
            chunks = c.chunks_from_stat(meta)
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

        def read(c: Codec) -> tuple[int, bytes] | None:
            size = 0
            h = new_hasher()
            try:
                for msg in self._read_stream(c, digest):
                    size += len(msg.data)
                    h.update(msg.data)
            except NotFoundError:
                return None
            return size, h.digest()

        got = self._r.negotiate("blob", read)
        if got is None:
            return None
        size, hashed = got
        if hashed != digest:
            raise IntegrityError(f"blob {digest.hex()} from {self._r.name} does not hash to its digest")
        with self._sizes_lock:
            self._sizes[digest] = size
            while len(self._sizes) > _SIZE_CACHE_ENTRIES:
                self._sizes.popitem(last=False)
        return size

    def _read_stream(self, c: Codec, digest: B3Digest) -> Iterator[Any]:
        req = c.blobstore.ReadBlobRequest(digest=bytes(digest))
        return self._r.server_stream(self._stub(c).Read, req, f"Read {digest.hex()}")

    def read_chunk(self, digest: B3Digest) -> bytes | None:
        def read(c: Codec) -> tuple[list[bytes], bytes] | None:
            parts: list[bytes] = []
            h = new_hasher()
            try:
                for msg in self._read_stream(c, digest):
                    parts.append(msg.data)
                    h.update(msg.data)
            except NotFoundError:
                if parts:
                    raise StoreError(f"remote store {self._r.name} lost blob {digest.hex()} while sending it") from None
                return None
            return parts, h.digest()

        got = self._r.negotiate("blob", read)
        if got is None:
            return None
        parts, hashed = got
        if hashed != digest:
            raise IntegrityError(f"chunk {digest.hex()} from {self._r.name} does not hash to its digest")
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read_many(self, digests: Sequence[B3Digest]) -> Iterator[tuple[B3Digest, bytes | None | StoreError]]:
        """Up to WINDOW Reads in flight at once (each ≤ the deadline), answered as they complete;
        each answer verified. While the remote's generation is not settled, the first Read goes
        alone (negotiating it), the rest then together."""
        if digests and not self._r.negotiation.candidate("blob")[1]:
            first: bytes | None | StoreError
            try:
                first = self.read_chunk(digests[0])
            except UnavailableError:
                raise
            except StoreError as e:
                first = e
            yield digests[0], first
            digests = digests[1:]
        t = self._r.timeout
        c, _ = self._codec()

        def read(d: B3Digest) -> Callable[[grpc.aio.Channel], Awaitable[bytes]]:
            async def call(ch: grpc.aio.Channel) -> bytes:
                stub = c.blobstore_grpc.BlobServiceStub(ch)
                parts = [m.data async for m in stub.Read(c.blobstore.ReadBlobRequest(digest=bytes(d)), timeout=t)]
                return parts[0] if len(parts) == 1 else b"".join(parts)

            return call

        for i, res in self._r.many([read(d) for d in digests], lambda i: f"Read {digests[i].hex()}", WINDOW):
            d = digests[i]
            if isinstance(res, bytes) and blake3_of(res) != d:
                res = IntegrityError(f"chunk {d.hex()} from {self._r.name} does not hash to its digest")
            yield d, res

    def has_many(self, digests: Sequence[B3Digest]) -> list[bool]:
        """Up to WINDOW Stats in flight at once (the first alone while the remote's generation
        is not settled, as in `read_many`)."""
        if digests and not self._r.negotiation.candidate("blob")[1]:
            return [self.has(digests[0]), *self.has_many(digests[1:])]
        t = self._r.timeout
        c, _ = self._codec()

        def stat(d: B3Digest) -> Callable[[grpc.aio.Channel], Awaitable[object]]:
            def call(ch: grpc.aio.Channel) -> Awaitable[object]:
                stub = c.blobstore_grpc.BlobServiceStub(ch)
                return stub.Stat(c.stat_request(d, False), timeout=t)

            return call

        out = [False] * len(digests)
        for i, res in self._r.many([stat(d) for d in digests], lambda i: f"Stat {digests[i].hex()}", WINDOW):
            if isinstance(res, StoreError):
                raise res
            out[i] = res is not None
        return out

    def put_many(self, blobs: Sequence[bytes]) -> list[B3Digest]:
        """Up to WINDOW Puts in flight at once; each digest the remote answers is checked."""
        local = [B3Digest(blake3_of(b)) for b in blobs]
        t = self._r.timeout
        c, _ = self._codec()

        def put(b: bytes) -> Callable[[grpc.aio.Channel], Awaitable[object]]:
            def call(ch: grpc.aio.Channel) -> Awaitable[object]:
                stub = c.blobstore_grpc.BlobServiceStub(ch)
                view = memoryview(b)
                msgs = [
                    c.blobstore.BlobChunk(data=bytes(view[off : off + PUT_MESSAGE_SIZE]))
                    for off in range(0, len(b), PUT_MESSAGE_SIZE)
                ]
                return stub.Put(iter(msgs), timeout=t + len(b) / (1 << 20))

            return call

        for i, res in self._r.many([put(b) for b in blobs], lambda i: f"Put {local[i].hex()}", WINDOW):
            if res is None or isinstance(res, StoreError):
                raise res or StoreError(f"remote store {self._r.name} (Put): not found")
            try:
                got = wire.digest_from_proto(res.digest, "digest returned by Put")
            except ValidationError as e:
                raise IntegrityError(f"remote store {self._r.name}: {e}") from None
            if got != local[i]:
                raise IntegrityError(
                    f"remote store {self._r.name} stored {got.hex()}, but the bytes sent hash to {local[i].hex()}"
                )
        return local

    def open_write(self) -> BlobWriter:
        c, stub = self._codec()
        return _GrpcBlobWriter(self._r, stub, c.blobstore.BlobChunk)

    def available(self) -> bool:
        return not self._r.is_down

    def close(self) -> None:
        self._r.close()


_END = object()
_ABORT = object()


class _GrpcBlobWriter(BlobWriter):
    """Streams a Put from a bounded queue: the caller's `write` enqueues ≤ 1 MiB messages, gRPC's
    request-consumer thread sends them, so at most PUT_QUEUE_DEPTH messages sit in memory."""

    def __init__(self, remote: Remote, stub: Any, blob_chunk: type[Any]) -> None:
        remote.check()
        self._r = remote
        self._blob_chunk = blob_chunk
        self._q: queue.Queue[object] = queue.Queue(maxsize=PUT_QUEUE_DEPTH)
        self._hasher = new_hasher()
        self._digest: B3Digest | None = None
        self._done = False  # closed, aborted or failed
        self._closing = False
        self._wanting = False  # the sender waits for the caller to write more: not a stall
        self._watch = remote.watchdog.watch(idle_ok=lambda: self._wanting and not self._closing)
        self._future = stub.Put.future(self._requests())
        self._watch.call = self._future

    def _requests(self) -> Iterator[Any]:
        while True:
            self._wanting = True
            item = self._q.get()
            self._wanting = False
            self._watch.touch()
            if item is _END or item is _ABORT:
                return
            assert isinstance(item, bytes)
            yield self._blob_chunk(data=item)

    def _failure(self) -> StoreError:
        self._done = True
        self._r.watchdog.release(self._watch)
        try:
            self._future.result(timeout=0)
        except (grpc.RpcError, grpc.FutureCancelledError) as e:
            return self._r.failed(e, "Put", self._watch)
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
