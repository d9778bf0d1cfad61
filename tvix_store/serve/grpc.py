"""gRPC servicers of `tvix.store.v1` (BlobService, DirectoryService, PathInfoService) over any
`Store`, plus `StoreServer`, which binds them with reflection and health checking.

The servicers only translate: wire messages become validated domain objects in
`tvix_store.protocol.wire`, writes pass the cross-object checks of `tvix_store.admission`
(blobs before the Directories naming them, complete closures and matching NarHash before a
PathInfo, no store path replaced), the store does the work, and exceptions become status codes
in one place (`tvix_store.remote.status.map_errors`). They never see backend types, and they
stream: a blob is read and written chunk by chunk, never held whole; a Directory Put stream is
held in a bounded spool (`tvix_store.serve.spool`). Not a client (see `tvix_store.remote`) and
not the daemon's process lifecycle (`tvix_store.cli.daemon`). TLS and bearer tokens are wired
in `StoreServer` (`tokens`, `bind(address, tls)`) from `tvix_store.serve.grpcauth`.

Stat's `include_bao` is accepted but answered with an empty `inline_bao`: outboard bao
is not supported (PROTOCOL.md allows "empty if unsupported").
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from contextlib import AbstractContextManager, nullcontext
from types import ModuleType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tvix_store.admission import Admission
from tvix_store.core.digest import B3Digest
from tvix_store.core.errors import NotFoundError, StoreError, ValidationError
from tvix_store.directoryservice import GraphCheck
from tvix_store.gc import sweep_epoch, write_lock
from tvix_store.pathinfoservice import check_output_hash
from tvix_store.protocol import wire
from tvix_store.protocol.g1 import (
    castore_pb2,
    pathinfo_pb2,
    rpc_blobstore_pb2,
    rpc_blobstore_pb2_grpc,
    rpc_directory_pb2,
    rpc_directory_pb2_grpc,
    rpc_pathinfo_pb2,
    rpc_pathinfo_pb2_grpc,
)
from tvix_store.remote.status import map_errors
from tvix_store.serve.grpcauth import TokenInterceptor, server_credentials
from tvix_store.serve.limits import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_STREAMS,
    StreamGuard,
    streaming,
)
from tvix_store.serve.security import TlsFiles, Tokens
from tvix_store.serve.spool import DEFAULT_MAX_BYTES, DEFAULT_MAX_COUNT, DirectorySpool
from tvix_store.store import Store

log = logging.getLogger("tvix_store.serve.grpc")

#: what a write call holds while it runs (the GC lock shared: `tvix_store.gc.write_lock`)
Writing = Callable[[], AbstractContextManager[object]]

#: Largest BlobChunk the server sends (PROTOCOL.md: keep each ≤ 1 MiB).
MAX_CHUNK_MESSAGE = 1 << 20
#: Message size limit both ways: 1 MiB blob messages plus overhead pass easily, and big
#: Directory messages (tens of thousands of entries) too.
MAX_MESSAGE_SIZE = 64 << 20
#: How long in-flight calls may run on after a stop was requested.
DEFAULT_GRACE = 20.0

SERVICE_NAMES = (
    rpc_blobstore_pb2.DESCRIPTOR.services_by_name["BlobService"].full_name,
    rpc_directory_pb2.DESCRIPTOR.services_by_name["DirectoryService"].full_name,
    rpc_pathinfo_pb2.DESCRIPTOR.services_by_name["PathInfoService"].full_name,
)

#: the calls that write: an `rw` token is needed for them (`grpcauth`)
WRITE_METHODS = frozenset(f"/{name}/Put" for name in SERVICE_NAMES)

SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_SIZE),
    ("grpc.max_send_message_length", MAX_MESSAGE_SIZE),
    # clients send keepalive pings (every 30 s); accept them instead of answering GOAWAY
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.so_reuseport", 0),
]


def add_servicer(server: grpc.Server, module: ModuleType, service: str, servicer: object) -> None:
    """Register a servicer like the generated `add_…_to_server`, but with request deserializers
    that never raise (`wire.safe_deserializer`): bytes that are no valid message reach the
    servicer as `wire.Malformed` and are answered INVALID_ARGUMENT, not INTERNAL with a
    traceback in the log."""
    desc = module.DESCRIPTOR.services_by_name[service]
    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    handlers = {}
    for m in desc.methods:
        make = kinds[(m.client_streaming, m.server_streaming)]
        handlers[m.name] = make(
            getattr(servicer, m.name),
            request_deserializer=wire.safe_deserializer(wire.message_class(m.input_type)),
            response_serializer=wire.message_class(m.output_type).SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(desc.full_name, handlers),))
    server.add_registered_method_handlers(desc.full_name, handlers)


def _complete(context: grpc.ServicerContext) -> None:
    """Raise if the call was cancelled by the time its request stream ended: nothing of it may
    be committed then."""
    if not context.is_active():
        raise grpc.RpcError("cancelled by the client before the end of its request stream")


class BlobServicer(rpc_blobstore_pb2_grpc.BlobServiceServicer):
    def __init__(self, store: Store, guard: StreamGuard, writing: Writing = nullcontext) -> None:
        self._blobs = store.blobs
        self.guard = guard
        self._writing = writing

    @map_errors
    def Stat(
        self, request: rpc_blobstore_pb2.StatBlobRequest, context: grpc.ServicerContext
    ) -> rpc_blobstore_pb2.BlobMeta:  # noqa: N802, E501
        digest = wire.digest_from_proto(request.digest, "blob digest")
        chunks = self._blobs.chunks(digest)
        if chunks is None:
            raise NotFoundError(f"blob {digest.hex()} not found")
        if not request.include_chunks:
            return rpc_blobstore_pb2.BlobMeta()
        return wire.chunks_to_proto(chunks)

    @streaming
    @map_errors
    def Read(
        self, request: rpc_blobstore_pb2.ReadBlobRequest, context: grpc.ServicerContext
    ) -> Iterator[rpc_blobstore_pb2.BlobChunk]:  # noqa: N802, E501
        digest = wire.digest_from_proto(request.digest, "blob digest")
        chunks = self._blobs.chunks(digest)
        if chunks is None:
            raise NotFoundError(f"blob {digest.hex()} not found")
        for c in chunks:
            data = self._blobs.read_chunk(c.digest)
            if data is None:
                raise StoreError(f"chunk {c.digest.hex()} of blob {digest.hex()} is missing")
            if len(data) <= MAX_CHUNK_MESSAGE:
                yield rpc_blobstore_pb2.BlobChunk(data=data)
                continue
            view = memoryview(data)
            for off in range(0, len(data), MAX_CHUNK_MESSAGE):
                yield rpc_blobstore_pb2.BlobChunk(data=bytes(view[off : off + MAX_CHUNK_MESSAGE]))

    @streaming
    @map_errors
    def Put(
        self, request_iterator: Iterator[rpc_blobstore_pb2.BlobChunk], context: grpc.ServicerContext
    ) -> rpc_blobstore_pb2.PutBlobResponse:  # noqa: N802, E501
        # A cancelled upload makes the iterator raise: the writer's context manager aborts it
        # (and a call cancelled as its stream ended is not committed either: `_complete`).
        with self._writing(), self._blobs.open_write() as w:
            for msg in request_iterator:
                if msg.data:
                    w.write(msg.data)
            _complete(context)
            digest = w.close()
        log.debug("Put: stored blob %s", digest.hex())
        return rpc_blobstore_pb2.PutBlobResponse(digest=bytes(digest))


class DirectoryServicer(rpc_directory_pb2_grpc.DirectoryServiceServicer):
    def __init__(
        self,
        store: Store,
        guard: StreamGuard,
        admission: Admission,
        max_count: int = DEFAULT_MAX_COUNT,
        max_bytes: int = DEFAULT_MAX_BYTES,
        writing: Writing = nullcontext,
    ) -> None:
        self._dirs = store.directories
        self.guard = guard
        self._admission = admission
        self._writing = writing
        self.max_count = max_count
        self.max_bytes = max_bytes

    @streaming
    @map_errors
    def Get(
        self, request: rpc_directory_pb2.GetDirectoryRequest, context: grpc.ServicerContext
    ) -> Iterator[castore_pb2.Directory]:  # noqa: N802, E501
        if request.WhichOneof("by_what") is None:
            raise ValidationError("GetDirectoryRequest: by_what (digest) is not set")
        digest = wire.digest_from_proto(request.digest, "directory digest")
        if not request.recursive:
            d = self._dirs.get(digest)
            if d is None:
                raise NotFoundError(f"directory {digest.hex()} not found")
            yield wire.directory_to_proto(d)
            return
        found = False
        for d in self._dirs.get_recursive(digest):
            found = True
            yield wire.directory_to_proto(d)
        if not found:
            raise NotFoundError(f"directory {digest.hex()} not found")

    @streaming
    @map_errors
    def Put(
        self, request_iterator: Iterator[castore_pb2.Directory], context: grpc.ServicerContext
    ) -> rpc_directory_pb2.PutDirectoryResponse:  # noqa: N802, E501
        # Checked as it arrives (each Directory, its references, its files' blobs), held in a
        # spool of bounded memory, stored once the whole stream checked out: nothing of a
        # rejected stream is stored.
        check = GraphCheck(self._dirs.known_size)
        blob_sizes: dict[B3Digest, int] = {}
        with self._writing(), DirectorySpool(self.max_count, self.max_bytes) as spool:
            for i, msg in enumerate(request_iterator):
                try:
                    d = wire.directory_from_proto(msg)
                    if not check.add(d):
                        continue
                    self._admission.check_files(d, blob_sizes)
                except StoreError as e:
                    raise type(e)(f"directory #{i} of the stream: {e}") from None
                spool.add(d)
            _complete(context)
            check.finish()
            root = self._dirs.put_graph(spool)
        log.debug("Put: stored %d directories, root %s", len(check), root.hex())
        return rpc_directory_pb2.PutDirectoryResponse(root_digest=bytes(root))


class PathInfoServicer(rpc_pathinfo_pb2_grpc.PathInfoServiceServicer):
    def __init__(self, store: Store, admission: Admission, writing: Writing = nullcontext) -> None:
        self._infos = store.pathinfos
        self._admission = admission
        self._writing = writing

    @map_errors
    def Get(self, request: rpc_pathinfo_pb2.GetPathInfoRequest, context: grpc.ServicerContext) -> pathinfo_pb2.PathInfo:  # noqa: N802, E501
        if request.WhichOneof("by_what") is None:
            raise ValidationError("GetPathInfoRequest: by_what (by_output_hash) is not set")
        check_output_hash(request.by_output_hash)
        info = self._infos.get(request.by_output_hash)
        if info is None:
            raise NotFoundError(f"no path info for output hash {request.by_output_hash.hex()}")
        return wire.pathinfo_to_proto(info)

    @map_errors
    def Put(self, request: pathinfo_pb2.PathInfo, context: grpc.ServicerContext) -> pathinfo_pb2.PathInfo:  # noqa: N802
        info = wire.pathinfo_from_proto(request)
        with self._writing():
            return wire.pathinfo_to_proto(self._admission.put_pathinfo(info))

    @map_errors
    def CalculateNAR(
        self, request: pathinfo_pb2.Node, context: grpc.ServicerContext
    ) -> rpc_pathinfo_pb2.CalculateNARResponse:  # noqa: N802, E501
        node = wire.node_from_proto(request)
        size, sha256 = self._infos.calculate_nar(node)
        if size > 0xFFFFFFFF:
            raise StoreError(f"NAR size {size} does not fit the protocol's uint32 nar_size")
        return rpc_pathinfo_pb2.CalculateNARResponse(nar_size=size, nar_sha256=sha256)


class StoreServer:
    """A started gRPC server serving one `Store`, with reflection and health checking.

    `bind(address)` accepts `HOST:PORT` (port 0: ephemeral) or `unix:/path` and returns
    the real bound address. `stop(grace)` stops accepting, lets in-flight calls finish
    for up to `grace` seconds, and marks every service NOT_SERVING. Streaming calls are
    admitted and watched by a `StreamGuard` (`tvix_store.serve.limits`): `max_streams` at
    once, each cancelled when idle for `idle_timeout` seconds. With `tokens`, every call but
    health checks needs a valid bearer token, and writes an `rw` one (`grpcauth`); `bind(address,
    tls)` serves TLS (mutual with a client CA). `interceptors` (e.g. `metrics.GrpcMetrics`) run
    outside the token check.
    """

    def __init__(
        self,
        store: Store,
        *,
        max_streams: int = DEFAULT_MAX_STREAMS,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        max_directory_put_count: int = DEFAULT_MAX_COUNT,
        max_directory_put_bytes: int = DEFAULT_MAX_BYTES,
        tokens: Tokens | None = None,
        interceptors: Sequence[grpc.ServerInterceptor] = (),
    ) -> None:
        self.store = store
        self.guard = StreamGuard(max_streams, idle_timeout)
        self.admission = Admission(store, epoch=sweep_epoch(store))
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self.guard.workers, thread_name_prefix="grpc"),
            options=SERVER_OPTIONS,
            # outermost first: e.g. metrics (which then count refused calls too), then the tokens
            interceptors=[*interceptors, *([TokenInterceptor(tokens, WRITE_METHODS)] if tokens is not None else [])]
            or None,
        )
        # every write call holds the GC lock of a local store shared (tvix_store.gc): no sweep meanwhile
        writing = write_lock(store)
        add_servicer(self._server, rpc_blobstore_pb2, "BlobService", BlobServicer(store, self.guard, writing))
        add_servicer(
            self._server,
            rpc_directory_pb2,
            "DirectoryService",
            DirectoryServicer(
                store, self.guard, self.admission, max_directory_put_count, max_directory_put_bytes, writing
            ),
        )
        add_servicer(
            self._server, rpc_pathinfo_pb2, "PathInfoService", PathInfoServicer(store, self.admission, writing)
        )
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )

    def bind(self, address: str, tls: TlsFiles | None = None) -> str:
        """Listen on `address` (with TLS if given); the real address (ephemeral port resolved).
        StoreError if impossible."""
        address, host, port = parse_listen(address)
        if host is not None and port is not None:
            _probe_bind(host, port)
        try:
            if tls is not None:
                bound = self._server.add_secure_port(address, server_credentials(tls))
            else:
                bound = self._server.add_insecure_port(address)
        except RuntimeError as e:
            raise StoreError(f"cannot listen on {address}: {e}") from None
        if host is None:
            return address
        if not bound:
            raise StoreError(f"cannot listen on {address}: address in use or not available")
        return f"{host}:{bound}"

    def start(self) -> None:
        self._server.start()
        for name in ("", *SERVICE_NAMES):
            self._health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace: float | None = DEFAULT_GRACE) -> None:
        """Stop accepting calls, wait for in-flight ones (up to `grace` s), then return."""
        self._health.enter_graceful_shutdown()
        self._server.stop(grace).wait()
        self.guard.close()


def _probe_bind(host: str, port: int) -> None:
    """Fail early with the OS's own reason (e.g. "Address already in use", unknown host)."""
    name = host[1:-1] if host.startswith("[") else host
    try:
        infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as e:
        raise StoreError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    if port == 0:
        return
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(sockaddr)
        except OSError as e:
            raise StoreError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def parse_listen(address: str) -> tuple[str, str | None, int | None]:
    """Normalise a listen address: `(grpc_address, host, port)`; host/port None for unix sockets.

    ValidationError for a malformed address (the daemon turns it into one error line).
    """
    if address.startswith("unix:"):
        path = address[len("unix:") :]
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise ValidationError(f"invalid listen address {address!r}: expected unix:/path")
        path = os.path.abspath(path)
        parent = os.path.dirname(path)
        if not os.path.isdir(parent):
            raise ValidationError(f"invalid listen address {address!r}: directory {parent} does not exist")
        return f"unix:{path}", None, None
    host, sep, port_s = address.rpartition(":")
    if not sep or not host or not port_s.isdigit() or int(port_s) > 65535:
        raise ValidationError(f"invalid listen address {address!r}: expected HOST:PORT or unix:/path")
    if host.startswith("[") != host.endswith("]"):
        raise ValidationError(f"invalid listen address {address!r}: unbalanced brackets")
    return f"{host}:{int(port_s)}", host, int(port_s)
