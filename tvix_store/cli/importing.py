"""`tvix-store import PATH…`: import paths, print their store paths; a progress line on a terminal."""

from __future__ import annotations

import argparse
import sys
import threading
import time

from tvix_store.cli import open_store_from_args
from tvix_store.importer import import_path


class _TtyProgress:
    """A one-line counter on stderr, rewritten with \\r at most every 0.1 s."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.last = 0.0
        self.shown = False
        self.lock = threading.Lock()

    def __call__(self, phase: str, files: int, nbytes: int) -> None:
        now = time.monotonic()
        with self.lock:
            if now - self.last < 0.1:
                return
            self.last = now
            self.shown = True
            sys.stderr.write(f"\r\x1b[K{phase} {self.label}: {files} files, {nbytes / (1 << 20):.1f} MiB")
            sys.stderr.flush()

    def finish(self) -> None:
        if self.shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def run(args: argparse.Namespace) -> int:
    """`tvix-store import PATH…`: print one store path per PATH, as `nix-store --add` does."""
    tty = sys.stderr.isatty()
    with open_store_from_args(args) as store:
        for p in args.paths:
            progress = _TtyProgress(p) if tty else None
            try:
                info = import_path(store, p, progress)
            finally:
                if progress is not None:
                    progress.finish()
            print(info.store_path.absolute, flush=True)
    return 0
