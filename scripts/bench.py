"""The side-by-side benchmark of /work/shared/spec/BENCH.md, run as `scripts/bench [--quick] [--rows …]`.

It generates its data under a temp dir (`big`: one file of random bytes, `tree`: many small
random files in ~100 directories with a few symlinks and executables), drives this
project only through the `tvix-store` command line (import, mount, daemon), runs the
peers (nix-store --add, casync, borg, plain dd on the original data) on the same data in
the same run, and prints one row per measurement: median seconds over the runs, a rate,
the ratio to the reference named in the row (ref time / subject time: > 1 means faster
than the reference), the goal and whether it is met. Every mount, process, nix path and
file it creates is removed again, also on Ctrl-C or SIGTERM.

It is NOT a test suite: it asserts nothing beyond sanity (the data read back is the data
written; a failed step becomes a row naming the reason, never a crash), and its numbers
are only meaningful side by side on a quiet machine.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import mmap
import os
import queue
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

MiB = 1 << 20
REPO = Path(__file__).resolve().parent.parent
PREFAULT_BYTES = 1536 * MiB
#: apt package for each peer command
PEER_PACKAGES = {
    "borg": "borgbackup",
    "casync": "casync",
    "nix-store": "nix-bin",
    "b3sum": "b3sum",
    "fusermount3": "fuse3",
}
ROW_GROUPS = ("import", "mount", "remote")


class BenchError(Exception):
    """A step of one measurement failed; the row shows this message instead of a number."""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def say(text: str) -> None:
    """A line on stdout; a reader that went away (`| head`) does not stop the bench or its cleanup."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


# --- results --------------------------------------------------------------------------------


@dataclass
class Measurement:
    """The runs of one subject on one piece of work (`amount` bytes, files or reads)."""

    label: str
    times: list[float] = field(default_factory=list)
    amount: float = 0.0
    unit: str = "MB/s"
    error: str | None = None
    note: str = ""
    skipped: bool = False  # not run on purpose (peer missing, --quick): no comparison row against it

    @property
    def median(self) -> float | None:
        return statistics.median(self.times) if self.times and self.error is None else None

    def rate(self) -> str:
        m = self.median
        if m is None or m <= 0:
            return "-"
        if self.unit == "MB/s":
            return f"{self.amount / m / 1e6:,.0f} MB/s"
        return f"{self.amount / m:,.0f} {self.unit}"


@dataclass
class Row:
    name: str
    seconds: str = "-"
    rate: str = "-"
    ratio: str = "-"
    goal: str = "report"
    met: str = "-"
    note: str = ""


COLUMNS = (("row", "name"), ("median s", "seconds"), ("rate", "rate"), ("ratio", "ratio"), ("goal", "goal"))


def format_table(rows: list[Row]) -> str:
    heads = [h for h, _ in COLUMNS] + ["met", "note"]
    cells = [[getattr(r, a) for _, a in COLUMNS] + [r.met, r.note] for r in rows]
    widths = [max([len(heads[i])] + [len(c[i]) for c in cells]) for i in range(len(heads) - 1)]
    right = {1, 2}

    def line(vals: list[str]) -> str:
        out = []
        for i, v in enumerate(vals[:-1]):
            out.append(v.rjust(widths[i]) if i in right else v.ljust(widths[i]))
        out.append(vals[-1])
        return "  ".join(out).rstrip()

    sep = "  ".join("-" * w for w in widths) + "  ----"
    return "\n".join([line(heads), sep, *(line(c) for c in cells)])


# --- cleanup --------------------------------------------------------------------------------


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


def _on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


# --- processes and mounts -----------------------------------------------------------------


def run(
    cmd: list[str],
    *,
    timeout: float = 300,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[bytes]:
    try:
        p = subprocess.run(cmd, capture_output=True, timeout=timeout, env=env, cwd=cwd)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{Path(cmd[0]).name} timed out after {timeout:.0f} s") from None
    except FileNotFoundError:
        raise BenchError(f"{cmd[0]} not found") from None
    if check and p.returncode != 0:
        tail = " ".join(p.stderr.decode(errors="replace").split())[-300:]
        raise BenchError(f"{Path(cmd[0]).name} {' '.join(cmd[1:2])} exited {p.returncode}: {tail}")
    return p


def timed(
    cmd: list[str], *, timeout: float = 300, cwd: str | Path | None = None, env: dict[str, str] | None = None
) -> float:
    t0 = time.perf_counter()
    run(cmd, timeout=timeout, cwd=cwd, env=env)
    return time.perf_counter() - t0


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


def ismount(p: Path) -> bool:
    try:
        return os.path.ismount(p)
    except OSError:  # a dead FUSE server: ENOTCONN on stat; still mounted
        return True


def unmount(mnt: Path, proc: subprocess.Popen[bytes] | None, grace: float = 20) -> None:
    """fusermount3 -u (retried for a few s while busy), else `-u -z`; wait for the server, then SIGTERM/SIGKILL it."""
    deadline = time.monotonic() + 5
    while ismount(mnt) and time.monotonic() < deadline:
        if subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, timeout=30).returncode == 0:
            break
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.2)
    if ismount(mnt):
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True, timeout=30)
    if proc is not None:
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            stop_process(proc, 5)


class FgMount:
    """A FUSE server that stays in the foreground, as our child; ready when `mnt` is a mount point."""

    def __init__(
        self, name: str, cmd: list[str], mnt: Path, logfile: Path, env: dict[str, str] | None = None, ready: float = 90
    ) -> None:
        self.name, self.cmd, self.mnt, self.logfile, self.env, self.ready = name, cmd, mnt, logfile, env, ready
        self.proc: subprocess.Popen[bytes] | None = None
        self._key = 0

    def __enter__(self) -> FgMount:
        self.mnt.mkdir(parents=True, exist_ok=True)
        if ismount(self.mnt):
            raise BenchError(f"{self.mnt} is already a mount point")
        with open(self.logfile, "ab") as lf:
            self.proc = subprocess.Popen(
                self.cmd, stdin=subprocess.DEVNULL, stdout=lf, stderr=lf, env=self.env, start_new_session=True
            )
        proc = self.proc
        self._key = CLEANUP.add(f"unmount {self.mnt}", lambda: unmount(self.mnt, proc))
        deadline = time.monotonic() + self.ready
        while not ismount(self.mnt):
            if proc.poll() is not None:
                self.__exit__()
                raise BenchError(f"{self.name} exited {proc.returncode} before mounting: {tail(self.logfile)}")
            if time.monotonic() > deadline:
                self.__exit__()
                raise BenchError(f"{self.name} not mounted within {self.ready:.0f} s: {tail(self.logfile)}")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        CLEANUP.run(self._key)


