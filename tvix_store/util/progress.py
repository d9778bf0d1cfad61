"""`Progress`: what a long operation (import, copy, gc, verify) has done so far, read by a
display. Thread-safe counters only: no output, no terminal knowledge (`tvix_store.cli.progress`
draws it)."""

from __future__ import annotations

import threading


class Progress:
    """A phase name, an amount done and (when known) a total, in `unit` ("B" or "objects")."""

    def __init__(self, unit: str = "B") -> None:
        self.unit = unit
        self._lock = threading.Lock()
        self._phase = ""
        self._done = 0
        self._total: int | None = None

    def phase(self, name: str, total: int | None = None, done: int = 0) -> None:
        """Start a phase: its name, its total (None: unknown) and what of it is done."""
        with self._lock:
            self._phase, self._total, self._done = name, total, done

    def rename(self, phase: str) -> None:
        """Name what is being done now, keeping the counts."""
        with self._lock:
            self._phase = phase

    def add_total(self, n: int) -> None:
        with self._lock:
            self._total = (self._total or 0) + n

    def add(self, n: int = 1) -> None:
        with self._lock:
            self._done += n

    def set(self, done: int, phase: str | None = None) -> None:
        with self._lock:
            self._done = done
            if phase is not None:
                self._phase = phase

    def snapshot(self) -> tuple[str, int, int | None]:
        """(phase, done, total)."""
        with self._lock:
            return self._phase, self._done, self._total
