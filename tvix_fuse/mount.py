"""The mount's lifecycle, in one place: checks, FUSE options, `pyfuse3.init`, the trio loop,
signals, readiness, unmount.

`run_foreground(store, mountpoint, …)`: mount, call `on_ready()` once the mount answers,
serve in the MAIN thread until unmounted (umount / fusermount3 -u) or SIGINT/SIGTERM
(which call `pyfuse3.terminate()`), then unmount. SIGUSR1 logs all counters in one line.
`tvix-store mount` and `tvix-store daemon --mount` (`tvix_store.cli`) call this.

The filesystem itself is `tvix_fuse.model` (behind `tvix_fuse.ops`). Errors here are
`tvix_store.core.errors.StoreError` with a message fit for one CLI line. Not the command
line (background mode, argument handling: `tvix_store.cli.mount`).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pyfuse3
import trio

from tvix_fuse.model import FsModel
from tvix_fuse.ops import Operations
from tvix_store.core.errors import StoreError
from tvix_store.store import Store

log = logging.getLogger("tvix_fuse")

#: kernel read-ahead of the mount (BDI read_ahead_kb): also the largest read request size.
#: Local stores: 1 MiB requests (~1.6x the throughput of the default 128 KiB).
READ_AHEAD_KB = 1024
#: Remote stores: the kernel's read-ahead crosses the wire (a 1 MiB read at a random offset
#: made it ask for 3 MiB with 1024), so keep it small; the model's own prefetcher, which
#: stops on random access, provides the sequential throughput instead.
REMOTE_READ_AHEAD_KB = 256


def read_ahead_kb_for(store: Store) -> int:
    """The read-ahead for a store (pure): small when data comes over the network."""
    return REMOTE_READ_AHEAD_KB if store.is_remote else READ_AHEAD_KB


def fuse_options(*, allow_other: bool = False) -> set[str]:
    """The mount options (pure): read-only, named tvix-store, kernel permission checks."""
    opts = {"ro", "fsname=tvix-store", "subtype=tvix-store", "default_permissions", "noatime"}
    if allow_other:
        opts.add("allow_other")
    return opts


def check_mountpoint(mountpoint: str | os.PathLike[str]) -> str:
    """The absolute mountpoint, or StoreError if it is missing, not a directory, not empty or a mount."""
    mp = os.path.abspath(mountpoint)
    try:
        os.lstat(mp)
    except OSError as e:
        if e.errno != errno.ENOTCONN:
            raise StoreError(f"mountpoint {mp} does not exist") from None
        _clear_stale(mp)
    if not os.path.isdir(mp):
        raise StoreError(f"mountpoint {mp} is not a directory")
    if os.path.ismount(mp):
        try:
            os.statvfs(mp)  # always a request to the filesystem (attributes may be cached)
        except OSError as e:
            if e.errno != errno.ENOTCONN:
                raise StoreError(f"mountpoint {mp}: {e.strerror}") from None
            _clear_stale(mp)
        else:
            raise StoreError(f"mountpoint {mp} is already a mount point")
    try:
        if os.listdir(mp):
            raise StoreError(f"mountpoint {mp} is not empty")
    except OSError as e:
        raise StoreError(f"mountpoint {mp}: {e.strerror}") from None
    return mp


def _clear_stale(mp: str) -> None:
    """`mp` answers ENOTCONN: a FUSE mount whose process is gone. One of ours (filesystem
    type `fuse.tvix-store` in mountinfo) is lazily unmounted, with a log line; any other is
    an error that says how to clear it."""
    fstype = _mount_type(mp)
    if fstype != "fuse.tvix-store":
        raise StoreError(
            f"mountpoint {mp} is a stale mount ({fstype or 'unknown type'}) whose process is gone: "
            f"clear it with `fusermount3 -u -z {mp}` (or `umount -l {mp}`)"
        )
    p = subprocess.run(["fusermount3", "-u", "-z", mp], capture_output=True)
    if p.returncode != 0:
        msg = p.stderr.decode(errors="replace").strip().splitlines()
        raise StoreError(
            f"mountpoint {mp} is the stale mount of a tvix-store that is gone, and clearing it failed"
            f" ({msg[-1] if msg else p.returncode}): run `fusermount3 -u -z {mp}`"
        )
    log.warning("cleared the stale mount at %s (its tvix-store process is gone)", mp)


def _mount_type(mountpoint: str) -> str | None:
    """The filesystem type mounted at `mountpoint` (the last mount there), from mountinfo."""
    found = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if len(fields) >= 5 and fields[4].encode().decode("unicode_escape") == mountpoint and right:
                    found = right.split()[0]
    except OSError:
        return None
    return found


def check_fuse() -> None:
    """StoreError unless this process can mount FUSE (/dev/fuse; fusermount3 when not root)."""
    if not os.path.exists("/dev/fuse"):
        raise StoreError("FUSE is not available: /dev/fuse is missing (load the fuse kernel module)")
    if os.geteuid() != 0 and shutil.which("fusermount3") is None:
        raise StoreError("FUSE is not available: fusermount3 is not installed (package fuse3)")


def _mount_device(mountpoint: str) -> str | None:
    """major:minor of the filesystem mounted at `mountpoint` (from /proc/self/mountinfo, no stat)."""
    found = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                point = fields[4].encode().decode("unicode_escape")  # octal escapes like \040
                if point == mountpoint:
                    found = fields[2]  # the last one is the top of the stack
    except OSError:
        return None
    return found


def set_read_ahead(mountpoint: str, kb: int = READ_AHEAD_KB) -> None:
    """Raise the mount's BDI read_ahead_kb so the kernel sends large (up to 1 MiB) reads."""
    dev = _mount_device(mountpoint)
    if dev is None:
        log.debug("read_ahead_kb: %s not found in mountinfo", mountpoint)
        return
    try:
        Path(f"/sys/class/bdi/{dev}/read_ahead_kb").write_text(f"{kb}\n")
    except OSError as e:
        log.debug("cannot set read_ahead_kb of %s (%s): %s", mountpoint, dev, e)