def tail(path: Path, n: int = 300) -> str:
    try:
        text = path.read_bytes()[-4000:].decode(errors="replace")
    except OSError:
        return ""
    return " ".join(text.split())[-n:]


class Daemon:
    """`tvix-store daemon --listen 127.0.0.1:0`, ready once it logs `listening on HOST:PORT`."""

    def __init__(self, ts: list[str], store_url: str, logfile: Path, ready: float = 60) -> None:
        self.logfile = logfile
        self.proc = subprocess.Popen(
            [*ts, "daemon", "--listen", "127.0.0.1:0", "--store", store_url],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        proc = self.proc
        self._key = CLEANUP.add("stop daemon", lambda: stop_process(proc))
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._drain, args=(lines,), daemon=True).start()
        deadline = time.monotonic() + ready
        while True:
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                line = ""
            if line is None:
                self.stop()
                raise BenchError(f"daemon exited ({proc.wait()}) before ready: {tail(logfile)}")
            m = re.search(r"listening on (\S+)", line)
            if m:
                host, _, port = m.group(1).rpartition(":")
                self.host, self.port = host.strip("[]"), int(port)
                break
            if time.monotonic() > deadline:
                self.stop()
                raise BenchError(f"daemon not ready within {ready:.0f} s: {tail(logfile)}")

    def _drain(self, lines: queue.Queue[str | None]) -> None:
        assert self.proc.stderr is not None
        with open(self.logfile, "ab") as lf:
            for raw in self.proc.stderr:
                lf.write(raw)
                lf.flush()
                lines.put(raw.decode(errors="replace"))
        lines.put(None)

    @property
    def url(self) -> str:
        return f"grpc+http://{self.host}:{self.port}"

    def stop(self) -> None:
        CLEANUP.run(self._key)


