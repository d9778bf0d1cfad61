"""The bench context (settings, data, peers, mounts on demand) and the interleaving runner.

`interleave()` runs run 1 of every subject of a row, then run 2 of every subject, …, so drift
of a shared, noisy machine hits subject and references alike. Each run has a cap (killed
there and counted as a lower bound, and the subject runs no more), each subject a time budget
per row (fewer runs when its runs are slow: said in the row), and the whole bench a deadline
(`--quick`: 160 s, full: 1,110 s) that caps or skips whatever would overrun it, honestly
labelled. A run that fails makes the subject's row FAILED with the reason; nothing raises
past a row.

Not a scheduler of parallel work: one run at a time, on purpose (the machine has 2 cores).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data import Data
from .procs import Daemon, Mount
from .results import Measurement, Report
from .util import PREFAULT_BYTES, BenchError, Capped, can_drop_caches, log, make_cold, run

#: an action run once per run of a subject: (session value, run index, cap in s) -> seconds measured
Once = Callable[[Any, int, float], float]


@dataclass
class Subject:
    m: Measurement
    once: Once
    session: Callable[[], contextlib.AbstractContextManager[Any]] | None = None  # around all its runs
    setup: Callable[[], None] | None = None  # untimed, before its first run
    cap: float | None = None  # per-run cap (default: the bench's)
    budget: float | None = None  # wall seconds for all its runs in this row (default: the bench's)


class Bench:
    """What every row group needs: settings, the data, peers, and mounts/daemons made on demand."""

    def __init__(self, args: argparse.Namespace, tmp: Path, started: float) -> None:
        self.args = args
        self.tmp = tmp
        self.quick: bool = args.quick
        self.runs: int = args.runs
        self.report = Report()
        self.peers: dict[str, str | None] = {}  # command -> None if usable, else why not
        self.ts = [sys.executable, "-m", "tvix_store.cli"]  # as the tests run it (mountutil finds it by this)
        self.env = dict(os.environ)
        self.env.update(
            BORG_BASE_DIR=str(tmp / "borg-base"),
            BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
            BORG_RELOCATED_REPO_ACCESS_IS_OK="yes",
            BORG_DISPLAY_PASSPHRASE="no",
            BORG_PASSPHRASE="",
        )
        self.env.pop("TVIX_STORE_URL", None)
        self.cold_ok = can_drop_caches()
        self.data: Data
        self._n = 0
        self.cap: float = args.cap
        self.budget: float = args.budget
        self.deadline = started + args.deadline
        # built on demand
        self.main_store: Path | None = None
        self.paths: dict[str, str] = {}  # "big"/"tree" -> /nix/store path in main_store
        self.borg_repo: Path | None = None
        self.casync: dict[str, Path] = {}  # "big"/"tree" -> dir S holding store/ and x.caidx
        self.memo: dict[str, Any] = {}
        self.quick_skip: set[str] = {"casync"} if self.quick else set()  # peers left out of --quick rows

    # -- plumbing
    def fresh(self, what: str) -> Path:
        self._n += 1
        return self.tmp / f"{what}-{self._n}"

    def logfile(self, name: str) -> Path:
        self._n += 1
        return self.tmp / "logs" / f"{name}-{self._n}.log"

    def left(self) -> float:
        """Seconds left of the bench's own deadline."""
        return self.deadline - time.monotonic()

    def peer(self, cmd: str) -> str | None:
        """None if the peer can be used, else the reason it cannot."""
        if cmd in self.args.skip_peers:
            return "--skip-peers"
        if cmd in self.quick_skip:
            return "not in --quick"
        return self.peers.get(cmd, f"{cmd} not installed")

    @staticmethod
    def skipped(label: str, why: str, amount: float = 0, unit: str = "MB/s") -> Measurement:
        return Measurement(label, amount=amount, unit=unit, error=why, skipped=True)

    @staticmethod
    def guard(m: Measurement, fn: Callable[[], None]) -> Measurement:
        """Run fn, turning a failure into the measurement's error (the row shows the reason)."""
        try:
            fn()
        except BenchError as e:
            m.error = str(e)
        except (OSError, subprocess.SubprocessError) as e:
            m.error = f"{type(e).__name__}: {e}"
        return m

    # -- cold caches
    def cold(self) -> None:
        """Drop the page cache and pre-touch RAM (BENCH.md method notes); a no-op when not root."""
        if self.cold_ok:
            make_cold(PREFAULT_BYTES if not self.quick else PREFAULT_BYTES // 3)

    @property
    def cold_word(self) -> str:
        """What a row of first reads after a fresh start may be called here."""
        return "cold" if self.cold_ok else "NOT cold (cannot drop caches)"

    # -- mounts and daemons
    def tvix_mount(self, url: str, extra: tuple[str, ...] = (), name: str = "tvix-mnt") -> Mount:
        mnt = self.fresh(name)
        return Mount("tvix-store mount", self.ts, mnt, self.logfile(mnt.name), env=self.env, tvix_url=url,
                     tvix_extra=extra)  # fmt: skip

    def local_mount(self) -> Mount:
        assert self.main_store is not None
        return self.tvix_mount(f"local://{self.main_store}")

    def remote_mount(self, url: str, cache: Path | None = None, timeout: float | None = None) -> Mount:
        """A tvix mount of a grpc+http:// store with an empty (or the given) --cache-dir."""
        extra = ["--cache-dir", str(cache or self.fresh("cache"))]
        if timeout is not None:
            extra += ["--timeout", f"{timeout:g}"]
        return self.tvix_mount(url, tuple(extra), name="remote-mnt")

    def peer_mount(self, name: str, argv: list[str], mnt: Path, ready: float = 90) -> Mount:
        """A peer's FUSE mount, as the peer sets itself up (its own read-ahead: raising the BDI read_ahead_kb
        as the tvix mount does makes rclone's async reads seek and re-request, ~10× slower)."""
        return Mount(name, argv, mnt, self.logfile(mnt.name), env=self.env, ready=ready)

    def daemon(self, store: Path | None = None) -> Daemon:
        store = store or self.main_store
        assert store is not None
        return Daemon(self.ts, f"local://{store}", self.logfile("daemon"))

    def ensure_main_store(self) -> None:
        """One local store with big and tree imported (untimed), for the mount, remote and latency rows."""
        if self.main_store is not None:
            return
        store = self.tmp / "main-store"
        log("importing big and tree into the main store")
        out = run([*self.ts, "import", "--store", f"local://{store}", str(self.data.big), str(self.data.tree)])
        lines = out.stdout.decode().split()
        if len(lines) != 2:
            raise BenchError(f"tvix-store import printed {lines!r}, expected two store paths")
        self.paths = {"big": lines[0], "tree": lines[1]}
        self.main_store = store

    def store_file(self, mnt: Path, which: str) -> Path:
        return mnt / "store" / os.path.basename(self.paths[which])


def interleave(b: Bench, row: str, subjects: list[Subject], runs: int | None = None) -> None:
    """Run 1 of every subject, then run 2 of every subject, …; results land in each subject's Measurement."""
    runs = runs or b.runs
    for s in subjects:
        if s.m.error is None and s.setup is not None:
            b.guard(s.m, s.setup)
    with contextlib.ExitStack() as stack:
        values: dict[int, Any] = {}
        for s in subjects:
            if s.m.error is None and s.session is not None:
                try:
                    values[id(s)] = stack.enter_context(s.session())
                except (BenchError, OSError, subprocess.SubprocessError) as e:
                    s.m.error = f"setup: {e}"
        spent: dict[int, float] = {id(s): 0.0 for s in subjects}
        last: dict[int, float] = {}
        done: set[int] = set()
        for i in range(runs):
            for s in subjects:
                k = id(s)
                if s.m.error is not None or k in done:
                    continue
                budget = s.budget or b.budget
                if i > 0 and spent[k] + last[k] > budget:
                    s.m.fewer = f"its runs take {last[k]:.0f} s, budget {budget:.0f} s per subject and row"
                    done.add(k)
                    continue
                cap = min(s.cap or b.cap, b.left() - 15)
                if cap < 3 or (i > 0 and last[k] > b.left() - 15):
                    s.m.fewer = "the bench's deadline"
                    if not s.m.times:
                        s.m.error, s.m.skipped = "no time left before the bench's deadline", True
                    done.add(k)
                    continue
                log(f"{row}: {s.m.label} ({i + 1}/{runs})")
                t0 = time.monotonic()
                try:
                    s.m.times.append(s.once(values.get(k), i, cap))
                except Capped as c:
                    s.m.times.append(c.seconds)
                    s.m.capped += 1
                    done.add(k)
                except BenchError as e:
                    s.m.error = str(e)
                except (OSError, subprocess.SubprocessError) as e:
                    s.m.error = f"{type(e).__name__}: {e}"
                last[k] = time.monotonic() - t0
                spent[k] += last[k]
