"""Prometheus metrics of the gRPC daemon (`daemon --metrics-listen ADDR`), with prometheus-client.

`GrpcMetrics` is a server interceptor, outermost (so calls refused for lack of a token are
counted too). Per full method name (`/tvix.store.v1.BlobService/Put`, …):

- `tvix_store_grpc_requests_total{method,code}`: finished calls by status code name
  (`OK`, `NOT_FOUND`, `UNAUTHENTICATED`, …; a call whose client went away: `CANCELLED`);
- `tvix_store_grpc_request_duration_seconds{method,code}`: a histogram of their durations
  (from the handler's start to its last response message);
- `tvix_store_grpc_received_bytes_total{method}` and `tvix_store_grpc_sent_bytes_total{method}`:
  bytes of the request and response messages (as serialized on the wire, before HTTP/2
  framing);
- `tvix_store_grpc_in_flight{method}`: calls running now.

`HttpMetrics` is what the nar-bridge reports per request (`observe`, called by its middleware
in `tvix_store.narbridge.app`), by route pattern (`/nar/{name}`, `/{name}`: bounded label
values), HTTP method and status: `tvix_store_http_requests_total{route,method,status}`,
`tvix_store_http_request_duration_seconds{route,method}`, `tvix_store_http_received_bytes_total`
and `tvix_store_http_sent_bytes_total{route}`.

`StoreStats` exports a store's own counters (`Store.counters`: cache hits and misses, bytes
fetched, remote timeouts, breaker state, …) as `tvix_store_stat{name}`, read at each scrape.

`MetricsServer` serves them as Prometheus text at `http://ADDR/metrics` from a thread of its
own, over a registry of its own (plus the process collector: CPU, memory, open files).
Not here: the servicers, the gRPC server's lifecycle (`grpc`), the nar-bridge's handlers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, start_http_server
from prometheus_client.core import GaugeMetricFamily

from tvix_store.core.errors import StoreError, ValidationError

#: histogram buckets, seconds (a Stat on loopback takes about a millisecond; a big Put minutes)
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


def _code_name(context: grpc.ServicerContext, failed: bool) -> str:
    code = context.code()  # type: ignore[attr-defined]  # the code set or aborted with
    if isinstance(code, grpc.StatusCode):
        return code.name
    if not failed:
        return "OK"
    return "UNKNOWN" if context.is_active() else "CANCELLED"


class GrpcMetrics(grpc.ServerInterceptor):
    """See the module docstring."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "tvix_store_grpc_requests", "Finished gRPC calls", ("method", "code"), registry=registry
        )
        self.duration = Histogram(
            "tvix_store_grpc_request_duration_seconds",
            "Duration of gRPC calls",
            ("method", "code"),
            buckets=BUCKETS,
            registry=registry,
        )
        self.received = Counter(
            "tvix_store_grpc_received_bytes", "Bytes of request messages received", ("method",), registry=registry
        )
        self.sent = Counter(
            "tvix_store_grpc_sent_bytes", "Bytes of response messages sent", ("method",), registry=registry
        )
        self.in_flight = Gauge("tvix_store_grpc_in_flight", "gRPC calls running now", ("method",), registry=registry)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None:
            return None
        return self._wrap(details.method, handler)  # type: ignore[attr-defined]

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        received = self.received.labels(method)
        sent = self.sent.labels(method)
        in_flight = self.in_flight.labels(method)
        deserialize = handler.request_deserializer
        serialize = handler.response_serializer

        def request_deserializer(data: bytes) -> Any:
            received.inc(len(data))
            return deserialize(data) if deserialize is not None else data

        def response_serializer(message: Any) -> bytes:
            data = serialize(message) if serialize is not None else message
            sent.inc(len(data))
            return data

        def done(start: float, context: grpc.ServicerContext, failed: bool) -> None:
            in_flight.dec()
            code = _code_name(context, failed)
            self.requests.labels(method, code).inc()
            self.duration.labels(method, code).observe(time.perf_counter() - start)

        streaming_out = bool(handler.response_streaming)
        behavior: Callable[..., Any] = (
            handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
        )

        if streaming_out:

            def timed(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                start = time.perf_counter()
                in_flight.inc()
                failed = True
                try:
                    yield from behavior(request, context)
                    failed = False
                finally:
                    done(start, context, failed)

        else:

            def timed(request: Any, context: grpc.ServicerContext) -> Any:  # type: ignore[misc]
                start = time.perf_counter()
                in_flight.inc()
                failed = True
                try:
                    result = behavior(request, context)
                    failed = False
                    return result
                finally:
                    done(start, context, failed)

        kinds = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }
        make = kinds[(bool(handler.request_streaming), streaming_out)]
        return make(timed, request_deserializer=request_deserializer, response_serializer=response_serializer)


class HttpMetrics:
    """See the module docstring."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "tvix_store_http_requests", "Finished HTTP requests", ("route", "method", "status"), registry=registry
        )
        self.duration = Histogram(
            "tvix_store_http_request_duration_seconds",
            "Duration of HTTP requests",
            ("route", "method"),
            buckets=BUCKETS,
            registry=registry,
        )
        self.received = Counter(
            "tvix_store_http_received_bytes", "Bytes of request bodies received", ("route",), registry=registry
        )
        self.sent = Counter(
            "tvix_store_http_sent_bytes", "Bytes of response bodies sent", ("route",), registry=registry
        )

    def observe(self, route: str, method: str, status: int, seconds: float, received: int, sent: int) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.duration.labels(route, method).observe(seconds)
        if received:
            self.received.labels(route).inc(received)
        if sent:
            self.sent.labels(route).inc(sent)


class StoreStats:
    """A collector of a store's counters (see the module docstring)."""

    def __init__(self, snapshot: Callable[[], dict[str, int]]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("tvix_store_stat", "Counters of the store (cache, remote, breaker)", labels=["name"])
        for name, value in sorted(self.snapshot().items()):
            family.add_metric([name], value)
        yield family


class MetricsServer:
    """The Prometheus endpoint: `start(listen)` binds `HOST:PORT` (port 0: ephemeral) and returns
    its URL; `stop()` ends it. The registry holds `GrpcMetrics`, `HttpMetrics`, the process
    collector and, once `add_store` named one, the store's counters."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.grpc = GrpcMetrics(self.registry)
        self.http = HttpMetrics(self.registry)
        self._server: Any = None
        self.url = ""

    def add_store(self, snapshot: Callable[[], dict[str, int]]) -> None:
        """Export a store's counters (`Store.counters.snapshot`)."""
        self.registry.register(StoreStats(snapshot))  # type: ignore[arg-type]

    def start(self, listen: str) -> str:
        host, sep, port = listen.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ValidationError(f"invalid --metrics-listen address {listen!r}: expected HOST:PORT")
        host = host.strip("[]")
        try:
            self._server, _ = start_http_server(int(port), addr=host, registry=self.registry)
        except OSError as e:
            raise StoreError(f"cannot listen on {listen} for metrics: {e.strerror or e}") from None
        bound = self._server.server_port
        self.url = f"http://[{host}]:{bound}/metrics" if ":" in host else f"http://{host}:{bound}/metrics"
        return self.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
