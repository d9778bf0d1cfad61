"""`Counters`: named integers, safe to bump from any thread; what `Store.counters()` returns.

One `Counters` is shared by the parts of one store (cache combinators, the bounded object
store, the remote channel), so a mount or daemon reads every figure from one place. This
module knows no counter names; the modules that bump them document theirs.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable


class Counters:
    """Named integer counters (missing names read as 0)."""

    def __init__(self, names: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._c: dict[str, int] = dict.fromkeys(names, 0)

    def declare(self, names: Iterable[str]) -> None:
        """Make names appear in snapshots (at 0) before they are first bumped."""
        with self._lock:
            for n in names:
                self._c.setdefault(n, 0)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._c[name] = self._c.get(name, 0) + n

    def set(self, name: str, value: int) -> None:
        with self._lock:
            self._c[name] = value

    def get(self, name: str) -> int:
        with self._lock:
            return self._c.get(name, 0)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._c)
