"""Row group `remote`: the tvix mount of a `tvix-store daemon` over gRPC on loopback (no delay).

Rows: big cold sequential (fresh daemon, empty --cache-dir, caches dropped: every run) beside
the local mount and casync mount over HTTP (interleaved); wire bytes of a 1 MiB read at a random
offset (counted by tests/tcpproxy.py's TcpProxy, bytes compared); time to first byte (a fresh
daemon and mount for every run); a second mount on the persistent cache with the remote
stopped (reads checked, bytes on the wire counted at the proxy).

Not the delayed link: that is `rows_latency`.
"""

from __future__ import annotations

import contextlib
import os
import random
import statistics
from collections.abc import Iterator
from pathlib import Path

from .data import compare_trees
from .peers import casync_mount, ensure_casync
from .procs import HttpServer, Proxy
from .reads import DD_CHECK, dd_read, first_byte
from .results import Measurement, Row, row_of
from .runner import Bench, Subject, interleave
from .util import BenchError, MiB, log


def rows_remote(b: Bench) -> None:
    b.ensure_main_store()
    row_remote_cold(b)
    row_wire(b)
    row_ttfb(b)
    row_offline(b)


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


def row_remote_cold(b: Bench) -> None:
    d = b.data
    m = Measurement("tvix remote mount", amount=d.big_size, note="fresh daemon and empty --cache-dir each run")
    local = Measurement("tvix mount (local store)", amount=d.big_size)

    def once(_v: object, i: int, cap: float) -> float:
        with b.daemon() as dmn, b.remote_mount(dmn.url) as mnt:
            f = b.store_file(mnt.mnt, "big")
            os.stat(f)
            b.cold()
            t = dd_read(d, f, cap)
            m.check(DD_CHECK)
            return t

    def local_once(_v: object, i: int, cap: float) -> float:
        with b.local_mount() as mnt:
            f = b.store_file(mnt.mnt, "big")
            os.stat(f)
            b.cold()
            t = dd_read(d, f, cap)
            local.check(DD_CHECK)
            return t

    subjects = [Subject(m, once), Subject(local, local_once)]
    label = "casync mount over HTTP"
    prefix = min(d.big_size, 128 * MiB)  # casync over HTTP crawls: its rate from a prefix
    if (why := b.peer("casync")) is not None:
        cas = b.skipped(label, why)
    else:
        cas = Measurement(label, amount=prefix, note=f"python3 -m http.server; first {prefix // MiB} MiB of big")

        @contextlib.contextmanager
        def served() -> Iterator[int]:
            with HttpServer(b.casync["big"], b.logfile("http")) as srv:
                yield srv.port

        def cas_once(port: int, i: int, cap: float) -> float:
            with casync_mount(b, "big", store=f"http://127.0.0.1:{port}/store") as mnt:
                b.cold()
                t = dd_read(d, mnt.mnt / "big", cap, prefix=prefix)
                cas.check("b3sum of the prefix on the same mount right after")
                return t

        subjects.append(Subject(cas, cas_once, session=served, setup=lambda: ensure_casync(b, "big")))
    interleave(b, "remote big cold", subjects)
    b.report.report(f"remote mount big {b.cold_word} seq", m, [(local, 0.5), (cas, 5.0)])


def row_wire(b: Bench) -> None:
    d = b.data
    rng = random.Random(99)
    ratios: list[float] = []
    notes: list[str] = []
    row = Row("remote mount 1 MiB read at random offset: wire bytes / bytes read", goal="≤ 2.0")
    m = Measurement("wire")

    def go() -> None:
        with b.daemon() as dmn, Proxy(dmn.port) as proxy:
            for i in range(b.runs):
                off = rng.randrange(0, d.big_size - MiB)
                with b.remote_mount(proxy.url) as mnt:
                    f = b.store_file(mnt.mnt, "big")
                    size = os.stat(f).st_size  # the look-ups and the chunk list are not the read
                    if size != d.big_size:
                        raise BenchError(f"size on the mount {size} != {d.big_size}")
                    before_all = proxy.wait_quiet()
                    c0 = counters(mnt.mnt)
                    mark, calls0 = proxy.total, proxy.grpc_calls
                    log(f"remote 1 MiB read at {off} ({i + 1}/{b.runs})")
                    fd = os.open(f, os.O_RDONLY)
                    try:
                        data = os.pread(fd, MiB, off)
                    finally:
                        os.close(fd)
                    if data != d.range_bytes(off, MiB):
                        raise BenchError("WRONG DATA: 1 MiB read differs from the original")
                    wire = proxy.wait_quiet() - mark
                    ratios.append(wire / MiB)
                    c1 = counters(mnt.mnt)
                    note = f"wire {wire} B in {proxy.grpc_calls - calls0} gRPC calls (+{before_all} B for mount/stat)"
                    if "bytes_fetched" in c1:
                        note += f", mount counter bytes_fetched +{c1['bytes_fetched'] - c0.get('bytes_fetched', 0)}"
                    notes.append(note)

    b.guard(m, go)
    if m.error is not None:
        row.note = f"FAILED: {m.error}"
    else:
        r = statistics.median(ratios)
        row.ratio = f"{r:.2f} (median of {len(ratios)})"
        row.met = "yes" if r <= 2.0 else "no"
        row.note = "verified: the 1 MiB = the original's bytes; " + "; ".join(notes)
        row.note += "; counted at a TCP proxy (tests/tcpproxy.py)"
    b.report.emit(row)


