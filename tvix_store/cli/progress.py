"""Progress bars on stderr for long commands (import, copy, gc, verify), with tqdm.

`bar(label, progress)` draws a `tvix_store.util.progress.Progress` while its block runs: the
phase, the amount done, and with a total the percentage, the rate and the ETA; redrawn from a
thread of its own five times a second, erased at the end. Only when stderr is a terminal:
otherwise nothing at all is drawn, so logs and pipes see only the command's own output.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from tvix_store.util.progress import Progress

#: seconds between redraws
INTERVAL = 0.2


def enabled() -> bool:
    """Whether progress is drawn: stderr is a terminal."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


@contextmanager
def bar(label: str, progress: Progress) -> Iterator[None]:
    """Draw `progress` while the block runs (see the module docstring)."""
    if not enabled():
        yield
        return
    from tqdm import tqdm

    scale = progress.unit == "B"
    phase, done, total = progress.snapshot()
    try:
        width = os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, ValueError):
        width = 0
    t = tqdm(
        desc=f"{label}: {phase}" if phase else label,
        total=total,
        initial=done,
        unit=progress.unit if scale else " " + progress.unit,
        unit_scale=scale,
        unit_divisor=1024 if scale else 1000,
        file=sys.stderr,
        leave=False,
        # a terminal that reports no size (a bare pty) gets 80 columns (tqdm draws nothing on a
        # terminal of 0 rows); others follow resizes
        dynamic_ncols=width > 0,
        ncols=None if width > 0 else 80,
        nrows=None if width > 0 else 24,
        mininterval=INTERVAL,
    )
    stop = threading.Event()

    def draw() -> None:
        phase, done, total = progress.snapshot()
        if total is not None and total < done:
            total = done
        if t.total != total:
            t.total = total
        t.n = done
        t.set_description_str(f"{label}: {phase}" if phase else label, refresh=False)
        t.refresh()

    def loop() -> None:
        while not stop.wait(INTERVAL):
            draw()

    thread = threading.Thread(target=loop, name="progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        draw()  # where it ended (100% when it got there), then erased
        t.close()
