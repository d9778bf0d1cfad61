"""The one map between domain exceptions (`tvix_store.core.errors`) and gRPC status codes.

Server side: `map_errors` decorates every servicer method (unary and streaming alike),
so no RPC has its own try/except. Client side: `error_from_status` turns a status a
remote answered with into a domain exception (NOT_FOUND is handled by the caller,
where not-found is a value). This module does no I/O besides logging.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc

from tvix_store.core.errors import (
    AccessDeniedError,
    ConflictError,
    IntegrityError,
    NotFoundError,
    PreconditionError,
    ResourceExhaustedError,
    StoreError,
    UnavailableError,
    UnrepresentableError,
    UnsupportedError,
    ValidationError,
)
from tvix_store.protocol.wire import Malformed

log = logging.getLogger("tvix_store.serve.grpc")

F = TypeVar("F", bound=Callable[..., Any])


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and (one-line, traceback-free) message a server answers for `exc`."""
    msg = _one_line(exc)
    if isinstance(exc, ValidationError):
        return grpc.StatusCode.INVALID_ARGUMENT, msg
    if isinstance(exc, NotFoundError):
        return grpc.StatusCode.NOT_FOUND, msg
    if isinstance(exc, IntegrityError):
        return grpc.StatusCode.DATA_LOSS, msg
    if isinstance(exc, UnavailableError):
        return grpc.StatusCode.UNAVAILABLE, msg
    if isinstance(exc, ConflictError):
        return grpc.StatusCode.ALREADY_EXISTS, msg
    if isinstance(exc, PreconditionError):
        return grpc.StatusCode.FAILED_PRECONDITION, msg
    if isinstance(exc, ResourceExhaustedError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, msg
    if isinstance(exc, UnrepresentableError):
        return grpc.StatusCode.FAILED_PRECONDITION, msg
    if isinstance(exc, UnsupportedError):
        return grpc.StatusCode.UNIMPLEMENTED, msg
    if isinstance(exc, StoreError):
        return grpc.StatusCode.INTERNAL, msg
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {msg}"


def _abort(context: grpc.ServicerContext, exc: Exception, rpc: str) -> None:
    if isinstance(exc, grpc.RpcError):
        # A request stream that ended by a cancel (the client's, or the idle watchdog's): the
        # call is over; aborting it (rather than re-raising) keeps grpc from logging a traceback.
        log.debug("%s: cancelled, nothing stored: %s", rpc, exc)
        context.abort(grpc.StatusCode.CANCELLED, f"{rpc} cancelled, nothing stored")
    code, msg = status_for(exc)
    if code in (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.UNIMPLEMENTED,
    ):
        log.debug("%s: %s: %s", rpc, code.name, msg)
    elif code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        _exhausted_log.warning("%s: %s", rpc, msg)
    elif code is grpc.StatusCode.UNAVAILABLE:
        log.warning("%s: %s", rpc, msg)
    elif isinstance(exc, StoreError):
        log.error("%s failed (%s): %s", rpc, code.name, msg)
    else:
        log.error("%s failed with an unexpected error: %s", rpc, msg, exc_info=exc)
    context.abort(code, msg)


def _checked(request: Any, rpc: str) -> Any:
    """The request, with undecodable messages (`wire.Malformed`) as ValidationError: at once
    for a single request, at that message for a request stream (so nothing of it is stored)."""
    if isinstance(request, Malformed):
        _malformed(rpc, request.error)
        raise ValidationError(request.error)
    if isinstance(request, Iterator):
        return _checked_stream(request, rpc)
    return request


def _checked_stream(requests: Iterator[Any], rpc: str) -> Iterator[Any]:
    for i, msg in enumerate(requests):
        if isinstance(msg, Malformed):
            _malformed(rpc, msg.error)
            raise ValidationError(f"message #{i} of the request stream: {msg.error}")
        yield msg


class RateLimitedLog:
    """Warnings of one kind, at most `per_minute` a minute; then one line saying how many were
    not logged (a flood of bad requests or of refused writes must not flood the log)."""

    def __init__(self, what: str, per_minute: int, logger: logging.Logger | None = None) -> None:
        self.what = what
        self.per_minute = per_minute
        self.log = logger or log
        self._lock = threading.Lock()
        self._window = 0.0
        self._logged = 0
        self._dropped = 0

    def warning(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._window >= 60:
                dropped = self._dropped
                self._window, self._logged, self._dropped = now, 0, 0
                if dropped:
                    self.log.warning("%d more %s in the last minute (not logged)", dropped, self.what)
            if self._logged >= self.per_minute:
                self._dropped += 1
                return
            self._logged += 1
        self.log.warning(msg, *args)


#: malformed requests logged per minute at most (then one line saying how many were not)
MALFORMED_LOG_PER_MINUTE = 10
_malformed_log = RateLimitedLog("malformed requests", MALFORMED_LOG_PER_MINUTE)
#: refused for lack of room or over a limit (disk full: every Put in flight fails at once)
_exhausted_log = RateLimitedLog("calls refused with RESOURCE_EXHAUSTED", 10)


def _malformed(rpc: str, error: str) -> None:
    """One short line per malformed request, at most MALFORMED_LOG_PER_MINUTE a minute."""
    _malformed_log.warning("%s: malformed request: %s", rpc, error)


def map_errors(method: F) -> F:
    """Decorate a servicer method `(self, request_or_iterator, context)`: any exception it
    raises (or raises while streaming responses) becomes `context.abort(code, message)`, and an
    undecodable request is INVALID_ARGUMENT with one short (rate-limited) log line."""
    name = method.__name__
    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def gen_wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
            try:
                yield from method(self, _checked(request, name), context)
            except Exception as e:
                _abort(context, e, name)

        return gen_wrapper  # type: ignore[return-value]

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, _checked(request, name), context)
        except Exception as e:
            _abort(context, e, name)

    return wrapper  # type: ignore[return-value]


#: what gRPC's connection failures say (inside "failed to connect to all addresses; last error:
#: UNKNOWN: ipv4:…: …"), and what a person is told instead
_CONNECT_FAILURES = (
    ("connection refused", "connection refused (is the daemon running, on that port?)"),
    ("dns resolution failed", "unknown host"),
    ("errors resolving", "unknown host (the name does not resolve)"),
    ("address lookup failed", "unknown host (the name does not resolve)"),
    ("name or service not known", "unknown host"),
    ("no such file or directory", "no such socket"),
    ("certificate_verify_failed", "TLS: the server's certificate is not trusted (give its CA with ?ca=FILE)"),
    ("certificate verify failed", "TLS: the server's certificate is not trusted (give its CA with ?ca=FILE)"),
    ("ssl_error_ssl", "TLS handshake failed (wrong ?ca=, or a certificate not made for this host name)"),
    ("handshake", "TLS handshake failed (a plain server? use grpc+http://; or a client certificate is required)"),
    ("tls", "TLS handshake failed (a plain server? use grpc+http://)"),
    ("ssl", "TLS handshake failed (a plain server? use grpc+http://)"),
    (
        "socket closed",
        "the server closed the connection (a TLS server? use grpc+https://; or it is not a gRPC server)",
    ),
    (
        "connection reset",
        "the server reset the connection (a TLS server? use grpc+https://; or it is not a gRPC server)",
    ),
    ("timed out", "connection timed out"),
    ("deadline exceeded", "no answer in time"),
)


_TRANSPORT_MARKERS = (
    "failed to connect",
    "last error",
    "socket closed",
    "connection reset",
    "handshake",
    "ssl_error",
    "dns resolution",
    "errors resolving",
    "connection refused",
)


def humane(detail: str) -> str:
    """One short phrase for the details of an UNAVAILABLE status (gRPC's text for connection
    failures names its internals: "failed to connect to all addresses; last error: UNKNOWN: …")."""
    low = detail.lower()
    # only gRPC's own transport texts: a remote's message (a daemon in front of another remote)
    # is passed on as it is
    if any(m in low for m in _TRANSPORT_MARKERS):
        for needle, phrase in _CONNECT_FAILURES:
            if needle in low:
                return phrase
        last = detail.rsplit(": ", 1)[-1].strip()
        return f"cannot connect ({last})" if last else "cannot connect"
    return detail


def error_from_status(code: grpc.StatusCode | None, details: str | None, remote: str, what: str) -> StoreError:
    """The domain exception for a failed call `what` to `remote` (NOT_FOUND included, as NotFoundError).
    One line a person understands: the remote, what failed, and at most the status code's name."""
    detail = details or (code.name if code is not None else "unknown error")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
        return UnavailableError(f"remote store {remote} unavailable ({what}): {humane(detail)}")
    if code is grpc.StatusCode.UNAUTHENTICATED:
        return AccessDeniedError(
            f"remote store {remote} refused {what}: UNAUTHENTICATED: {detail} "
            f"(set TVIX_STORE_TOKEN or add ?token_file=FILE to the URL)"
        )
    if code is grpc.StatusCode.PERMISSION_DENIED:
        return AccessDeniedError(f"remote store {remote} refused {what}: PERMISSION_DENIED: {detail}")
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        return ValidationError(f"remote store {remote} rejected {what}: {detail}")
    if code is grpc.StatusCode.NOT_FOUND:
        return NotFoundError(f"{what}: not found on {remote}: {detail}")
    if code is grpc.StatusCode.DATA_LOSS:
        return IntegrityError(f"remote store {remote} ({what}): {detail}")
    if code is grpc.StatusCode.ALREADY_EXISTS:
        return ConflictError(f"remote store {remote} refused {what}: {detail}")
    if code is grpc.StatusCode.FAILED_PRECONDITION:
        return PreconditionError(f"remote store {remote} refused {what}: {detail}")
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhaustedError(f"remote store {remote} refused {what}: {detail}")
    if code is grpc.StatusCode.UNIMPLEMENTED:
        return UnsupportedError(f"remote store {remote} does not implement {what}: {detail}")
    name = code.name if code is not None else "UNKNOWN"
    return StoreError(f"remote store {remote} failed ({what}): {name}: {detail}")