class CountingProxy:
    """A TCP proxy on 127.0.0.1 that counts the payload bytes crossing it in each direction.

    With the upstream gone, it still accepts, counts what the client sends (briefly) and
    closes: so "0 bytes on the wire" really means the client sent nothing.
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self._lock = threading.Lock()
        self.to_server = 0
        self.to_client = 0
        self.connections = 0
        self._socks: list[socket.socket] = []
        self._stop = threading.Event()
        threading.Thread(target=self._accept_loop, daemon=True).start()
        self._key = CLEANUP.add("stop proxy", self.close)

    @property
    def url(self) -> str:
        return f"grpc+http://127.0.0.1:{self.port}"

    def total(self) -> int:
        with self._lock:
            return self.to_server + self.to_client

    def reset(self) -> None:
        with self._lock:
            self.to_server = self.to_client = self.connections = 0

    def wait_quiet(self, quiet: float = 0.5, limit: float = 5.0) -> int:
        """Wait (at most `limit` s) until no byte crossed for `quiet` s; return the total."""
        deadline = time.monotonic() + limit
        last, since = self.total(), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.05)
            now = self.total()
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet:
                break
        return last

    def _count(self, up: int = 0, down: int = 0) -> None:
        with self._lock:
            self.to_server += up
            self.to_client += down

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                c, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
                self._socks.append(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        c.settimeout(None)
        try:
            u = socket.create_connection(self.upstream, timeout=2)
        except OSError:
            c.settimeout(0.3)
            with contextlib.suppress(OSError):
                for _ in range(10):
                    d = c.recv(65536)
                    if not d:
                        break
                    self._count(up=len(d))
            c.close()
            return
        u.settimeout(None)
        for s in (c, u):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._socks.append(u)
        done = threading.Semaphore(0)
        threading.Thread(target=self._pump, args=(u, c, False, done), daemon=True).start()
        self._pump(c, u, True, done)
        done.acquire(timeout=60)
        c.close()
        u.close()

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool, done: threading.Semaphore) -> None:
        try:
            while True:
                d = src.recv(1 << 18)
                if not d:
                    break
                self._count(up=len(d)) if up else self._count(down=len(d))
                dst.sendall(d)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
            if not up:
                done.release()

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


# --- cold cache -----------------------------------------------------------------------------


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


def can_drop_caches() -> bool:
    return os.access("/proc/sys/vm/drop_caches", os.W_OK)


# --- data -----------------------------------------------------------------------------------


@dataclass
class Data:
    big: Path  # the file
    bigdir: Path  # the directory holding only `big` (what casync and borg archive)
    tree: Path
    big_size: int
    tree_files: list[str]  # relative paths of the regular files
    tree_bytes: int


def make_data(root: Path, big_size: int, n_files: int, n_dirs: int, seed: int) -> Data:
    rng = random.Random(seed)
    bigdir = root / "bigdir"
    bigdir.mkdir(parents=True)
    big = bigdir / "big"
    with open(big, "wb") as f:
        left = big_size
        while left:
            n = min(left, 4 * MiB)
            f.write(os.urandom(n))
            left -= n
    tree = root / "tree"
    top = max(1, round(n_dirs**0.5))
    leaves = []
    for i in range(top):
        for j in range(max(1, n_dirs // top)):
            d = tree / f"d{i:02}" / f"s{j:02}"
            d.mkdir(parents=True)
            leaves.append(d)
    files: list[str] = []
    total = 0
    for k in range(n_files):
        d = leaves[rng.randrange(len(leaves))]
        size = rng.randint(1024, 16 * 1024)
        p = d / f"f{k:05}.bin"
        if k % max(1, n_files // 5) == 1:  # a few executables
            p = d / f"run{k:05}.sh"
            p.write_bytes(b"#!/bin/sh\nexit 0\n#" + os.urandom(size - 18))
            p.chmod(0o755)
        else:
            p.write_bytes(os.urandom(size))
        files.append(str(p.relative_to(tree)))
        total += size
    # a few symlinks: to files (relative, some across directories) and to a directory
    for i in range(4):
        target = tree / files[rng.randrange(len(files))]
        link = leaves[rng.randrange(len(leaves))] / f"link{i}"
        link.symlink_to(os.path.relpath(target, link.parent))
    (tree / "link-dir").symlink_to(os.path.relpath(leaves[0], tree))
    files.sort()
    return Data(big, bigdir, tree, big_size, files, total)


def snapshot(d: Path) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    for dirpath, _dirs, names in os.walk(d):
        for n in names:
            p = os.path.join(dirpath, n)
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(p)
                out[os.path.relpath(p, d)] = (st.st_size, st.st_mtime_ns)
    return out


def compare_trees(a: Path, b: Path) -> str | None:
    """None when b has the same files (content, exec bit), symlinks and directories as a; else the first difference."""
    for dirpath, dirs, names in os.walk(a):
        rel = os.path.relpath(dirpath, a)
        other = b / rel
        try:
            theirs = set(os.listdir(other))
        except OSError as e:
            return f"{rel}: {e.strerror}"
        if theirs != set(dirs) | set(names):
            return f"{rel}: entries differ"
        for n in names + dirs:
            pa, pb = Path(dirpath) / n, other / n
            sa, sb = os.lstat(pa), os.lstat(pb)
            if os.path.islink(pa):
                if not os.path.islink(pb) or os.readlink(pa) != os.readlink(pb):
                    return f"{rel}/{n}: symlink differs"
            elif pa.is_file():
                if not pb.is_file() or bool(sa.st_mode & 0o100) != bool(sb.st_mode & 0o100):
                    return f"{rel}/{n}: type or executable bit differs"
                if pa.read_bytes() != pb.read_bytes():
                    return f"{rel}/{n}: content differs"
    return None


def files_equal(a: Path, b: Path, timeout: float = 300) -> bool:
    return subprocess.run(["cmp", "-s", str(a), str(b)], timeout=timeout).returncode == 0


# --- the bench ------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.runs: int = args.runs
        self.rows: list[Row] = []
        self.peers: dict[str, str | None] = {}  # command -> None if usable, else why not
        exe = Path(sys.executable).parent / "tvix-store"
        self.ts = [str(exe)] if exe.exists() else [sys.executable, "-m", "tvix_store.cli"]
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
        # built on demand
        self.main_store: Path | None = None
        self.paths: dict[str, str] = {}  # "big"/"tree" -> /nix/store path in main_store
        self.borg_repo: Path | None = None
        self.casync: dict[str, Path] = {}  # "big"/"tree" -> dir S holding store/ and x.caidx
        self.memo: dict[str, Measurement] = {}

    # -- plumbing
    def fresh(self, what: str) -> Path:
        self._n += 1
        p = self.tmp / f"{what}-{self._n}"
        return p

    def emit(self, row: Row) -> None:
        self.rows.append(row)
        parts = [f"{row.seconds} s" if row.seconds != "-" else "", row.rate if row.rate != "-" else ""]
        parts += [row.ratio if row.ratio != "-" else "", f"goal {row.goal}" if row.goal else ""]
        parts += [f"met: {row.met}" if row.met not in ("", "-") else ""]
        shown = ", ".join(p for p in parts if p)
        say(f"{row.name}: {shown}" + (f"  [{row.note}]" if row.note else ""))

    def report(self, name: str, subject: Measurement, refs: list[tuple[Measurement, float | None]]) -> None:
        """Rows for the references (as measured) and one row per comparison of `subject` with one of them."""
        for ref, _ in refs:
            self.emit(self._row(f"{name}: {ref.label}", ref, ratio="(reference)", goal="", met="", note=ref.note))
        if all(ref.skipped for ref, _ in refs):
            self.emit(self._row(f"{name}: {subject.label}", subject, note=subject.note))
        for ref, goal in refs:
            if ref.skipped:
                continue
            ratio, met = "-", "-"
            s, r = subject.median, ref.median
            if s is not None and r is not None and s > 0 and ref.amount > 0:
                x = (subject.amount / s) / (ref.amount / r)  # rates: the amounts may differ (a prefix of big)
                ratio = f"{x:.2f}× {ref.label}"
                if goal is not None:
                    met = "yes" if x >= goal else "no"
            elif subject.error is None and ref.error is not None:
                ratio = f"n/a ({ref.label} failed)"
            goal_s = f"≥ {goal:g}× {ref.label}" if goal is not None else "report"
            self.emit(
                self._row(f"{name}: {subject.label}", subject, ratio=ratio, goal=goal_s, met=met, note=subject.note)
            )

    @staticmethod
    def _row(name: str, m: Measurement, ratio: str = "-", goal: str = "report", met: str = "-", note: str = "") -> Row:
        if m.error is not None:
            what = "skipped" if m.skipped else "FAILED"
            return Row(
                name, ratio=ratio if ratio != "(reference)" else "-", goal=goal, met=met, note=f"{what}: {m.error}"
            )
        med = m.median
        runs = f"{len(m.times)} runs"
        return Row(
            name,
            seconds=f"{med:.3f}" if med is not None else "-",
            rate=m.rate(),
            ratio=ratio,
            goal=goal,
            met=met,
            note=f"{runs}; {note}" if note else runs,
        )

    def peer(self, cmd: str) -> str | None:
        """None if the peer can be used, else the reason it cannot."""
        if cmd in self.args.skip_peers:
            return "--skip-peers" if not self.args.quick else "not in --quick"
        return self.peers.get(cmd, f"{cmd} not installed")

    def skipped(self, label: str, why: str, amount: float = 0, unit: str = "MB/s") -> Measurement:
        return Measurement(label, amount=amount, unit=unit, error=why, skipped=True)

    def guard(self, m: Measurement, fn: Callable[[], None]) -> Measurement:
        """Run fn, turning a failure into the measurement's error (the row shows the reason)."""
        try:
            fn()
        except BenchError as e:
            m.error = str(e)
        except (OSError, subprocess.SubprocessError) as e:
            m.error = f"{type(e).__name__}: {e}"
        return m

    def cold(self) -> None:
        if self.cold_ok:
            make_cold(PREFAULT_BYTES if not self.args.quick else PREFAULT_BYTES // 3)

    def tvix_mount(self, url: str, extra: tuple[str, ...] = (), name: str = "tvix-mnt") -> FgMount:
        mnt = self.fresh(name)
        cmd = [*self.ts, "mount", "--foreground", "--store", url, *extra, str(mnt)]
        return FgMount("tvix-store mount", cmd, mnt, self.tmp / "logs" / f"{mnt.name}.log", env=self.env)

    def borg_mount(self) -> FgMount:
        assert self.borg_repo is not None
        mnt = self.fresh("borg-mnt")
        cmd = ["borg", "mount", "-f", f"{self.borg_repo}::a", str(mnt)]
        return FgMount("borg mount", cmd, mnt, self.tmp / "logs" / f"{mnt.name}.log", env=self.env)

    def casync_mount(self, which: str, store: str | None = None) -> FgMount:
        s = self.casync[which]
        mnt = self.fresh(f"casync-mnt-{which}")
        cmd = ["casync", "mount", f"--store={store or s / 'store'}", str(s / "x.caidx"), str(mnt)]
        return FgMount("casync mount", cmd, mnt, self.tmp / "logs" / f"{mnt.name}.log", env=self.env)

    def in_borg(self, mnt: Path, p: Path) -> Path:
        return mnt / str(p).lstrip("/")

    # -- setup
    def ensure_peers(self) -> None:
        missing = [c for c in PEER_PACKAGES if shutil.which(c) is None]
        if missing and os.geteuid() == 0 and shutil.which("apt-get") and not self.args.no_install:
            pkgs = [PEER_PACKAGES[c] for c in missing]
            log(f"installing {' '.join(pkgs)} with apt-get")
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            try:
                run(["apt-get", "update", "-qq"], timeout=300, env=env, check=False)
                run(["apt-get", "install", "-y", "-qq", *pkgs], timeout=600, env=env)
            except BenchError as e:
                log(f"apt-get failed: {e}")
        for c in PEER_PACKAGES:
            self.peers[c] = None if shutil.which(c) else f"{c} not installed ({PEER_PACKAGES[c]})"
        if self.peers["nix-store"] is None and os.geteuid() != 0:
            self.peers["nix-store"] = "nix-store --add needs root here"
        if self.peers["fusermount3"] is not None:
            for c in ("borg", "casync"):
                self.peers[c] = self.peers["fusermount3"]

    def ensure_main_store(self) -> None:
        """One local store with big and tree imported (untimed), for the mount and remote rows."""
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

    def ensure_borg(self) -> None:
        if self.borg_repo is not None:
            return
        if (why := self.peer("borg")) is not None:
            raise BenchError(why)
        repo = self.tmp / "borg-repo"
        log("borg create (setup)")
        run(["borg", "init", "-e", "none", str(repo)], env=self.env, timeout=120)
        run(["borg", "create", f"{repo}::a", str(self.data.bigdir), str(self.data.tree)], env=self.env, timeout=600)
        self.borg_repo = repo

    def casync_make(self, which: str) -> float:
        """casync make of bigdir or tree into a fresh S; returns its time, keeps S for the mounts."""
        src = self.data.bigdir if which == "big" else self.data.tree
        s = self.fresh(f"casync-{which}")
        s.mkdir()
        os.sync()
        t = timed(["casync", "make", f"--store={s / 'store'}", str(s / "x.caidx"), str(src)], timeout=600)
        old = self.casync.get(which)
        self.casync[which] = s
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return t

    def ensure_casync(self, which: str) -> None:
        if which in self.casync:
            return
        if (why := self.peer("casync")) is not None:
            raise BenchError(why)
        log(f"casync make {which} (setup)")
        self.casync_make(which)

    # -- import rows
    def rows_import(self) -> None:
        d = self.data
        for which, src, amount, unit in (
            ("big", d.big, d.big_size, "MB/s"),
            ("tree", d.tree, len(d.tree_files), "files/s"),
        ):
            name = f"import {which} (fresh store)"
            nix = Measurement("nix-store --add", amount=amount, unit=unit)
            if (why := self.peer("nix-store")) is not None:
                nix.error, nix.skipped = why, True
            else:
                self.guard(nix, lambda n=nix, s=src: self._nix_add(n, s))
            tv = Measurement("tvix-store import", amount=amount, unit=unit)
            self.guard(tv, lambda m=tv, s=src, n=nix: self._tvix_import(m, s, n))
            refs: list[tuple[Measurement, float | None]] = [(nix, 1.0)]
            if self.peer("casync") is None:
                cs = Measurement(
                    "casync make",
                    amount=amount,
                    unit=unit,
                    note="caidx of " + ("bigdir/" if which == "big" else "tree/"),
                )
                self.guard(cs, lambda m=cs, w=which: m.times.extend(self._casync_runs(w)))
                refs.append((cs, None))
            else:
                refs.append((self.skipped("casync make", self.peer("casync") or ""), None))
            self.report(name, tv, refs)
            if which == "tree":
                self.memo["import-tree"] = tv
        self.row_reimport()

    def _casync_runs(self, which: str) -> list[float]:
        out = []
        for i in range(self.runs):
            log(f"casync make {which} ({i + 1}/{self.runs})")
            out.append(self.casync_make(which))
        return out

    def _nix_add(self, m: Measurement, src: Path) -> None:
        """`runs` × nix-store --add, deleting the path after each so each run really adds.

        The data is fresh random bytes, so the path cannot be in /nix/store before the first run."""
        path = ""
        for i in range(self.runs):
            os.sync()
            log(f"nix-store --add {src.name} ({i + 1}/{self.runs})")
            t0 = time.perf_counter()
            out = run(["nix-store", "--add", str(src)], timeout=600)
            m.times.append(time.perf_counter() - t0)
            path = out.stdout.decode().strip()
            key = CLEANUP.add(f"nix-store --delete {path}", lambda p=path: self._nix_delete(p, check=False))
            self._nix_delete(path)
            CLEANUP.discard(key)
        m.note = path

    def _nix_delete(self, path: str, check: bool = True) -> None:
        p = run(["nix-store", "--delete", path], timeout=300, check=False)
        still = run(["nix-store", "--check-validity", path], check=False).returncode == 0
        if check and still:
            raise BenchError(
                f"nix-store --delete {path} did not delete it: {' '.join(p.stderr.decode().split())[-200:]}"
            )

    def _tvix_import(self, m: Measurement, src: Path, nix: Measurement) -> None:
        path = ""
        for i in range(self.runs):
            store = self.fresh("import-store")
            os.sync()
            log(f"tvix-store import {src.name} ({i + 1}/{self.runs})")
            t0 = time.perf_counter()
            out = run([*self.ts, "import", "--store", f"local://{store}", str(src)], timeout=600)
            m.times.append(time.perf_counter() - t0)
            path = out.stdout.decode().strip()
            shutil.rmtree(store, ignore_errors=True)
        if nix.note.startswith("/nix/store/"):
            m.note = "same store path as nix-store --add" if path == nix.note else f"DIFFERENT store path {path}"

    def row_reimport(self) -> None:
        name = "re-import unchanged tree"
        m = Measurement("tvix-store import (again)", amount=len(self.data.tree_files), unit="files/s")
        first = self.memo.get("import-tree")
        verdict = {"met": "-", "note": ""}

        def go() -> None:
            self.ensure_main_store()
            assert self.main_store is not None
            new: set[str] = set()
            changed: set[str] = set()
            size_delta = 0
            for i in range(self.runs):
                before = snapshot(self.main_store)
                os.sync()
                log(f"tvix-store import tree again ({i + 1}/{self.runs})")
                t0 = time.perf_counter()
                out = run([*self.ts, "import", "--store", f"local://{self.main_store}", str(self.data.tree)])
                m.times.append(time.perf_counter() - t0)
                after = snapshot(self.main_store)
                if out.stdout.decode().strip() != self.paths["tree"]:
                    raise BenchError(
                        f"re-import printed {out.stdout.decode().strip()}, first import {self.paths['tree']}"
                    )
                new |= set(after) - set(before)
                changed |= {k for k in before if k in after and after[k] != before[k]}
                size_delta += sum(v[0] for v in after.values()) - sum(v[0] for v in before.values())
            verdict["met"] = "yes" if not new else "no"
            verdict["note"] = (
                f"new files in store dir: {len(new)}, changed: {len(changed)}, size delta: {size_delta} B"
                + (f" (e.g. {sorted(new)[0]})" if new else "")
            )

        self.guard(m, go)
        row = self._row(f"{name}: {m.label}", m, goal="report; nothing new written", met=verdict["met"])
        if m.error is None:
            fm = first.median if first is not None else None
            s = m.median
            row.ratio = f"{fm / s:.2f}× first import" if fm and s else "-"
            row.note += "; " + verdict["note"]
        self.emit(row)

    # -- mount rows
    def rows_mount(self) -> None:
        self.ensure_main_store()
        self.row_big_warm()
        self.row_big_cold()
        self.rows_tree()
        self.row_random()

    def row_big_warm(self) -> None:
        d = self.data
        dd_args = ["of=/dev/null", "bs=1M", "status=none"]
        ref = Measurement("dd of the original (page cache)", amount=d.big_size)

        def ref_go() -> None:
            run(["dd", f"if={d.big}", *dd_args])  # make sure it is cached
            for _ in range(self.runs):
                ref.times.append(timed(["dd", f"if={d.big}", *dd_args]))

        self.guard(ref, ref_go)
        m = Measurement("tvix mount, dd (second read)", amount=d.big_size)

        def go() -> None:
            assert self.main_store is not None
            with self.tvix_mount(f"local://{self.main_store}") as mnt:
                f = self.store_file(mnt.mnt, "big")
                log("mount big warm: first read")
                run(["dd", f"if={f}", *dd_args])
                for i in range(self.runs):
                    log(f"mount big warm ({i + 1}/{self.runs})")
                    m.times.append(timed(["dd", f"if={f}", *dd_args]))
                if not files_equal(f, d.big):
                    raise BenchError("WRONG DATA: big on the mount differs from the original")
                m.note = "content verified (cmp)"

        self.guard(m, go)
        self.report("mount big warm seq", m, [(ref, 0.8)])

    def cold_dd(self, mount: Callable[[], FgMount], path: Callable[[Path], Path], label: str) -> Measurement:
        """`runs` × (fresh mount, cold caches, dd bs=1M of big), one measurement."""
        m = Measurement(label, amount=self.data.big_size)
        if not self.cold_ok:
            m.note = "NOT cold: cannot drop caches (not root)"

        def go() -> None:
            for i in range(self.runs):
                with mount() as mnt:
                    f = path(mnt.mnt)
                    self.cold()
                    log(f"{label} cold dd ({i + 1}/{self.runs})")
                    m.times.append(timed(["dd", f"if={f}", "of=/dev/null", "bs=1M", "status=none"], timeout=600))

        return self.guard(m, go)

    def local_cold(self) -> Measurement:
        if "local-cold" not in self.memo:
            assert self.main_store is not None
            self.memo["local-cold"] = self.cold_dd(
                lambda: self.tvix_mount(f"local://{self.main_store}"),
                lambda mnt: self.store_file(mnt, "big"),
                "tvix mount (local store)",
            )
        return self.memo["local-cold"]

    def row_big_cold(self) -> None:
        borg = self._peer_cold(
            "borg", lambda: self.borg_mount(), lambda mnt: self.in_borg(mnt, self.data.big), "borg mount"
        )
        cas = self._peer_cold(
            "casync", lambda: self.casync_mount("big"), lambda mnt: mnt / "big", "casync mount", "big"
        )
        m = self.local_cold()
        self.report("mount big cold seq", m, [(borg, 1.5), (cas, 4.0)])

    def _peer_cold(
        self, peer: str, mount: Callable[[], FgMount], path: Callable[[Path], Path], label: str, which: str = ""
    ) -> Measurement:
        if (why := self.peer(peer)) is not None:
            return self.skipped(label, why)
        try:
            self.ensure_borg() if peer == "borg" else self.ensure_casync(which)
        except BenchError as e:
            return Measurement(label, error=f"setup: {e}")
        return self.cold_dd(mount, path, label)

    def rows_tree(self) -> None:
        d = self.data
        n = len(d.tree_files)
        subjects: list[tuple[str, Callable[[], contextlib.AbstractContextManager[Path]], str | None]] = []

        @contextlib.contextmanager
        def tvix() -> Iterator[Path]:
            assert self.main_store is not None
            with self.tvix_mount(f"local://{self.main_store}") as mnt:
                yield self.store_file(mnt.mnt, "tree")

        @contextlib.contextmanager
        def borg() -> Iterator[Path]:
            with self.borg_mount() as mnt:
                yield self.in_borg(mnt.mnt, d.tree)

        @contextlib.contextmanager
        def cas() -> Iterator[Path]:
            with self.casync_mount("tree") as mnt:
                yield mnt.mnt

        @contextlib.contextmanager
        def original() -> Iterator[Path]:
            yield d.tree

        subjects = [("tvix mount", tvix, None), ("borg mount", borg, "borg"), ("casync mount", cas, "casync")]
        subjects.append(("original tree", original, None))
        cmd = ["sh", "-c", "find . -type f -print0 | xargs -0 cat > /dev/null"]
        for temp in ("cold", "warm"):
            ms: dict[str, Measurement] = {}
            for label, ctx, peer in subjects:
                m = Measurement(label, amount=n, unit="files/s")
                ms[label] = m
                if peer is not None and (why := self.peer(peer)) is not None:
                    m.error, m.skipped = why, True
                    continue
                try:
                    if peer == "borg":
                        self.ensure_borg()
                    elif peer == "casync":
                        self.ensure_casync("tree")
                except BenchError as e:
                    m.error = str(e)
                    continue
                if temp == "cold" and not self.cold_ok:
                    m.note = "NOT cold: cannot drop caches (not root)"

                def go(
                    m: Measurement = m,
                    ctx: Callable[[], contextlib.AbstractContextManager[Path]] = ctx,
                    temp: str = temp,
                ) -> None:
                    if temp == "cold":
                        for i in range(self.runs):
                            with ctx() as root:
                                self.cold()
                                log(f"tree cold {m.label} ({i + 1}/{self.runs})")
                                m.times.append(timed(cmd, cwd=root, timeout=600))
                    else:
                        with ctx() as root:
                            run(cmd, cwd=root, timeout=600)
                            for i in range(self.runs):
                                log(f"tree warm {m.label} ({i + 1}/{self.runs})")
                                m.times.append(timed(cmd, cwd=root, timeout=600))
                            if m.label == "tvix mount":
                                diff = compare_trees(d.tree, root)
                                if diff is not None:
                                    raise BenchError(f"WRONG DATA: {diff}")
                                m.note = "content verified"

                self.guard(m, go)
            tv = ms.pop("tvix mount")
            refs: list[tuple[Measurement, float | None]] = [
                (ms["borg mount"], 1.0),
                (ms["casync mount"], None),
                (ms["original tree"], None),
            ]
            self.report(f"mount tree find|xargs cat {temp}", tv, refs)

    def row_random(self) -> None:
        d = self.data
        rng = random.Random(1234)
        n = 1000
        pages = d.big_size // 4096
        offsets = [rng.randrange(pages) * 4096 for _ in range(n)]

        def reads(path: Path) -> float:
            fd = os.open(path, os.O_RDONLY)
            try:
                t0 = time.perf_counter()
                for off in offsets:
                    if len(os.pread(fd, 4096, off)) != 4096:
                        raise BenchError(f"short read at {off}")
                return time.perf_counter() - t0
            finally:
                os.close(fd)

        ref = Measurement("original file", amount=n, unit="reads/s", note="cold")

        def ref_go() -> None:
            for _ in range(self.runs):
                self.cold()
                ref.times.append(reads(d.big))

        self.guard(ref, ref_go)
        m = Measurement("tvix mount", amount=n, unit="reads/s", note="cold, fresh mount each run")

        def go() -> None:
            assert self.main_store is not None
            for i in range(self.runs):
                with self.tvix_mount(f"local://{self.main_store}") as mnt:
                    f = self.store_file(mnt.mnt, "big")
                    os.stat(f)
                    self.cold()
                    log(f"random 4 KiB reads ({i + 1}/{self.runs})")
                    m.times.append(reads(f))

        self.guard(m, go)
        self.report("mount big 4 KiB random reads x1000", m, [(ref, None)])

    # -- remote rows
    def rows_remote(self) -> None:
        self.ensure_main_store()
        self.row_remote_cold()
        self.row_wire()
        self.row_ttfb()
        self.row_offline()

    def remote_mount(self, url: str, cache: Path | None = None, timeout: float | None = None) -> FgMount:
        cache = cache or self.fresh("cache")
        extra = ["--cache-dir", str(cache)]
        if timeout is not None:
            extra += ["--timeout", f"{timeout:g}"]
        return self.tvix_mount(url, tuple(extra), name="remote-mnt")

    def daemon(self) -> Daemon:
        assert self.main_store is not None
        return Daemon(self.ts, f"local://{self.main_store}", self.tmp / "logs" / f"daemon-{self._n}.log")

    def row_remote_cold(self) -> None:
        d = self.data
        local = self.local_cold()
        m = Measurement("tvix remote mount", amount=d.big_size, note="fresh daemon and empty --cache-dir each run")
        if not self.cold_ok:
            m.note += "; NOT cold: cannot drop caches"

        def go() -> None:
            for i in range(self.runs):
                dmn = self.daemon()
                try:
                    with self.remote_mount(dmn.url) as mnt:
                        f = self.store_file(mnt.mnt, "big")
                        self.cold()
                        log(f"remote mount big cold dd ({i + 1}/{self.runs})")
                        m.times.append(timed(["dd", f"if={f}", "of=/dev/null", "bs=1M", "status=none"], timeout=600))
                        if i == self.runs - 1:
                            if not files_equal(f, d.big):
                                raise BenchError("WRONG DATA: big on the remote mount differs from the original")
                            m.note += "; content verified (cmp)"
                finally:
                    dmn.stop()

        self.guard(m, go)
        refs: list[tuple[Measurement, float | None]] = [(local, 0.5)]
        label = "casync mount over HTTP"
        if (why := self.peer("casync")) is not None:
            refs.append((self.skipped(label, why), 5.0))
        else:
            prefix = min(d.big_size, 128 * MiB)  # casync over HTTP crawls (~25 MB/s): its rate from a prefix
            cas = Measurement(
                label, amount=prefix, note=f"python3 -m http.server on 127.0.0.1; first {prefix // MiB} MiB of big"
            )

            def cas_go() -> None:
                self.ensure_casync("big")
                srv, port = self.http_server(self.casync["big"])
                try:
                    for i in range(self.runs):
                        with self.casync_mount("big", store=f"http://127.0.0.1:{port}/store") as mnt:
                            self.cold()
                            log(f"casync http mount big cold dd ({i + 1}/{self.runs})")
                            f = mnt.mnt / "big"
                            dd = ["dd", f"if={f}", "of=/dev/null", "bs=1M", f"count={prefix // MiB}", "status=none"]
                            cas.times.append(timed(dd, timeout=600))
                finally:
                    stop_process(srv)

            self.guard(cas, cas_go)
            refs.append((cas, 5.0))
        self.report("remote mount big cold seq", m, refs)

    def http_server(self, directory: Path) -> tuple[subprocess.Popen[bytes], int]:
        logf = self.tmp / "logs" / "http.log"
        with open(logf, "ab") as lf:
            srv = subprocess.Popen(
                [sys.executable, "-u", "-m", "http.server", "-b", "127.0.0.1", "--directory", str(directory), "0"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=lf,
                start_new_session=True,
            )
        CLEANUP.add("stop http.server", lambda: stop_process(srv))
        assert srv.stdout is not None
        lines: queue.Queue[bytes] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in srv.stdout or []], daemon=True).start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.2).decode(errors="replace")
            except queue.Empty:
                if srv.poll() is not None:
                    break
                continue
            if mt := re.search(r"port (\d+)", line):
                return srv, int(mt.group(1))
        stop_process(srv)
        raise BenchError(f"http.server did not start: {tail(logf)}")

    @staticmethod
    def counters(mnt: Path) -> dict[str, int]:
        out: dict[str, int] = {}
        try:
            names = os.listxattr(mnt)
        except OSError:
            return out
        for n in names:
            if n.startswith("user.tvix.stats."):
                with contextlib.suppress(OSError, ValueError):
                    out[n.removeprefix("user.tvix.stats.")] = int(os.getxattr(mnt, n).decode().strip())
        return out

    def row_wire(self) -> None:
        d = self.data
        rng = random.Random(99)
        ratios: list[float] = []
        notes: list[str] = []
        row = Row("remote mount 1 MiB read at random offset: wire bytes / bytes read", goal="≤ 2.0")
        m = Measurement("wire")

        def go() -> None:
            dmn = self.daemon()
            proxy = CountingProxy((dmn.host, dmn.port))
            try:
                for i in range(self.runs):
                    off = rng.randrange(0, d.big_size - MiB)
                    proxy.reset()
                    with self.remote_mount(proxy.url) as mnt:
                        f = self.store_file(mnt.mnt, "big")
                        size = os.stat(f).st_size  # the look-ups and the chunk list are not the read
                        if size != d.big_size:
                            raise BenchError(f"size on the mount {size} != {d.big_size}")
                        before_all = proxy.wait_quiet()
                        c0 = self.counters(mnt.mnt)
                        proxy_mark = proxy.total()
                        log(f"remote 1 MiB read at {off} ({i + 1}/{self.runs})")
                        fd = os.open(f, os.O_RDONLY)
                        try:
                            data = os.pread(fd, MiB, off)
                        finally:
                            os.close(fd)
                        with open(d.big, "rb") as orig:
                            orig.seek(off)
                            if data != orig.read(MiB):
                                raise BenchError("WRONG DATA: 1 MiB read differs from the original")
                        total = proxy.wait_quiet()
                        wire = total - proxy_mark
                        ratios.append(wire / MiB)
                        c1 = self.counters(mnt.mnt)
                        note = f"wire {wire} B (+{before_all} B for mount/lookup/stat)"
                        if "bytes_fetched" in c1:
                            note += f", mount counter bytes_fetched +{c1['bytes_fetched'] - c0.get('bytes_fetched', 0)}"
                        notes.append(note)
            finally:
                proxy.close()
                dmn.stop()

        self.guard(m, go)
        if m.error is not None:
            row.note = f"FAILED: {m.error}"
        else:
            r = statistics.median(ratios)
            row.ratio = f"{r:.2f} (median of {len(ratios)})"
            row.met = "yes" if r <= 2.0 else "no"
            row.note = "; ".join(notes) + "; payload bytes through a counting TCP proxy"
        self.emit(row)

    def row_ttfb(self) -> None:
        d = self.data
        rel = d.tree_files[len(d.tree_files) // 2]
        m = Measurement("tvix remote mount", note=f"open+read 1 byte of <tree>/{rel}, fresh mount, empty cache")

        def go() -> None:
            dmn = self.daemon()
            try:
                for i in range(self.runs):
                    with self.remote_mount(dmn.url) as mnt:
                        f = self.store_file(mnt.mnt, "tree") / rel
                        log(f"time to first byte ({i + 1}/{self.runs})")
                        t0 = time.perf_counter()
                        with open(f, "rb") as fh:
                            b = fh.read(1)
                        m.times.append(time.perf_counter() - t0)
                        if b != (d.tree / rel).read_bytes()[:1]:
                            raise BenchError("WRONG DATA: first byte differs")
            finally:
                dmn.stop()

        self.guard(m, go)
        row = self._row("remote mount time to first byte (empty cache)", m, note=m.note)
        if m.median is not None:
            row.rate = f"{m.median * 1000:.1f} ms"
        self.emit(row)

    def row_offline(self) -> None:
        d = self.data
        part = min(d.big_size, 32 * MiB if not self.args.quick else 16 * MiB)
        row = Row("remote mount, 2nd mount on persistent cache, remote stopped", goal="reads ok, 0 B on wire")
        m = Measurement("offline")
        info: dict[str, str] = {}

        def read_all(root: Path, big: Path) -> str | None:
            """Read the whole tree and the first `part` bytes of big; None if all equal the originals."""
            diff = compare_trees(d.tree, root)
            if diff is not None:
                return diff
            with open(big, "rb") as a, open(d.big, "rb") as b:
                left = part
                while left:
                    n = min(left, MiB)
                    if a.read(n) != b.read(n):
                        return "big: content differs"
                    left -= n
            return None

        def go() -> None:
            cache = self.fresh("persistent-cache")
            dmn = self.daemon()
            proxy = CountingProxy((dmn.host, dmn.port))
            try:
                with self.remote_mount(proxy.url, cache=cache) as mnt:
                    log("offline: first mount fills the cache")
                    diff = read_all(self.store_file(mnt.mnt, "tree"), self.store_file(mnt.mnt, "big"))
                    if diff is not None:
                        raise BenchError(f"first mount: WRONG DATA: {diff}")
                    first = proxy.wait_quiet()  # let the mount's prefetches land in the cache before unmounting
                dmn.stop()
                proxy.reset()
                with self.remote_mount(proxy.url, cache=cache, timeout=3) as mnt:
                    log("offline: second mount with the remote stopped")
                    try:
                        diff = read_all(self.store_file(mnt.mnt, "tree"), self.store_file(mnt.mnt, "big"))
                    except OSError as e:
                        diff = f"{e.filename}: {e.strerror}"
                    wire = proxy.wait_quiet()
                    conns = proxy.connections
                info["diff"] = diff or ""
                info["wire"] = str(wire)
                info["note"] = (
                    f"reads {'ok' if diff is None else 'FAILED: ' + diff}; {wire} B on the wire, {conns} connection "
                    f"attempts (first mount: {first} B); read: whole tree + first {part // MiB} MiB of big"
                )
            finally:
                proxy.close()
                dmn.stop()

        self.guard(m, go)
        if m.error is not None:
            row.note = f"FAILED: {m.error}"
        else:
            row.met = "yes" if not info["diff"] and info["wire"] == "0" else "no"
            row.note = info["note"]
        self.emit(row)


# --- main -----------------------------------------------------------------------------------


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


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/bench", description="Side-by-side benchmark (BENCH.md).")
    p.add_argument("--quick", action="store_true", help="reduced set: big 128 MiB, tree 1,000 files, fewer peers")
    p.add_argument(
        "--rows", default=",".join(ROW_GROUPS), help=f"comma-separated subset of {','.join(ROW_GROUPS)} (default: all)"
    )
    p.add_argument("--runs", type=int, default=3, help="runs per measurement, the median is reported (default 3)")
    p.add_argument("--output", metavar="FILE", help="also write the final table to FILE")
    p.add_argument("--big-mib", type=int, help="size of big in MiB (default 512, --quick 128)")
    p.add_argument("--tree-files", type=int, help="files in tree (default 5000, --quick 1000)")
    p.add_argument("--skip-peers", default="", help="comma-separated peers not to run: casync,borg,nix-store")
    p.add_argument("--no-install", action="store_true", help="never apt-get install missing peers")
    p.add_argument("--tmpdir", help="where to put the temp dir (default: $TMPDIR or /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the temp data (mounts and processes are still ended)")
    a = p.parse_args(argv)
    a.rows = [r.strip() for r in a.rows.split(",") if r.strip()]
    bad = [r for r in a.rows if r not in ROW_GROUPS]
    if bad or not a.rows:
        p.error(f"--rows: unknown {','.join(bad) or '(empty)'}; choose from {','.join(ROW_GROUPS)}")
    if a.runs < 1:
        p.error("--runs must be >= 1")
    a.skip_peers = {s.strip() for s in a.skip_peers.split(",") if s.strip()}
    if a.quick:
        a.skip_peers.add("casync")
    return a


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    big_mib = args.big_mib or (128 if args.quick else 512)
    n_files = args.tree_files or (1000 if args.quick else 5000)
    n_dirs = 20 if n_files <= 1000 else 100
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, _on_signal)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started in the background
    tmp = Path(tempfile.mkdtemp(prefix="tvix-bench-", dir=args.tmpdir)).resolve()
    atexit.register(lambda: finish(tmp, args.keep))
    started = time.monotonic()
    bench = Bench(args, tmp)
    try:
        (tmp / "logs").mkdir()
        bench.ensure_peers()
        if args.runs < 3:
            log(f"warning: --runs {args.runs} < 3: medians are not what BENCH.md asks for")
        if not bench.cold_ok:
            log("warning: cannot write /proc/sys/vm/drop_caches (not root): 'cold' rows are not cold")
        log(f"generating data in {tmp}: big {big_mib} MiB, tree {n_files} files in ~{n_dirs} directories")
        bench.data = make_data(tmp / "data", big_mib * MiB, n_files, n_dirs, seed=20240601)
        for group in ROW_GROUPS:
            if group not in args.rows:
                continue
            try:
                getattr(bench, f"rows_{group}")()
            except BenchError as e:  # a setup step of the whole group failed
                bench.emit(Row(f"{group} rows", note=f"FAILED: {e}"))
    except KeyboardInterrupt:
        log("interrupted: cleaning up")
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        finish(tmp, args.keep)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        finish(tmp, args.keep)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    elapsed = time.monotonic() - started
    mode = "quick" if args.quick else "full"
    header = (
        f"scripts/bench ({mode}): big {big_mib} MiB, tree {n_files} files ({bench.data.tree_bytes / MiB:.1f} MiB), "
        f"{args.runs} runs per row, medians; ratio = subject rate / reference rate (> 1: faster); "
        f"{time.strftime('%Y-%m-%d %H:%M')}, {elapsed:.0f} s"
    )
    table = format_table(bench.rows)
    say("\n" + header + "\n" + table)
    if args.output:
        Path(args.output).write_text(header + "\n" + table + "\n")
    return 0


_finished: set[Path] = set()


def finish(tmp: Path, keep: bool) -> None:
    if tmp in _finished:
        return
    _finished.add(tmp)
    CLEANUP.run_all()
    sweep(tmp)
    still = []
    with contextlib.suppress(OSError), open("/proc/self/mounts") as f:
        still = [ln.split()[1] for ln in f if ln.split()[1].startswith(str(tmp) + "/")]
    if still:
        log(f"NOT removing {tmp}: still mounted: {' '.join(still)}")
    elif keep:
        log(f"kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