class _Stop:
    """SIGINT/SIGTERM before the trio loop listens: remember it, stop right after mounting."""

    requested = False

    def handler(self, signum: int, frame: object) -> None:
        self.requested = True


def run_foreground(
    store: Store,
    mountpoint: str,
    *,
    store_root: bool = False,
    allow_other: bool = False,
    on_ready: Callable[[], None] | None = None,
    timeout: float = 10.0,
    xattrs: bool = True,
    on_counters: Callable[[Callable[[], dict[str, int]]], None] | None = None,
) -> None:
    """Mount `store` at `mountpoint` and serve until unmounted or SIGINT/SIGTERM (main thread only).

    `on_counters(snapshot)` is given the function that reads every counter of the mount (the
    store's and the mount's own; thread-safe), e.g. for a metrics endpoint.

    `on_ready()` is called once, on the trio loop, when a stat of the mount root has been
    answered; it must not block. `timeout` is the remote's deadline: no request waits longer
    than it and a second. `xattrs` False: no extended attributes at all (the kernel stops asking:
    fast `ls -l`). Raises StoreError if the mount cannot be made.
    """
    mp = check_mountpoint(mountpoint)
    check_fuse()
    model = FsModel(store, store_root=store_root, deadline=timeout + 1.0)
    ops = Operations(model, xattrs=xattrs)
    if on_counters is not None:
        on_counters(model.all_counters)
    stop = _Stop()
    saved = {s: signal.signal(s, stop.handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            pyfuse3.init(ops, mp, fuse_options(allow_other=allow_other))
        except RuntimeError:
            _close(unmount=False)
            raise StoreError(f"cannot mount FUSE at {mp} (see the lines above)") from None
        try:
            log.debug("mounted %s at %s", store.url, mp)
            trio.run(_serve, model, mp, on_ready, stop)
        finally:
            _close(unmount=True)
            log.info("unmounted %s", mp)
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def _close(unmount: bool) -> None:
    try:
        pyfuse3.close(unmount=unmount)
    except Exception as e:  # cleanup must go on
        log.debug("pyfuse3.close: %s", e)


async def _serve(model: FsModel, mp: str, on_ready: Callable[[], None] | None, stop: _Stop) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGUSR1) as signals:
        if stop.requested:
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_signals, signals, model, mp)
            nursery.start_soon(_announce_ready, mp, on_ready, read_ahead_kb_for(model.store))
            model.start_background(nursery)
            await pyfuse3.main()
            model.start_background(None)
            nursery.cancel_scope.cancel()


async def _watch_signals(signals: AsyncIterator[int], model: FsModel, mp: str) -> None:
    async for signum in signals:
        if signum == signal.SIGUSR1:
            counters = model.all_counters()
            log.info("counters of %s: %s", mp, " ".join(f"{k}={v}" for k, v in sorted(counters.items())))
            continue
        log.info("%s: unmounting %s", signal.Signals(signum).name, mp)
        pyfuse3.terminate()


async def _announce_ready(mp: str, on_ready: Callable[[], None] | None, read_ahead_kb: int) -> None:
    def answered() -> None:
        os.stat(mp)  # goes through the kernel to this very loop
        if not os.path.ismount(mp):
            raise StoreError(f"{mp} is not a mount point after mounting")
        # only now: FUSE_INIT (answered by the loop) lowers the BDI read-ahead to its own value
        set_read_ahead(mp, read_ahead_kb)

    await trio.to_thread.run_sync(answered, abandon_on_cancel=True)
    log.debug("mount at %s answers", mp)
    if on_ready is not None:
        on_ready()
