"""`Offloader`: the one way the mount calls the (blocking) store.

`trio.to_thread.run_sync` under ONE shared `trio.CapacityLimiter`, so the trio loop never
blocks and at most `limit` store calls run at once; a request that gives up (its deadline)
does not wait for its thread. No pyfuse3, no filesystem logic.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import trio

from tvix_store.util.counters import Counters

T = TypeVar("T")

DEFAULT_THREADS = 16


class Offloader:
    """Runs blocking store calls in worker threads under one shared CapacityLimiter."""

    def __init__(self, limit: int = DEFAULT_THREADS, counters: Counters | None = None) -> None:
        self.limit = limit
        self._limiter: trio.CapacityLimiter | None = None
        self.counters = counters if counters is not None else Counters()

    @property
    def limiter(self) -> trio.CapacityLimiter:
        # created lazily: a CapacityLimiter belongs to the trio run that first uses it
        if self._limiter is None:
            self._limiter = trio.CapacityLimiter(self.limit)
        return self._limiter

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """`fn(*args)` in a worker thread. If the calling request is cancelled (its deadline),
        the request goes on without waiting: the thread finishes on its own (holding its
        limiter slot until then) and its result is dropped."""
        self.counters.add("store_calls")
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter, abandon_on_cancel=True)
