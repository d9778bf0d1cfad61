"""A circuit breaker for calls to a remote store: fail fast while the remote is down.

Policy (docs/cache.md):
- Closed (remote up): calls go through. A call that raises `UnavailableError` (the remote
  did not answer within its deadline, refused the connection, ...) opens the breaker.
- Open (remote down): calls raise `UnavailableError` at once, without touching the network.
  A background thread runs `probe()` (a cheap remote call with its own deadline) every
  `interval` seconds; the first probe that does not raise `UnavailableError` closes the
  breaker again, so a mount recovers by itself when the remote returns.
- Only `UnavailableError` counts as "down". Any other outcome of a call (a value, not-found,
  `IntegrityError`, a rejected request) shows the remote answered and is passed through.

This module knows nothing about gRPC or caching; it is not a retry mechanism (a failed call
is never repeated here) and it never sleeps on the caller's thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol, TypeVar

from tvix_store.errors import IntegrityError, UnavailableError

log = logging.getLogger("tvix_store.breaker")

T = TypeVar("T")


class CircuitBreaker:
    """Thread-safe two-state breaker (see module docstring). `close()` stops the probe thread."""

    def __init__(self, probe: Callable[[], object], *, interval: float = 1.0, name: str = "remote store") -> None:
        self._probe = probe
        self._interval = interval
        self._name = name
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._last_error = ""
        self._prober: threading.Thread | None = None
        self._stop = threading.Event()
        #: calls rejected without touching the remote, and times the breaker opened
        self.fast_failures = 0
        self.trips = 0

    @property
    def is_down(self) -> bool:
        return self._down_since is not None

    def call(self, fn: Callable[..., T], *args: object) -> T:
        """Run `fn(*args)` unless the remote is known to be down (then raise UnavailableError)."""
        self.check()
        try:
            return fn(*args)
        except UnavailableError as e:
            self.trip(e)
            raise

    def check(self) -> None:
        """Raise UnavailableError at once if the breaker is open."""
        since = self._down_since
        if since is not None:
            with self._lock:
                self.fast_failures += 1
            raise UnavailableError(
                f"{self._name} is down (for {time.monotonic() - since:.1f} s, retrying in the background): "
                f"{self._last_error}"
            )

    def trip(self, error: BaseException) -> None:
        """Mark the remote down (idempotent) and start probing for its return."""
        with self._lock:
            self._last_error = " ".join(str(error).split())
            if self._down_since is not None or self._stop.is_set():
                return
            self._down_since = time.monotonic()
            self.trips += 1
            self._prober = threading.Thread(target=self._probe_loop, name="tvix-breaker-probe", daemon=True)
            self._prober.start()
        log.warning("%s is down, failing fast until it answers again: %s", self._name, self._last_error)

    def _probe_loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._probe()
            except UnavailableError as e:
                self._last_error = " ".join(str(e).split())
                continue
            except Exception as e:  # noqa: BLE001 - any answer at all means the remote is back
                log.debug("probe of %s answered with %s: counting it as up", self._name, e)
            with self._lock:
                since = self._down_since
                self._down_since = None
                self._prober = None
            if since is not None:
                log.warning("%s is back after %.1f s", self._name, time.monotonic() - since)
            return

    def close(self) -> None:
        with self._lock:  # trip() starts the prober under this lock: never see it unstarted
            self._stop.set()
            t = self._prober
        if t is not None and t is not threading.current_thread():
            t.join(timeout=0.1)


class _Counters(Protocol):
    def add(self, name: str, n: int = 1) -> None: ...


def guarded_call(breaker: CircuitBreaker, stats: _Counters, what: str, fn: Callable[..., T], *args: object) -> T:
    """Call the remote unless the breaker is open: a call that times out (UnavailableError)
    opens it and counts `timeouts`; data that fails verification counts `verify_failures` and
    is logged naming `what`. The one policy every cached service applies to its remote."""
    breaker.check()
    try:
        return fn(*args)
    except UnavailableError as e:
        stats.add("timeouts")
        breaker.trip(e)
        raise
    except IntegrityError as e:
        stats.add("verify_failures")
        log.error("remote %s failed verification: %s", what, e)
        raise
