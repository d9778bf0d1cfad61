"""Helpers for tests (and scripts/bench) that really mount: skip marker, readiness by polling,
cleanup that always unmounts (`fusermount3 -u -z`) and ends the processes it started.

`ForegroundMount` runs any command that mounts and stays in the foreground (borg, casync,
rclone, …); `MountProc` is the `tvix-store mount --foreground` one. `release()` unmounts
politely first (so a FUSE server can finish its requests), lazily if busy, then waits for the
server to exit. pytest is only needed for `requires_fuse`; without it that marker is a no-op,
so the bench can import this module from a venv without the test extras.

Not a fixture module: tests/test_mount.py builds its fixtures from these.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

try:
    import pytest
except ImportError:  # the bench imports this module from a venv without the test extras
    pytest = None  # type: ignore[assignment]


def fuse_missing() -> str | None:
    """Why real mounts cannot run here, or None."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing (no FUSE in this kernel/container)"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed"
    return None


if pytest is not None:
    requires_fuse = pytest.mark.skipif(fuse_missing() is not None, reason=str(fuse_missing()))
else:

    def requires_fuse(fn: Callable[..., object]) -> Callable[..., object]:  # pragma: no cover
        return fn


def unmount(mountpoint: str | Path) -> None:
    """Lazy-unmount if mounted (never fails)."""
    if is_mounted(mountpoint):
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)


def release(mountpoint: str | Path, proc: subprocess.Popen[bytes] | None = None, grace: float = 20) -> bool:
    """Unmount politely (`fusermount3 -u`, retried for ~5 s while busy), else lazily; then wait up to
    `grace` s for `proc` (the FUSE server) to exit, and SIGTERM/SIGKILL it if it does not.
    False if it had to be ended that way (a server that outlives its unmount)."""
    deadline = time.monotonic() + 5
    while is_mounted(mountpoint) and time.monotonic() < deadline:
        if subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True, timeout=30).returncode == 0:
            break
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.1)
    unmount(mountpoint)
    if proc is not None:
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            end_process(proc)
            return False
    return True


def end_process(proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL after `timeout` s; by pid only; never fails."""
    if proc.poll() is not None:
        return
    try:
        proc.terminate()
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            proc.kill()
        except ProcessLookupError:
            pass
        proc.wait()
    except ProcessLookupError:
        pass


def is_mounted(mountpoint: str | Path) -> bool:
    """True if `mountpoint` is in /proc/mounts (works even when the FUSE process is gone)."""
    mp = os.path.abspath(mountpoint)
    with open("/proc/mounts") as f:
        return any(line.split()[1].encode().decode("unicode_escape") == mp for line in f)


def wait_for_mount(mountpoint: str | Path, proc: subprocess.Popen[bytes] | None = None, timeout: float = 30) -> None:
    """Poll until the mount answers a stat of its root; fail early if `proc` died."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"mount process exited ({proc.returncode}) before the mount was ready")
        if os.path.ismount(mountpoint):
            os.stat(mountpoint)
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{mountpoint} not mounted within {timeout} s")
        time.sleep(0.02)


def wait_until(cond: Callable[[], bool], timeout: float = 15, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def pids_serving(mountpoint: str | Path) -> list[int]:
    """Processes whose command line is a `tvix-store … mount …` or `daemon --mount` of this mountpoint."""
    mp = os.path.abspath(mountpoint).encode()
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"tvix_store.cli" in argv and mp in argv and (b"mount" in argv or b"--mount" in argv):
            out.append(int(d.name))
    return out


class ForegroundMount:
    """Any command that mounts at `mountpoint` and stays in the foreground, logging to `log_path`.

    Ready when the mount answers (raises AssertionError, after cleaning up, if it never does or
    the process exits first). `cleanup()` always leaves nothing behind."""

    def __init__(
        self,
        argv: list[str],
        mountpoint: Path,
        *,
        log_path: Path | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 30,
        new_session: bool = False,
    ) -> None:
        self.mountpoint = mountpoint
        self.log_path = log_path or mountpoint.with_name(mountpoint.name + ".log")
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            env=env,
            start_new_session=new_session,
        )
        try:
            wait_for_mount(mountpoint, self.proc, timeout=timeout)
        except BaseException:
            self.cleanup()
            raise

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def cleanup(self) -> None:
        """Always leaves nothing: unmount lazily, end the process."""
        unmount(self.mountpoint)
        end_process(self.proc)
        self._log.close()

    def release(self, grace: float = 20) -> bool:
        """Like cleanup(), but unmount politely first and give the server `grace` s to exit by itself
        (False if it did not)."""
        ok = release(self.mountpoint, self.proc, grace)
        self.cleanup()
        return ok


class MountProc(ForegroundMount):
    """A `tvix-store mount --foreground` process (or any argv that mounts at `mountpoint`)."""

    def __init__(
        self,
        mountpoint: Path,
        store_url: str,
        *extra: str,
        log_path: Path | None = None,
        argv0: list[str] | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 30,
        new_session: bool = False,
    ) -> None:
        cmd = argv0 or [sys.executable, "-m", "tvix_store.cli"]
        argv = [*cmd, "mount", "--foreground", "--store", store_url, *extra, str(mountpoint)]
        super().__init__(argv, mountpoint, log_path=log_path, env=env, timeout=timeout, new_session=new_session)

    def cleanup(self) -> None:
        """Always leaves nothing: unmount lazily, end the process (and any detached child)."""
        super().cleanup()
        kill_serving(self.mountpoint)


def kill_serving(mountpoint: str | Path) -> None:
    """End the processes serving this (test's own, unique) mountpoint, by pid."""
    for pid in pids_serving(mountpoint):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    unmount(mountpoint)
