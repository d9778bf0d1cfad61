"""What keeps slow or hostile clients from starving a gRPC server: admission of streaming calls
and their idle deadline.

The server (`tvix_store.serve.grpc`) runs every call on a thread of its pool, and a streaming
call holds its thread for as long as it streams. So:

- At most `max_streams` streaming calls run at once (Blob Read/Put, Directory Get/Put); one
  more is refused at once with RESOURCE_EXHAUSTED. The pool has `UNARY_RESERVE` more threads
  than that, so unary calls (Stat, PathInfo Get/Put, CalculateNAR) always find one: 200
  stalled streams leave a well-behaved client's Stat answered in milliseconds.
- A streaming call that makes no progress for `idle_timeout` seconds (no request message
  received, no response message taken by the client) is cancelled by one watchdog thread
  (`ServicerContext.cancel`), which frees its thread and its slot; a Put cancelled so stores
  nothing. Each such cancel is logged once, at warning level.
- No per-connection HTTP/2 stream cap: grpc answers a stream beyond it with REFUSED_STREAM,
  which the client reports as UNAVAILABLE (measured: it also refused unary calls of other
  clients); the total limit above is the one that holds.

Not here: what a call does (the servicers), message validation (`tvix_store.protocol.wire`).
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

log = logging.getLogger("tvix_store.serve.grpc")

#: streaming calls at once, in total
DEFAULT_MAX_STREAMS = 128
#: threads beyond `max_streams` kept for unary calls
UNARY_RESERVE = 32
#: seconds a streaming call may make no progress
DEFAULT_IDLE_TIMEOUT = 60.0

F = TypeVar("F", bound=Callable[..., Any])


class _Ticket:
    __slots__ = ("context", "rpc", "last", "cancelled")

    def __init__(self, context: grpc.ServicerContext, rpc: str) -> None:
        self.context = context
        self.rpc = rpc
        self.last = time.monotonic()
        self.cancelled = False

    def touch(self) -> None:
        self.last = time.monotonic()


class StreamGuard:
    """Admission and idle deadlines of the streaming calls of one server (module docstring)."""

    def __init__(self, max_streams: int = DEFAULT_MAX_STREAMS, idle_timeout: float = DEFAULT_IDLE_TIMEOUT) -> None:
        self.max_streams = max_streams
        self.idle_timeout = idle_timeout
        self._lock = threading.Lock()
        self._active: set[_Ticket] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="grpc-stream-watchdog", daemon=True)
        self._thread.start()
        self.refused = 0
        self.cancelled = 0

    @property
    def workers(self) -> int:
        """The thread pool size this needs: every stream at once, and the unary reserve."""
        return self.max_streams + UNARY_RESERVE

    def admit(self, context: grpc.ServicerContext, rpc: str) -> _Ticket:
        with self._lock:
            if len(self._active) >= self.max_streams:
                self.refused += 1
                full = True
            else:
                ticket = _Ticket(context, rpc)
                self._active.add(ticket)
                full = False
        if full:
            log.warning("%s refused: %d streaming calls already running", rpc, self.max_streams)
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"server busy: {self.max_streams} streaming calls already running, retry later",
            )
        return ticket

    def release(self, ticket: _Ticket) -> None:
        with self._lock:
            self._active.discard(ticket)

    def _watch(self) -> None:
        interval = min(1.0, self.idle_timeout / 4)
        while not self._stop.wait(interval):
            now = time.monotonic()
            with self._lock:
                idle = [t for t in self._active if now - t.last > self.idle_timeout]
                for t in idle:
                    self._active.discard(t)
            for t in idle:
                self.cancelled += 1
                t.cancelled = True
                log.warning("%s cancelled: no progress for %g s", t.rpc, self.idle_timeout)
                t.context.cancel()

    def close(self) -> None:
        self._stop.set()


def _watched(it: Iterator[Any], ticket: _Ticket) -> Iterator[Any]:
    """A request stream that counts progress; one of a cancelled call raises (grpc may end it as
    if it were complete, and nothing of it may be committed)."""
    for msg in it:
        ticket.touch()
        yield msg
        ticket.touch()
    if ticket.cancelled:
        raise grpc.RpcError(f"{ticket.rpc} cancelled: no progress")


def _watched_responses(it: Iterator[Any], ticket: _Ticket) -> Iterator[Any]:
    """A response stream that counts progress and simply stops once its call was cancelled (the
    client has its CANCELLED status already; raising would only make grpc log a traceback)."""
    for msg in it:
        if ticket.cancelled:
            return
        ticket.touch()
        yield msg
        ticket.touch()


def streaming(method: F) -> F:
    """Decorate a streaming method of a servicer that has a `guard` (a StreamGuard): the call is
    admitted or refused, its request and response messages count as progress, and its slot is
    freed when it ends. Put it outside `map_errors` (a refusal is already a status)."""
    rpc = method.__name__

    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def gen(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
            guard: StreamGuard = self.guard
            ticket = guard.admit(context, rpc)
            try:
                req = _watched(request, ticket) if isinstance(request, Iterator) else request
                yield from _watched_responses(method(self, req, context), ticket)
            finally:
                guard.release(ticket)

        return gen  # type: ignore[return-value]

    @functools.wraps(method)
    def call(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        guard: StreamGuard = self.guard
        ticket = guard.admit(context, rpc)
        try:
            return method(self, _watched(request, ticket), context)
        finally:
            guard.release(ticket)

    return call  # type: ignore[return-value]
