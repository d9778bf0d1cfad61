"""gRPC servicers of every protocol generation (BlobService, DirectoryService, PathInfoService
of `tvix.store.v1` 2022, `tvix.castore.v1` + `tvix.store.v1` 2024, `snix.castore.v1` +
`snix.store.v1` 2025) over any `Store`, plus `StoreServer`, which binds all of them over one
store with reflection and health checking.

The servicers only translate: wire messages become validated domain objects through the
generation's codec (`tvix_store.protocol.codec`: `wire.G1`, `wire_g2.G2`, `wire_g3.G3`), writes
pass the cross-object checks of `tvix_store.admission` (blobs before the Directories naming
them, complete closures and matching NarHash before a PathInfo, no store path replaced), the
store does the work, and exceptions become status codes in one place
(`tvix_store.remote.status.map_errors`). They never see backend types, and they stream: a blob
is read and written chunk by chunk, never held whole; a Directory Put stream is held in a
bounded spool (`tvix_store.serve.spool`). Not a client (see `tvix_store.remote`) and not the
daemon's process lifecycle (`tvix_store.cli.daemon`). TLS and bearer tokens are wired in
`StoreServer` (`tokens`, `bind(address, tls)`) from `tvix_store.serve.grpcauth`.

Routes (PROTOCOL-V2.md §5): Blob and Directory services once per generation, each with its own
codec. `/tvix.store.v1.PathInfoService/*` is the path of G1 and G2 clients alike and nothing
tells them apart: it is served with the G2 messages (a superset on the wire) and G1's rules
(a named CalculateNAR root, a PathInfo without narinfo, NOT_FOUND for a missing object, an
unset `by_what` INVALID_ARGUMENT); a G1 client there reads sizes ≥ 4 GiB truncated, which only
G2 can express. `/snix.store.v1.PathInfoService/*` follows snix (`strict`): narinfo required,
the CalculateNAR root unnamed ("invalid root node"), a missing object DATA_LOSS, an unset
`by_what` UNIMPLEMENTED. On the G1 Blob and Directory paths, anything G1 cannot carry (a name
that is not UTF-8, a size ≥ 4 GiB) is FAILED_PRECONDITION, never a truncated value.

Stat's bao (`include_bao`/`send_bao`) is accepted but answered empty: outboard bao is not
supported (PROTOCOL.md allows "empty if unsupported").
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from tvix_store.admission import Admission
from tvix_store.core.digest import B3Digest
from tvix_store.core.errors import (
    IntegrityError,
    NotFoundError,
    StoreError,
    UnsupportedError,
    ValidationError,
)
from tvix_store.directoryservice import GraphCheck
from tvix_store.gc import sweep_epoch, write_lock
from tvix_store.pathinfoservice import check_output_hash
from tvix_store.protocol import wire
from tvix_store.protocol.codec import TAGS, Codec
from tvix_store.protocol.generations import reflection_pool
from tvix_store.protocol.wire import G1
from tvix_store.protocol.wire_g2 import G2
from tvix_store.protocol.wire_g3 import G3
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


def routes(generations: tuple[str, ...] = TAGS) -> tuple[tuple[Any, Codec, bool], ...]:
    """(service descriptor, codec, strict PathInfo rules) of every route serving `generations`:
    Blob and Directory services per generation; the `tvix.store.v1` PathInfoService once, with
    G2's messages and G1's rules when G2 is served (G1's own, without List, when only G1 is),
    and snix's with snix's rules (see the module docstring)."""
    codecs = [c for c in (G1, G2, G3) if c.tag in generations]
    out: list[tuple[Any, Codec, bool]] = [(c.blob_service, c, False) for c in codecs]
    out += [(c.directory_service, c, False) for c in codecs]
    if "g2" in generations:
        out.append((G2.pathinfo_service, G2, False))
    elif "g1" in generations:
        out.append((G1.pathinfo_service, G1, False))
    if "g3" in generations:
        out.append((G3.pathinfo_service, G3, True))
    return tuple(out)


#: every route of every generation (what the daemon serves)
ROUTES = routes()

#: every service served, by full name (health answers SERVING for each, reflection lists them)
SERVICE_NAMES = tuple(s.full_name for s, _, _ in ROUTES)

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


def add_servicer(server: grpc.Server, desc: Any, servicer: object) -> None:
    """Register a servicer for the methods of `desc` like the generated `add_…_to_server`, but
    with request deserializers that never raise (`wire.safe_deserializer`): bytes that are no
    valid message reach the servicer as `wire.Malformed` and are answered INVALID_ARGUMENT, not
    INTERNAL with a traceback in the log."""
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


class BlobServicer:
    """BlobService of one generation (`codec`) over a store."""

    def __init__(self, store: Store, guard: StreamGuard, writing: Writing = nullcontext, codec: Codec = G1) -> None:
        self._blobs = store.blobs
        self.guard = guard
        self._writing = writing
        self._c = codec

    @map_errors
    def Stat(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        raw, asked = self._c.stat_request_fields(request)
        digest = wire.digest_from_proto(raw, "blob digest")
        chunks = self._blobs.chunks(digest)
        if chunks is None:
            raise NotFoundError(f"blob {digest.hex()} not found")
        return self._c.stat_response(chunks, asked)

    @streaming
    @map_errors
    def Read(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:  # noqa: N802
        digest = wire.digest_from_proto(request.digest, "blob digest")
        chunks = self._blobs.chunks(digest)
        if chunks is None:
            raise NotFoundError(f"blob {digest.hex()} not found")
        blob_chunk = self._c.blobstore.BlobChunk
        for c in chunks:
            data = self._blobs.read_chunk(c.digest)
            if data is None:
                raise StoreError(f"chunk {c.digest.hex()} of blob {digest.hex()} is missing")
            if len(data) <= MAX_CHUNK_MESSAGE:
                yield blob_chunk(data=data)
                continue
            view = memoryview(data)
            for off in range(0, len(data), MAX_CHUNK_MESSAGE):
                yield blob_chunk(data=bytes(view[off : off + MAX_CHUNK_MESSAGE]))

    @streaming
    @map_errors
    def Put(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:  # noqa: N802
        # A cancelled upload makes the iterator raise: the writer's context manager aborts it
        # (and a call cancelled as its stream ended is not committed either: `_complete`).
        with self._writing(), self._blobs.open_write() as w:
            for msg in request_iterator:
                if msg.data:
                    w.write(msg.data)
            _complete(context)
            digest = w.close()
        log.debug("Put: stored blob %s", digest.hex())
        return self._c.blobstore.PutBlobResponse(digest=bytes(digest))


class DirectoryServicer:
    """DirectoryService of one generation (`codec`) over a store."""

    def __init__(
        self,
        store: Store,
        guard: StreamGuard,
        admission: Admission,
        max_count: int = DEFAULT_MAX_COUNT,
        max_bytes: int = DEFAULT_MAX_BYTES,
        writing: Writing = nullcontext,
        codec: Codec = G1,
    ) -> None:
        self._dirs = store.directories
        self.guard = guard
        self._admission = admission
        self._writing = writing
        self._c = codec
        self.max_count = max_count
        self.max_bytes = max_bytes

    @streaming
    @map_errors
    def Get(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:  # noqa: N802
        if request.WhichOneof("by_what") is None:
            raise ValidationError("GetDirectoryRequest: by_what (digest) is not set")
        digest = wire.digest_from_proto(request.digest, "directory digest")
        if not request.recursive:
            d = self._dirs.get(digest)
            if d is None:
                raise NotFoundError(f"directory {digest.hex()} not found")
            yield self._c.directory_to_proto(d)
            return
        found = False
        for d in self._dirs.get_recursive(digest):
            found = True
            yield self._c.directory_to_proto(d)
        if not found and not self._c.recursive_get_of_missing_root_is_empty:
            raise NotFoundError(f"directory {digest.hex()} not found")

    @streaming
    @map_errors
    def Put(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:  # noqa: N802
        # Checked as it arrives (each Directory, its references, its files' blobs), held in a
        # spool of bounded memory, stored once the whole stream checked out: nothing of a
        # rejected stream is stored.
        check = GraphCheck(self._dirs.known_size)
        blob_sizes: dict[B3Digest, int] = {}
        with self._writing(), DirectorySpool(self.max_count, self.max_bytes) as spool:
            for i, msg in enumerate(request_iterator):
                try:
                    d = self._c.directory_from_proto(msg)
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
        return self._c.directory.PutDirectoryResponse(root_digest=bytes(root))


class PathInfoServicer:
    """PathInfoService of one generation (`codec`) over a store; `strict`: snix's rules (see
    the module docstring), else those of the path G1 and G2 clients share."""

    def __init__(
        self,
        store: Store,
        admission: Admission,
        guard: StreamGuard,
        writing: Writing = nullcontext,
        codec: Codec = G2,
        strict: bool = False,
    ) -> None:
        self._infos = store.pathinfos
        self.guard = guard
        self._admission = admission
        self._writing = writing
        self._c = codec
        self._strict = strict

    @map_errors
    def Get(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        if request.WhichOneof("by_what") is None:
            if self._strict:
                raise UnsupportedError("by_what needs to be specified")
            raise ValidationError("GetPathInfoRequest: by_what (by_output_hash) is not set")
        if self._strict and len(request.by_output_hash) != 20:
            raise ValidationError("invalid output digest length")
        check_output_hash(request.by_output_hash)
        info = self._infos.get(request.by_output_hash)
        if info is None:
            if self._strict:
                raise NotFoundError("PathInfo not found")
            raise NotFoundError(f"no path info for output hash {request.by_output_hash.hex()}")
        return self._c.pathinfo_to_proto(info)

    @map_errors
    def Put(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        try:
            info = self._c.pathinfo_from_proto(request)
            if self._strict and info.narinfo is None:
                raise ValidationError("narinfo is not set")
        except ValidationError as e:
            if self._strict:
                raise ValidationError(f"Invalid path info: {e}") from None
            raise
        with self._writing():
            return self._c.pathinfo_to_proto(self._admission.put_pathinfo(info))

    @map_errors
    def CalculateNAR(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        node = self._c.node_from_proto(request)
        if self._strict and node.name:
            raise ValidationError("invalid root node")
        try:
            size, sha256 = self._infos.calculate_nar(node)
        except NotFoundError as e:
            if self._strict:  # snix: a render failure is a storage error, DATA_LOSS
                raise IntegrityError(f"storage error: failed rendering nar: {e}") from None
            raise
        return self._c.calculate_nar_response(size, sha256)

    @streaming
    @map_errors
    def List(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:  # noqa: N802
        if not self._infos.capabilities.can_list:
            raise UnsupportedError("this store cannot list its path infos")
        for info in self._infos.iter_all():
            yield self._c.pathinfo_to_proto(info)


class StoreServer:
    """A started gRPC server serving one `Store` in every protocol generation (`ROUTES`; only
    some with `generations`, e.g. a server double of an older or newer peer), with reflection
    and health checking.

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
        generations: tuple[str, ...] = TAGS,
    ) -> None:
        self.store = store
        self.routes = routes(generations)
        self.service_names = tuple(s.full_name for s, _, _ in self.routes)
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
        self.servicers: list[object] = []
        for desc, codec, strict in self.routes:
            servicer: object
            if desc is codec.blob_service:
                servicer = BlobServicer(store, self.guard, writing, codec)
            elif desc is codec.directory_service:
                servicer = DirectoryServicer(
                    store, self.guard, self.admission, max_directory_put_count, max_directory_put_bytes, writing, codec
                )
            else:
                servicer = PathInfoServicer(store, self.admission, self.guard, writing, codec, strict)
            add_servicer(self._server, desc, servicer)
            self.servicers.append(servicer)
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            (*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME),
            self._server,
            pool=reflection_pool((health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR)),
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
        for name in ("", *self.service_names):
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
