"""`SingleFlight`: concurrent requests for one key share one fetch — the only one in the project.

A flight is a `concurrent.futures.Future` plus a `started` flag. The owner (the first claimant)
runs the fetch and finishes the flight; everyone else who asks meanwhile waits on the future
and gets its result or its exception. Nothing is remembered after a flight ends (no negative
cache: an absent or unreachable object may come back).

Two faces over the same flights:
- `run(key, fn)` for threads (the persistent cache, the importer): joiners block on the future,
  bounded by `timeout`.
- `arun(key, afn)` for the trio loop of the mount: joiners wait on a trio Event set from the
  future's done-callback, so a waiter holds no worker thread.

A flight can also be *queued* without being started (`claim(key, start=False)`, a prefetch
waiting for a pool thread); a later `claim(key)` that wants the value now takes it over
instead of waiting behind the queue (`owner` True), and the queued job then finds it started.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Flight(Generic[V]):
    """One fetch in progress (or queued): its future and whether someone runs it."""

    __slots__ = ("future", "started")

    def __init__(self, started: bool) -> None:
        self.future: Future[V] = Future()
        self.started = started


class SingleFlight(Generic[K, V]):
    """At most one fetch per key at a time (see module docstring). Thread-safe.

    `on_join()` is called each time a caller joins a running flight (for a counter).
    """

    def __init__(self, on_join: Callable[[], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._flights: dict[K, Flight[V]] = {}
        self._on_join = on_join

    def __len__(self) -> int:
        return len(self._flights)

    def __contains__(self, key: K) -> bool:
        return key in self._flights

    def claim(self, key: K, *, start: bool = True) -> tuple[Flight[V], bool]:
        """The flight for `key` (created if none) and whether the caller owns it now.

        The owner must end it with `finish`. `start=False` queues a flight nobody runs yet
        (owner True if it was created); a later `claim(start=True)` takes such a flight over.
        """
        with self._lock:
            fl = self._flights.get(key)
            if fl is None:
                fl = self._flights[key] = Flight(start)
                return fl, True
            if start and not fl.started:
                fl.started = True
                return fl, True
        if start and self._on_join is not None:
            self._on_join()
        return fl, False

    def start(self, key: K, fl: Flight[V]) -> bool:
        """Mark a queued flight as started by its queued owner; False if someone took it over."""
        with self._lock:
            if fl.started:
                return False
            fl.started = True
            return True

    def finish(self, key: K, fl: Flight[V], result: V | None = None, error: BaseException | None = None) -> None:
        """End a flight with its result or error; waiters wake up, the key is free again."""
        with self._lock:
            if self._flights.get(key) is fl:
                del self._flights[key]
        if fl.future.done():
            return
        if error is not None:
            fl.future.set_exception(error)
        else:
            fl.future.set_result(result)  # type: ignore[arg-type]

    def run(self, key: K, fn: Callable[[], V], timeout: float | None = None) -> V:
        """Thread face: fetch with `fn()` unless a flight is running, then wait for it.

        A joiner waits at most `timeout` seconds (TimeoutError after that)."""
        fl, owner = self.claim(key)
        if not owner:
            return fl.future.result(timeout=timeout)
        try:
            value = fn()
        except BaseException as e:
            self.finish(key, fl, error=e)
            raise
        self.finish(key, fl, value)
        return value

    async def arun(
        self, key: K, afn: Callable[[], Awaitable[V]], cancelled: Callable[[], BaseException] | None = None
    ) -> V:
        """Trio face: fetch with `await afn()` unless a flight is running, then wait for it.

        If the owner is cancelled, waiters get `cancelled()` (default: the Cancelled itself)."""
        import trio

        fl, owner = self.claim(key)
        if not owner:
            return await wait_future(fl.future)
        try:
            value = await afn()
        except trio.Cancelled as e:
            self.finish(key, fl, error=cancelled() if cancelled is not None else e)
            raise
        except BaseException as e:
            self.finish(key, fl, error=e)
            raise
        self.finish(key, fl, value)
        return value


async def wait_future(fut: Future[V]) -> V:
    """Await a concurrent future on the trio loop without holding a thread."""
    import trio

    if not fut.done():
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()

        def wake(_: Future[V]) -> None:
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass

        fut.add_done_callback(wake)
        await done.wait()
    return fut.result()
