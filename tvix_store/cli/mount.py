"""`tvix-store mount`: mount a store read-only (foreground or background).

`--foreground` runs `tvix_fuse.mount.run_foreground` in this process. Otherwise the command
re-executes itself with `--foreground` as a detached child (new session, cwd /, stdin/stdout
on /dev/null) and returns only once the mount answers. Until then the child's stderr is a
pipe to the parent, which relays it (so a failure is the child's one error line); when
ready, the child moves its stderr to the mount's own log, named after the mount point
(`$XDG_STATE_HOME/tvix-store/mount-<mount point, / as ->.log`, e.g. `mount-mnt-tvix.log` for
/mnt/tvix), which closes the pipe; the parent then prints one line: what is mounted where,
the serving process's pid and the log file. With `$NOTIFY_SOCKET` set (systemd, Type=notify)
the serving process says READY=1 once the mount answers. A remote that cannot be reached at
mount time is an error (exit 1, one line, nothing mounted) unless `--cache-dir` holds data
(then it serves that, with a warning) or `--offline-ok` is given.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import select
import subprocess
import sys
import time
from typing import TYPE_CHECKING

from tvix_fuse.mount import check_fuse, check_mountpoint, run_foreground
from tvix_store.cli import UsageError, open_store_from_args, store_args
from tvix_store.core.errors import StoreError, UnavailableError
from tvix_store.store import Store
from tvix_store.util import sdnotify

if TYPE_CHECKING:
    from tvix_store.serve.metrics import MetricsServer

log = logging.getLogger("tvix_fuse")

READY_TIMEOUT = 60.0
_LOG_ENV = "_TVIX_MOUNT_LOG"  # set by the background parent for its child


def run(args: argparse.Namespace) -> int:
    """`tvix-store mount`: see the module docstring."""
    mp = check_mountpoint(args.mountpoint)
    check_fuse()
    if not args.foreground:
        return _background(args, mp)
    detach_to = os.environ.pop(_LOG_ENV, None)
    from tvix_store.cli.narbridge import start_metrics

    metrics = start_metrics(args)
    try:
        return _foreground(args, mp, detach_to, metrics)
    finally:
        if metrics is not None:
            metrics.stop()


def _foreground(args: argparse.Namespace, mp: str, detach_to: str | None, metrics: MetricsServer | None) -> int:
    store = open_store_from_args(args, long_lived=True)
    with store:
        if store.is_remote and not args.offline_ok:
            _reach(store, bool(getattr(args, "cache_dir", None)))

        def ready() -> None:
            if detach_to is not None:
                _detach_stderr(detach_to)
            note = f", metrics on {metrics.url}" if metrics is not None else ""
            log.info("mounted %s at %s (pid %d%s)", store.url or "store", mp, os.getpid(), note)
            sdnotify.ready(f"mounted {store.url or 'store'} at {mp}")

        run_foreground(
            store,
            mp,
            store_root=args.store_root,
            allow_other=args.allow_other,
            on_ready=ready,
            timeout=args.timeout,
            xattrs=args.xattrs,
            on_counters=metrics.add_store if metrics is not None else None,
        )
    return 0


def _reach(store: Store, cache_dir: bool) -> None:
    """One look-up through the store (a path info nobody has): a remote that answers, even
    NOT_FOUND, is reachable. One that is not: with a `--cache-dir` that holds data, the mount
    serves that (a warning); otherwise one line, exit 1, nothing mounted."""
    quiet = logging.getLogger("tvix_store.remote.breaker")  # its "is down" line would repeat ours
    was = quiet.disabled
    quiet.disabled = True
    try:
        store.pathinfos.get(bytes(20))
    except UnavailableError as e:
        if cache_dir and next(iter(store.blobs.iter_digests()), None) is not None:
            log.warning("%s; serving what the cache holds until it is back", e)
            return
        raise StoreError(f"{e}; not mounted (--offline-ok mounts anyway)") from None
    finally:
        quiet.disabled = was


def log_path(mp: str) -> str:
    """The log file of the mount at `mp` (see the module docstring); /dev/null if it cannot be made."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    d = os.path.join(base, "tvix-store")
    try:
        os.makedirs(d, exist_ok=True)
    except OSError:
        return os.devnull
    name = re.sub(r"[^A-Za-z0-9._-]", "_", mp.strip("/").replace("/", "-")) or "root"
    return os.path.join(d, f"mount-{name}.log")


def _detach_stderr(path: str) -> None:
    """Point fd 2 at the mount log (closing the pipe the background parent waits on)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    except OSError:
        fd = os.open(os.devnull, os.O_WRONLY)
    sys.stderr.flush()
    os.dup2(fd, 2)
    os.close(fd)


def _child_argv(args: argparse.Namespace, mp: str) -> list[str]:
    argv = [sys.executable, "-m", "tvix_store.cli", "--log-level", args.log_level, "mount", "--foreground"]
    # the child runs in / (so it keeps no directory busy): store_args makes the default store explicit
    argv += store_args(args)
    if getattr(args, "cache_dir", None):
        argv += ["--cache-dir", os.path.abspath(args.cache_dir)]
    if getattr(args, "cache_size", None):
        argv += ["--cache-size", str(args.cache_size)]
    if args.store_root:
        argv.append("--store-root")
    if args.allow_other:
        argv.append("--allow-other")
    if not args.xattrs:
        argv.append("--no-xattrs")
    if args.offline_ok:
        argv.append("--offline-ok")
    if args.metrics_listen:
        argv += ["--metrics-listen", args.metrics_listen]
    return [*argv, mp]


def _background(args: argparse.Namespace, mp: str) -> int:
    env = dict(os.environ)
    env[_LOG_ENV] = logfile = log_path(mp)
    proc = subprocess.Popen(
        _child_argv(args, mp),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
        cwd="/",
        env=env,
    )
    assert proc.stderr is not None
    out = bytearray()
    deadline = time.monotonic() + READY_TIMEOUT
    fd = proc.stderr.fileno()
    eof = False
    while not eof:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        r, _, _ = select.select([fd], [], [], min(left, 1.0))
        if r:
            chunk = os.read(fd, 65536)
            eof = not chunk
            out += chunk
    proc.stderr.close()
    if eof and proc.poll() is None and os.path.ismount(mp):
        sys.stderr.write(out.decode(errors="replace"))
        what = args.store or args.blob_store or "the default store"
        print(f"mounted {what} at {mp} (pid {proc.pid}, log {logfile})", file=sys.stderr)
        return 0  # ready: the child serves on, detached
    if not eof or proc.poll() is None:
        try:  # stuck or half-up: end it and leave nothing mounted
            proc.wait(timeout=10 if eof else 0.01)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if os.path.ismount(mp):
            subprocess.run(["fusermount3", "-u", "-z", mp], capture_output=True)
    lines = out.decode(errors="replace").splitlines()
    errors = [ln for ln in lines if ln.startswith("tvix-store: ")]
    for ln in lines:
        if ln not in errors:
            print(ln, file=sys.stderr)
    if errors:
        message = errors[-1].split(": ", 2)[-1]
        if proc.returncode == 2:  # the child's usage error is ours (a bad URL, --cache-dir misuse)
            raise UsageError(message)
        raise StoreError(message)
    if not eof:
        raise StoreError(f"the mount at {mp} did not answer within {READY_TIMEOUT:.0f} s")
    raise StoreError(f"the mount process exited with status {proc.returncode}")
