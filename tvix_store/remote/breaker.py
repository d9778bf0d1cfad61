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

Counters (in the `Counters` it is given): `fast_failures` (calls refused while open),
`remote_trips` (times it opened), `remote_down` (1 while open).

This module knows nothing about gRPC or caching; it is not a retry mechanism (a failed call
is never repeated here) and it never sleeps on the caller's thread. `tvix_store.remote.channel`
puts one in front of every call of a remote.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from tvix_store.core.errors import UnavailableError
from tvix_store.util.counters import Counters

log = logging.getLogger("tvix_store.remote.breaker")

T = TypeVar("T")


class CircuitBreaker:
    """Thread-safe two-state breaker (see module docstring). `close()` stops the probe thread."""

    def __init__(
        self,
        probe: Callable[[], object],
        *,
        interval: float = 1.0,
        name: str = "remote store",
        counters: Counters | None = None,
    ) -> None:
        self._probe = probe
        self._interval = interval
        self._name = name
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._last_error = ""
        self._prober: threading.Thread | None = None
        self._stop = threading.Event()
        self.counters = counters if counters is not None else Counters()
        self.counters.declare(("fast_failures", "remote_trips", "remote_down"))

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
            self.counters.add("fast_failures")
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
            self.counters.add("remote_trips")
            self.counters.set("remote_down", 1)
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
                self.counters.set("remote_down", 0)
            if since is not None:
                log.warning("%s is back after %.1f s", self._name, time.monotonic() - since)
            return

    def close(self) -> None:
        with self._lock:  # trip() starts the prober under this lock: never see it unstarted
            self._stop.set()
            t = self._prober
        if t is not None and t is not threading.current_thread():
            t.join(timeout=0.1)
