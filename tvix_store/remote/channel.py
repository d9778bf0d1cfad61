"""`Remote`: one gRPC channel to a remote store, and the one policy every call to it follows.

The three gRPC client backends of a store (`blobservice.grpc`, `directoryservice.grpc`,
`pathinfoservice.grpc`) share one `Remote`. Every call goes through it:

- Fail fast while down (`fail_fast`, for long-lived clients: a mount, a cache): a
  `CircuitBreaker` (`tvix_store.remote.breaker`) is checked before each call; a call that
  fails with UnavailableError opens it. Its probe is a gRPC health check with the normal
  deadline: any answer (SERVING, NOT_FOUND, UNIMPLEMENTED…) shows the remote is back.
  One-shot commands go without: each call then waits for its own deadline.
- Deadlines (a stalled server never hangs a caller for much more than `timeout`):
  - unary calls: a deadline of `timeout` seconds (callers may give a longer one for work
    proportional to the data, e.g. CalculateNAR);
  - streams: no overall deadline (a 2 GiB blob may take minutes), but an idle timeout: a
    watchdog thread cancels a stream that made no progress (no message received, no
    message accepted for sending, no response after the last one) for `timeout` seconds,
    and the caller gets UnavailableError. Time a caller spends with a yielded message, or
    a writer waiting for its own caller to write more, does not count.
- Errors, mapped once (`error`, via `tvix_store.remote.status.error_from_status`):
  NOT_FOUND is a value (`None`) where the interface allows it; UNAVAILABLE,
  DEADLINE_EXCEEDED, a stalled stream or a connection failure → UnavailableError naming
  the remote; INVALID_ARGUMENT → ValidationError; anything else → StoreError.
- No retries here: a failed call is reported; the breaker and the callers decide. One
  exception: a batch call refused with RESOURCE_EXHAUSTED (a server at its limit of
  streaming calls, "retry later"; or grpc.aio's form of that refusal, `_busy`) is retried
  with backoff for up to `timeout` seconds (the calls of `many` are idempotent: Stat, Read,
  Put of content-addressed bytes).

- Many calls at once (`many`): a second, asyncio channel on a loop thread of its own keeps
  up to `window` calls of a batch in flight without a thread per call (the sync API starts
  a thread for every client-streaming call): batch Stat, Put and Read of small objects.
  Several batches at once (an import's workers) share one limit, `MAX_IN_FLIGHT`, below a
  daemon's default limit of streaming calls, so one client never fills a server alone.

- The protocol generation of each service (`negotiate`, `codec`): newest first, a call
  answered UNIMPLEMENTED is repeated one generation older, any other answer settles it for
  the channel's life (`tvix_store.remote.generation.Negotiation`); `protocol="g1"|"g2"|"g3"`
  forces one for every service.

- Security (`ChannelSecurity`): TLS (`grpc+https://`: the CA file given, else the system's
  roots; a client certificate for mutual TLS) and a bearer token sent with every call
  (`authorization: Bearer …`). A token without TLS is only sent over loopback TCP or a unix
  socket (gRPC's local credentials refuse anything else). Neither is ever logged.

Counters: `timeouts` (calls failed as unavailable), `busy_retries` (batch calls retried after
RESOURCE_EXHAUSTED), and the breaker's.
Not here: message types (the backends build requests), verification (the backends check
what they receive).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tvix_store.core.errors import NotFoundError, StoreError, UnavailableError, UnsupportedError, ValidationError
from tvix_store.protocol.codec import TAGS, Codec
from tvix_store.remote.breaker import CircuitBreaker
from tvix_store.remote.generation import Negotiation, probe_request
from tvix_store.remote.status import error_from_status
from tvix_store.util.counters import Counters

T = TypeVar("T")

DEFAULT_TIMEOUT = 10.0
MAX_MESSAGE_SIZE = 64 << 20
#: how often the breaker probes a remote that is down
PROBE_INTERVAL = 1.0
#: batch calls in flight at once per remote, all batches together: half a daemon's default
#: limit of streaming calls (`serve.limits.DEFAULT_MAX_STREAMS`, 128)
MAX_IN_FLIGHT = 64
#: first wait before retrying a batch call refused with RESOURCE_EXHAUSTED (then doubling, ≤ 1 s)
BUSY_FIRST_DELAY = 0.05

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


@dataclass(frozen=True)
class ChannelSecurity:
    """How a channel protects itself: TLS (`ca`: PEM roots, None for the system's; `cert` and
    `key`: a client certificate for mutual TLS) and a bearer token. `repr` hides the secrets."""

    tls: bool = False
    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None
    token: str | None = None

    def __repr__(self) -> str:
        hidden = "…" if self.token else None
        has = f"ca={self.ca is not None}, cert={self.cert is not None}"
        return f"ChannelSecurity(tls={self.tls}, {has}, token={hidden})"


def _system_roots() -> bytes | None:
    """The system's CA bundle (as OpenSSL finds it), or None for gRPC's bundled roots."""
    paths = ssl.get_default_verify_paths()
    for f in (paths.cafile, paths.openssl_cafile, "/etc/ssl/certs/ca-certificates.crt"):
        if f:
            try:
                return Path(f).read_bytes()
            except OSError:
                continue
    return None


def _busy(e: grpc.aio.AioRpcError) -> bool:
    """A batch call the server refused as busy (RESOURCE_EXHAUSTED). grpc.aio sometimes reports
    such a refusal of a client-streaming call as INTERNAL "Internal error from Core" instead: the
    server ended the call before reading its request, and the failed send of the request won
    over the server's status (seen under load in 6 of 6 runs of the busy-daemon test)."""
    code = e.code()
    return code is grpc.StatusCode.RESOURCE_EXHAUSTED or (
        code is grpc.StatusCode.INTERNAL and e.details() == "Internal error from Core"
    )


