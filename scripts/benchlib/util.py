"""Plumbing of the bench: log lines, errors, the cleanup registry, commands with a time cap, cold caches.

`run()` starts every command in its own process group and, when it outlives its cap, kills the
whole group (a `sh -c 'find | xargs cat'` pipeline included) and raises `Capped`, which the
runner turns into a lower bound ("> 120 s"). `CLEANUP` undoes everything the bench started,
newest first, also on Ctrl-C and SIGTERM; `sweep()` is the last resort for a temp dir.

Not a process supervisor: it ends only what the bench itself started (by pid or process group,
or processes whose command line names the bench's own temp dir).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

MiB = 1 << 20
PREFAULT_BYTES = 1536 * MiB


class BenchError(Exception):
    """A step of one measurement failed; the row shows this message instead of a number."""


class Capped(BenchError):
    """A timed run outlived its cap and was stopped: its time is a lower bound."""

    def __init__(self, seconds: float, what: str = "") -> None:
        super().__init__(f"{what} stopped at the cap of {seconds:.0f} s".strip())
        self.seconds = seconds


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def say(text: str) -> None:
    """A line on stdout; a reader that went away (`| head`) does not stop the bench or its cleanup."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


class Cleanup:
    """Undo actions, run newest first, each at most once, whatever happens (finally, atexit, signals)."""

    def __init__(self) -> None:
        self._items: dict[int, tuple[str, Callable[[], None]]] = {}
        self._next = 0
        self._lock = threading.Lock()

    def add(self, desc: str, fn: Callable[[], None]) -> int:
        with self._lock:
            self._next += 1
            self._items[self._next] = (desc, fn)
            return self._next

    def run(self, key: int) -> None:
        with self._lock:
            item = self._items.pop(key, None)
        if item is not None:
            self._call(*item)

    def discard(self, key: int) -> None:
        with self._lock:
            self._items.pop(key, None)

    def run_all(self) -> None:
        while True:
            with self._lock:
                if not self._items:
                    return
                key = max(self._items)
                item = self._items.pop(key)
            self._call(*item)

    @staticmethod
    def _call(desc: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as e:  # cleanup must go on with the rest
            log(f"cleanup: {desc}: {e}")


CLEANUP = Cleanup()

#: things the table's reader should know that belong to no row (e.g. a server that outlived its unmount)
WARNINGS: list[str] = []


def warn(msg: str) -> None:
    log(f"warning: {msg}")
    WARNINGS.append(msg)


def on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(30)


def run(
    cmd: list[str],
    *,
    timeout: float = 300,
    cap: float | None = None,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    check: bool = True,
    input: bytes | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run `cmd` in its own process group, capturing its output.

    With `cap`, a command still running after `cap` s is killed (its whole group) and `Capped`
    is raised; otherwise after `timeout` s a `BenchError`."""
    limit = cap if cap is not None else timeout
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    except FileNotFoundError:
        raise BenchError(f"{cmd[0]} not found") from None
    try:
        out, err = proc.communicate(input, timeout=limit)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        if cap is not None:
            raise Capped(cap, Path(cmd[0]).name) from None
        raise BenchError(f"{Path(cmd[0]).name} timed out after {timeout:.0f} s") from None
    except BaseException:
        _kill_group(proc)
        raise
    p = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check and p.returncode != 0:
        tail_ = " ".join(p.stderr.decode(errors="replace").split())[-300:]
        raise BenchError(f"{Path(cmd[0]).name} {' '.join(cmd[1:2])} exited {p.returncode}: {tail_}")
    return p


def timed(
    cmd: list[str],
    *,
    cap: float | None = None,
    timeout: float = 600,
    cwd: str | Path | None = None,
    env: dict[str, str] | None = None,
) -> tuple[float, subprocess.CompletedProcess[bytes]]:
    """Seconds the command took (wall clock, start to exit) and its result."""
    t0 = time.perf_counter()
    p = run(cmd, cap=cap, timeout=timeout, cwd=cwd, env=env)
    return time.perf_counter() - t0, p


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    """SIGTERM, then SIGKILL after `timeout`; by pid only."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(10)


def tail(path: Path, n: int = 300) -> str:
    try:
        text = path.read_bytes()[-4000:].decode(errors="replace")
    except OSError:
        return ""
    return " ".join(text.split())[-n:]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for servers that cannot bind port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def can_drop_caches() -> bool:
    return os.access("/proc/sys/vm/drop_caches", os.W_OK)


def make_cold(prefault: int = PREFAULT_BYTES) -> None:
    """Drop the page cache, then touch and free `prefault` bytes (~1.5 GiB), so page allocation does not
    dominate the cold read that follows (BENCH.md, method notes)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
    m = mmap.mmap(-1, prefault)
    try:
        block = b"\x01" * (64 * MiB)
        for off in range(0, prefault - len(block) + 1, len(block)):
            m[off : off + len(block)] = block
    finally:
        m.close()


def sweep(tmp: Path) -> None:
    """Last resort: lazy-unmount anything still mounted under tmp, kill by pid any process naming tmp."""
    prefix = str(tmp) + "/"
    with contextlib.suppress(OSError), open("/proc/self/mounts") as f:
        for line in f:
            mp = line.split()[1].replace("\\040", " ")
            if mp.startswith(prefix):
                log(f"lazy-unmounting leftover {mp}")
                subprocess.run(["fusermount3", "-u", "-z", mp], capture_output=True, timeout=30)
    me = os.getpid()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        found = False
        for pid_s in os.listdir("/proc"):
            if not pid_s.isdigit() or int(pid_s) == me:
                continue
            try:
                cmdline = Path(f"/proc/{pid_s}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if prefix in cmdline or cmdline.rstrip().endswith(str(tmp)):
                found = True
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(int(pid_s), sig)
        if not found:
            return
        time.sleep(1)