def row_ttfb(b: Bench) -> None:
    d = b.data
    rel = d.tree_files[len(d.tree_files) // 2]
    m = Measurement(
        "tvix remote mount", note=f"open+read 1 byte of <tree>/{rel}; fresh daemon, mount and cache each run"
    )

    def once(_v: object, i: int, cap: float) -> float:
        with b.daemon() as dmn, b.remote_mount(dmn.url) as mnt:
            b.cold()
            t = first_byte(d, b.store_file(mnt.mnt, "tree") / rel, rel)
            m.check("the byte = the original's")
            return t

    interleave(b, "time to first byte", [Subject(m, once)])
    row = row_of(f"remote mount time to first byte ({b.cold_word}, empty cache)", m)
    if m.median is not None:
        row.rate = f"{m.median * 1000:.1f} ms"
    b.report.emit(row)


def row_offline(b: Bench) -> None:
    d = b.data
    part = min(d.big_size, 32 * MiB if not b.quick else 16 * MiB)
    row = Row("remote mount, 2nd mount on persistent cache, remote stopped", goal="reads ok, 0 B on wire")
    m = Measurement("offline")
    info: dict[str, str] = {}

    def read_all(root: Path, big: Path) -> str | None:
        """Read the whole tree and the first `part` bytes of big; None if all equal the originals."""
        diff = compare_trees(d.tree, root)
        if diff is not None:
            return diff
        with open(big, "rb") as a, open(d.big, "rb") as o:
            left = part
            while left:
                n = min(left, MiB)
                if a.read(n) != o.read(n):
                    return "big: content differs"
                left -= n
        return None

    def go() -> None:
        cache = b.fresh("persistent-cache")
        dmn = b.daemon()
        with dmn, Proxy(dmn.port, drain_when_down=1.0) as proxy:
            with b.remote_mount(proxy.url, cache=cache) as mnt:
                log("offline: first mount fills the cache")
                diff = read_all(b.store_file(mnt.mnt, "tree"), b.store_file(mnt.mnt, "big"))
                if diff is not None:
                    raise BenchError(f"first mount: WRONG DATA: {diff}")
                first = proxy.wait_quiet()  # let the mount's prefetches land in the cache before unmounting
            dmn.stop()
            proxy.reset_counts()
            conns0 = proxy.connections
            with b.remote_mount(proxy.url, cache=cache, timeout=3) as mnt:
                log("offline: second mount with the remote stopped")
                try:
                    diff = read_all(b.store_file(mnt.mnt, "tree"), b.store_file(mnt.mnt, "big"))
                except OSError as e:
                    diff = f"{e.filename}: {e.strerror}"
                wire = proxy.wait_quiet()
                conns = proxy.connections - conns0
            info["diff"] = diff or ""
            info["wire"] = str(wire)
            info["note"] = (
                f"reads {'ok (= the originals)' if diff is None else 'FAILED: ' + diff}; {wire} B on the wire, "
                f"{conns} connection attempts (first mount: {first} B); "
                f"read: whole tree + first {part // MiB} MiB of big"
            )

    b.guard(m, go)
    if m.error is not None:
        row.note = f"FAILED: {m.error}"
    else:
        row.met = "yes" if not info["diff"] and info["wire"] == "0" else "no"
        row.note = info["note"]
    b.report.emit(row)