def channel_credentials(security: ChannelSecurity | None, target: str) -> grpc.ChannelCredentials | None:
    """The credentials of a channel to `target`, or None for a plain (insecure) one."""
    if security is None or (not security.tls and not security.token):
        return None
    if security.tls:
        creds = grpc.ssl_channel_credentials(
            root_certificates=security.ca if security.ca is not None else _system_roots(),
            private_key=security.key,
            certificate_chain=security.cert,
        )
    else:
        kind = grpc.LocalConnectionType.UDS if target.startswith("unix:") else grpc.LocalConnectionType.LOCAL_TCP
        creds = grpc.local_channel_credentials(kind)
    if security.token:
        creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(security.token))
    return creds


class Watch:
    """One watched stream: progress time, the call to cancel, and whether idling is the caller's choice."""

    __slots__ = ("call", "last", "timed_out", "idle_ok")

    def __init__(self, idle_ok: Callable[[], bool] | None = None) -> None:
        self.call: Any = None
        self.last = time.monotonic()
        self.timed_out = False
        self.idle_ok = idle_ok

    def touch(self) -> None:
        self.last = time.monotonic()


class Watchdog:
    """Cancels watched streams that made no progress for `timeout` seconds (one thread per channel)."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._interval = min(0.25, timeout / 4)
        self._watches: set[Watch] = set()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def watch(self, idle_ok: Callable[[], bool] | None = None) -> Watch:
        w = Watch(idle_ok)
        with self._cond:
            self._watches.add(w)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="grpc-watchdog", daemon=True)
                self._thread.start()
            self._cond.notify()
        return w

    def release(self, w: Watch) -> None:
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


class Remote:
    """The channel shared by the services of one remote store (see the module docstring)."""

    def __init__(
        self,
        target: str,
        name: str = "",
        timeout: float = DEFAULT_TIMEOUT,
        counters: Counters | None = None,
        *,
        fail_fast: bool = False,
        security: ChannelSecurity | None = None,
        protocol: str | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValidationError(f"invalid timeout {timeout!r}: must be positive")
        if protocol is not None and protocol not in TAGS:
            raise ValidationError(f"invalid protocol {protocol!r}: expected one of {', '.join(TAGS)}")
        self.target = target
        self.name = name or target
        self.timeout = timeout
        #: the generation of each service: forced, or negotiated by the first calls
        self.negotiation = Negotiation(self.name, protocol)
        self.counters = counters if counters is not None else Counters()
        self.counters.declare(("timeouts", "busy_retries"))
        self._credentials = channel_credentials(security, target)
        if self._credentials is None:
            self.channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        else:
            self.channel = grpc.secure_channel(target, self._credentials, options=CHANNEL_OPTIONS)
        self.watchdog = Watchdog(timeout)
        self.breaker: CircuitBreaker | None = None
        if fail_fast:
            self.breaker = CircuitBreaker(
                self._probe, interval=PROBE_INTERVAL, name=f"remote store {self.name}", counters=self.counters
            )
        self._health = health_pb2_grpc.HealthStub(self.channel)
        self._closed = False
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._aio_channel: grpc.aio.Channel | None = None
        self._batches: set[concurrent.futures.Future[None]] = set()  # running `many` batches
        self._in_flight: asyncio.Semaphore | None = None  # MAX_IN_FLIGHT, made on the loop
        self._warming = False

    def negotiate(self, service: str, attempt: Callable[[Codec], T]) -> T:
        """`attempt(codec)` in the newest generation of `service` not yet refused; repeated one
        generation older while an unconfirmed generation answers UNIMPLEMENTED
        (UnsupportedError). Any other outcome but UnavailableError confirms the generation."""
        while True:
            c, confirmed = self.negotiation.candidate(service)
            try:
                result = attempt(c)
            except UnsupportedError:
                if confirmed:
                    raise
                self.negotiation.refuse(service, c.tag)
                continue
            except UnavailableError:
                raise
            except StoreError:
                self.negotiation.confirm(service, c.tag)
                raise
            self.negotiation.confirm(service, c.tag)
            return result

    def codec(self, service: str) -> Codec:
        """The confirmed generation of `service`, after a probe call (an absent digest) if
        none is confirmed yet: for calls that cannot be repeated or whose UNIMPLEMENTED means
        something else."""
        c, confirmed = self.negotiation.candidate(service)
        if confirmed:
            return c

        def probe(c: Codec) -> None:
            method, request = probe_request(service, c)
            desc = {"blob": c.blob_service, "directory": c.directory_service, "pathinfo": c.pathinfo_service}[service]
            m = desc.methods_by_name[method]
            path = f"/{desc.full_name}/{method}"
            if m.server_streaming:
                call = self.channel.unary_stream(path, request_serializer=type(request).SerializeToString)
                try:
                    for _ in self.server_stream(call, request, f"{service} probe"):
                        break
                except NotFoundError:
                    pass
            else:
                call = self.channel.unary_unary(path, request_serializer=type(request).SerializeToString)
                self.unary(call, request, f"{service} probe")

        self.negotiate(service, probe)
        return self.negotiation.candidate(service)[0]

    def _probe(self) -> None:
        """Any answer of the health service (even an error status) means the remote is up."""
        try:
            self._health.Check(health_pb2.HealthCheckRequest(), timeout=self.timeout)
        except grpc.RpcError as e:
            err = self.error(e, "health check")
            if isinstance(err, UnavailableError):
                raise err from None

    @property
    def is_down(self) -> bool:
        return self.breaker is not None and self.breaker.is_down

    def error(self, e: BaseException, what: str, watch: Watch | None = None) -> StoreError:
        """The domain exception for a failed call `what` (not counted; see `failed`)."""
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

    def failed(self, e: BaseException, what: str, watch: Watch | None = None) -> StoreError:
        """`error`, and an unavailable remote opens the breaker and counts a timeout."""
        err = self.error(e, what, watch)
        if isinstance(err, UnavailableError):
            self.counters.add("timeouts")
            if self.breaker is not None:
                self.breaker.trip(err)
        return err

    def check(self) -> None:
        """Raise UnavailableError at once while the remote is known to be down. The first call
        also starts connecting the batch channel in the background (nothing is sent to a remote
        before something is asked of it; then both connections come up in parallel)."""
        if self.breaker is not None:
            self.breaker.check()
        if self._loop is None and not self._warming:
            self._warming = True
            threading.Thread(target=self._warm, name="grpc-aio-connect", daemon=True).start()

    def _warm(self) -> None:
        try:
            loop, channel = self._aio()
            asyncio.run_coroutine_threadsafe(channel.channel_ready(), loop)
        except StoreError:
            pass  # closed meanwhile

    def unary(
        self, method: Any, request: Any, what: str, timeout: float | None = None, none_if_absent: bool = True
    ) -> Any:
        """Call a unary method with a deadline; None for NOT_FOUND (if `none_if_absent`)."""
        self.check()
        try:
            return method(request, timeout=timeout or self.timeout)
        except grpc.RpcError as e:
            if none_if_absent and isinstance(e, grpc.Call) and e.code() is grpc.StatusCode.NOT_FOUND:
                return None
            raise self.failed(e, what) from None

    def server_stream(self, method: Any, request: Any, what: str) -> Iterator[Any]:
        """Iterate a response stream under the idle watchdog; NotFoundError for NOT_FOUND.

        A call refused as busy (RESOURCE_EXHAUSTED) before its first message is retried with
        backoff for up to `timeout` seconds, as batch calls are. Closing the generator early
        cancels the call."""
        self.check()
        in_caller = False  # time the caller spends with a yielded message is not a stall

        def idle_ok() -> bool:
            return in_caller

        delay, waited = BUSY_FIRST_DELAY, 0.0
        while True:
            w = self.watchdog.watch(idle_ok)
            call = method(request)
            w.call = call
            received = False
            try:
                for msg in call:
                    received = True
                    in_caller = True
                    yield msg
                    in_caller = False
                    w.touch()
                return
            except grpc.RpcError as e:
                busy = e.code() is grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
                if received or not busy or waited >= self.timeout:
                    raise self.failed(e, what, w) from None
            finally:
                self.watchdog.release(w)
                call.cancel()
            self.counters.add("busy_retries")
            time.sleep(delay)
            waited += delay
            delay = min(delay * 2, 1.0)

    # --- many calls in flight: an asyncio channel on a loop thread of its own ------------------

    def _aio(self) -> tuple[asyncio.AbstractEventLoop, grpc.aio.Channel]:
        """The asyncio loop and channel of batch calls (started on first use)."""
        with self._lock:
            if self._closed:
                raise UnavailableError(f"remote store {self.name}: closed")
            if self._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="grpc-aio", daemon=True).start()
                self._loop = loop
                self._aio_channel = asyncio.run_coroutine_threadsafe(self._open_aio(), loop).result()
            assert self._aio_channel is not None
            return self._loop, self._aio_channel

    async def _open_aio(self) -> grpc.aio.Channel:
        if self._credentials is None:
            return grpc.aio.insecure_channel(self.target, options=CHANNEL_OPTIONS)
        return grpc.aio.secure_channel(self.target, self._credentials, options=CHANNEL_OPTIONS)

    def many(
        self,
        calls: Sequence[Callable[[grpc.aio.Channel], Awaitable[Any]]],
        what: Callable[[int], str],
        window: int = 64,
    ) -> Iterator[tuple[int, Any]]:
        """Run many calls at once, up to `window` in flight, without a thread per call: each
        `calls[i](channel)` is a coroutine making one call (with its deadline) on the batch
        channel. Answered as they complete: `(i, result)`, `(i, None)` for NOT_FOUND, or
        `(i, error)`. An unavailable remote ends the batch with UnavailableError (opening the
        breaker); so does closing the iterator early: the calls still running are cancelled."""
        if not calls:
            return
        self.check()
        loop, channel = self._aio()
        results: queue.SimpleQueue[tuple[int, Any]] = queue.SimpleQueue()

        async def run_all() -> None:
            sem = asyncio.Semaphore(window)
            if self._in_flight is None:  # (only this loop's thread gets here)
                self._in_flight = asyncio.Semaphore(MAX_IN_FLIGHT)
            shared = self._in_flight

            async def call(i: int) -> Any:
                delay, waited = BUSY_FIRST_DELAY, 0.0
                while True:
                    try:
                        return await calls[i](channel)
                    except grpc.aio.AioRpcError as e:
                        if not _busy(e) or waited >= self.timeout:
                            raise
                    self.counters.add("busy_retries")
                    await asyncio.sleep(delay)
                    waited += delay
                    delay = min(delay * 2, 1.0)

            async def one(i: int) -> None:
                async with sem, shared:
                    try:
                        results.put((i, await call(i)))
                    except grpc.aio.AioRpcError as e:
                        if e.code() is grpc.StatusCode.NOT_FOUND:
                            results.put((i, None))
                        else:
                            results.put((i, e))
                    except asyncio.CancelledError:
                        raise
                    except Exception as e:  # noqa: BLE001 - reported to the caller as that call's failure
                        results.put((i, StoreError(f"remote store {self.name} ({what(i)}): {e}")))

            try:
                await asyncio.gather(*(one(i) for i in range(len(calls))))
            finally:
                results.put((-1, None))  # the end: all answered, or cancelled (closed)

        fut = asyncio.run_coroutine_threadsafe(run_all(), loop)
        # the end marker also when run_all never ran: cancelled by close() before its first step
        # (a task cancelled before it starts runs no `finally`), the waiter below must not wait on
        fut.add_done_callback(lambda _f: results.put((-1, None)))
        with self._lock:
            self._batches.add(fut)
        try:
            for _ in range(len(calls)):
                try:
                    i, res = results.get(timeout=self.timeout * 3 + 5)
                    if i < 0:
                        raise UnavailableError(f"remote store {self.name}: closed")
                except queue.Empty:
                    err = UnavailableError(f"remote store {self.name} unavailable ({what(0)}…): no answer in time")
                    self.counters.add("timeouts")
                    if self.breaker is not None:
                        self.breaker.trip(err)
                    raise err from None
                if isinstance(res, grpc.aio.AioRpcError):
                    res = self._aio_error(res, what(i))
                    if isinstance(res, UnavailableError):
                        raise res
                yield i, res
        finally:
            fut.cancel()
            with self._lock:
                self._batches.discard(fut)

    def _aio_error(self, e: grpc.aio.AioRpcError, what: str) -> StoreError:
        code, details = e.code(), e.details()
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            details = f"no answer within the deadline ({details})"
        err = error_from_status(code, details, self.name, what)
        if isinstance(err, UnavailableError):
            self.counters.add("timeouts")
            if self.breaker is not None:
                self.breaker.trip(err)
        return err

    def client_stream(self, method: Any, requests: Iterable[Any], what: str) -> Any:
        """Send a request stream under the idle watchdog; return the response."""
        self.check()
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
            raise self.failed(e, what, w) from None
        finally:
            self.watchdog.release(w)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            batches = list(self._batches)
        for fut in batches:  # their callers get UnavailableError at once
            fut.cancel()
        if self.breaker is not None:
            self.breaker.close()
        self.watchdog.close()
        self.channel.close()
        loop, channel = self._loop, self._aio_channel
        if loop is not None:
            if channel is not None:
                try:
                    asyncio.run_coroutine_threadsafe(channel.close(), loop).result(timeout=5)
                except Exception:  # noqa: BLE001, S110 - closing anyway
                    pass
            loop.call_soon_threadsafe(loop.stop)
