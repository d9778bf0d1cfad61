"""Helpers for tests that really mount: skip marker, readiness by polling, cleanup that always
unmounts (`fusermount3 -u -z`) and ends the processes it started.

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

import pytest


def fuse_missing() -> str | None:
    """Why real mounts cannot run here, or None."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing (no FUSE in this kernel/container)"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed"
    return None


requires_fuse = pytest.mark.skipif(fuse_missing() is not None, reason=str(fuse_missing()))


def unmount(mountpoint: str | Path) -> None:
    """Lazy-unmount if mounted (never fails)."""
    if is_mounted(mountpoint):
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)


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


class MountProc:
    """A `tvix-store mount --foreground` process (or any argv that mounts at `mountpoint`)."""

    def __init__(self, mountpoint: Path, store_url: str, *extra: str, log_path: Path | None = None) -> None:
        self.mountpoint = mountpoint
        self.log_path = log_path or mountpoint.with_name(mountpoint.name + ".log")
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tvix_store.cli",
                "mount",
                "--foreground",
                "--store",
                store_url,
                *extra,
                str(mountpoint),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )
        try:
            wait_for_mount(mountpoint, self.proc)
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
        """Always leaves nothing: unmount lazily, end the process (and any detached child)."""
        unmount(self.mountpoint)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        kill_serving(self.mountpoint)
        self._log.close()


def kill_serving(mountpoint: str | Path) -> None:
    """End the processes serving this (test's own, unique) mountpoint, by pid."""
    for pid in pids_serving(mountpoint):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    unmount(mountpoint)
