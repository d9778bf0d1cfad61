"""Row group `latency`: the remote tvix mount and import through a link of 10 ms (and 50 ms) round trip.

The link is tests/tcpproxy.py's TcpProxy with a one-way delay (5 ms → 10 ms RTT), pipelined,
charging each new connection its handshake round trip. Every row interleaves, run by run:
the tvix remote mount at 10 ms (and 50 ms; --quick: 10 ms only), the same through the proxy at
0 ms, casync mount over HTTP and rclone mount over HTTP through the same 10 ms proxy, and the
tvix mount of the local store. Every run is cold: fresh daemon, proxy, mount and empty cache,
page cache dropped. Rows: tree `find | xargs cat`, `ls -lR` (+ gRPC calls), big `dd`, time to
first byte (ms, round trips, calls), `tvix-store import` of tree and big over gRPC beside a local
import, `tvix-store nar` of tree over gRPC beside the same from the local store. Slow runs stop
at the cap and count as lower bounds.

Not a network emulator: no loss, no jitter, no bandwidth cap (the proxy has one; BENCH.md asks
for none).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from .latency import Counted, Op, Where, casync_subject, label, local_subject, rclone_subject, tvix_subject
from .procs import Proxy
from .reads import DD_CHECK, LS_CHECK, TREE_CHECK, dd_read, first_byte, ls_read, tree_read
from .results import Measurement, Row
from .rows_import import check_nar
from .runner import Bench, Subject, interleave
from .util import BenchError, MiB, run

LINK = 0.005  # one-way: 10 ms round trip
SLOW = 0.025  # one-way: 50 ms round trip


def rows_latency(b: Bench) -> None:
    b.ensure_main_store()
    b.quick_skip.discard("casync")  # casync over HTTP is the tree's reference, cheap on the quick tree
    delays = [LINK] if b.quick else [LINK, SLOW]
    row_tree(b, delays)
    row_ls(b, delays)
    row_big(b, delays)
    row_ttfb(b, delays)
    row_import(b)
    row_nar(b)


def _subjects(
    b: Bench,
    delays: list[float],
    amount: float,
    unit: str,
    which: str,
    op: Op,
    check: str,
    quick_skip: tuple[str, ...] = (),
) -> tuple[list[Subject], dict[str, Counted]]:
    """tvix at 0 ms ("0") and at each delay, casync and rclone at 10 ms, the tvix mount of the local store
    ("local"): the subjects and their counters, by key. Those in `quick_skip` are left out of --quick
    (report-only references there), shown as skipped."""
    subjects: list[Subject] = []
    counted: dict[str, Counted] = {}
    pre = _stat if which == "big" else None  # the look-up of big is not part of its dd

    def where_tvix(mnt: Path) -> Path:
        return b.store_file(mnt, which)

    def add(key: str, m: Measurement, peer: str | None, make: Callable[[], tuple[Subject, Counted]]) -> None:
        why = "not in --quick" if b.quick and key in quick_skip else b.peer(peer) if peer else None
        if why is not None:
            m.error, m.skipped = why, True
            counted[key] = Counted(m)
            return
        m.checks.append(check)
        s, c = make()
        subjects.append(s)
        counted[key] = c

    for delay in [0.0, *delays]:
        m = Measurement(label("tvix remote mount", delay), amount=amount, unit=unit)
        add(
            "0" if delay == 0 else f"{delay}",
            m,
            None,
            lambda m=m, dl=delay: tvix_subject(b, dl, m, where_tvix, op, pre),
        )
    m = Measurement(label("casync mount over HTTP", LINK), amount=amount, unit=unit, note="python3 -m http.server")
    where_cas: Where = (lambda mnt: mnt / "big") if which == "big" else (lambda mnt: mnt)
    add("casync", m, "casync", lambda m=m: casync_subject(b, which, LINK, m, where_cas, op, pre))
    m = Measurement(label("rclone mount over HTTP", LINK), amount=amount, unit=unit, note="nginx")
    add("rclone", m, "rclone", lambda m=m: rclone_subject(b, LINK, m, lambda mnt: mnt / which, op, pre))
    m = Measurement("tvix mount (local store)", amount=amount, unit=unit)
    add("local", m, None, lambda m=m: (local_subject(b, m, where_tvix, op, pre), Counted(m)))
    return subjects, counted


def _stat(p: Path) -> None:
    os.stat(p)


def _finish(counted: dict[str, Counted]) -> None:
    for c in counted.values():
        c.note_requests()


def row_tree(b: Bench, delays: list[float]) -> None:
    d = b.data
    listfile = b.fresh("find-list")

    def op(root: Path, cap: float) -> float:
        return tree_read(d, root, cap, listfile)

    subjects, cs = _subjects(
        b, delays, len(d.tree_files), "files/s", "tree", op, TREE_CHECK, quick_skip=("0", "rclone")
    )
    interleave(b, "latency tree", subjects)
    _finish(cs)
    b.report.report(
        f"latency 10 ms: tree find|xargs cat {b.cold_word}",
        cs[f"{LINK}"].m,
        [(cs["casync"].m, 3.0), (cs["local"].m, 0.5), (cs["rclone"].m, None), (cs["0"].m, None)],
    )
    if SLOW in delays:
        b.report.report(f"latency 50 ms: tree find|xargs cat {b.cold_word}", cs[f"{SLOW}"].m, [(cs["0"].m, 0.25)])


def row_ls(b: Bench, delays: list[float]) -> None:
    d = b.data

    def op(root: Path, cap: float) -> float:
        return ls_read(d, root, cap, symlinks="rclone-mnt" not in str(root))

    quick_skip = ("0", "casync", "rclone", "local")  # report only
    subjects, cs = _subjects(b, delays, len(d.tree_files), "files/s", "tree", op, LS_CHECK, quick_skip)
    interleave(b, "latency ls -lR", subjects)
    _finish(cs)
    refs = [(cs[k].m, None) for k in ("casync", "rclone", "local", "0")]
    b.report.report(f"latency 10 ms: ls -lR {b.cold_word}", cs[f"{LINK}"].m, refs)
    for delay in [0.0, *delays]:
        c = cs["0" if delay == 0 else f"{delay}"]
        if c.m.error != "not in --quick":
            goal = 5 if delay == LINK else None
            b.report.emit(_calls_row(f"latency {2000 * delay:g} ms: ls -lR gRPC calls", c, goal))


def _calls_row(name: str, c: Counted, goal: int | None, unit: str = "calls") -> Row:
    """A row judged by the requests counted at the proxy, with the time in round trips beside it."""
    row = Row(name, goal=f"≤ {goal} {unit}" if goal is not None else "report")
    med, lower = c.m.bound()
    calls = c.median_requests()
    if c.m.error is not None:
        row.note = f"{'skipped' if c.m.skipped else 'FAILED'}: {c.m.error}"
        return row
    row.seconds = c.m.seconds()
    parts = []
    if calls is not None:
        parts.append(f"{calls:g} {c.kind}")
    if med is not None and c.rtt > 0:
        parts.append(f"{'> ' if lower else ''}{med / c.rtt:.1f} RTT of time")
    row.ratio = ", ".join(parts) or "-"
    if goal is not None and calls is not None:
        row.met = "yes" if calls <= goal else "no"
    elif goal is not None:
        row.met = "unknown" if lower else "-"
    row.note = f"{c.m.runs_note()}; {c.kind} per run: {', '.join(map(str, c.requests)) or '-'}"
    return row


def row_big(b: Bench, delays: list[float]) -> None:
    d = b.data
    prefix = min(d.big_size, (16 if b.quick else 32) * MiB)

    def op(f: Path, cap: float) -> float:
        if "casync-mnt" in str(f):  # casync fetches one chunk per round trip: its rate from a prefix
            return dd_read(d, f, cap, prefix=prefix)
        return dd_read(d, f, cap)

    subjects, cs = _subjects(b, delays, d.big_size, "MB/s", "big", op, DD_CHECK, quick_skip=("casync", "local"))
    cs["casync"].m.amount = prefix
    cs["casync"].m.note = f"python3 -m http.server; first {prefix // MiB} MiB of big"
    interleave(b, "latency big", subjects)
    _finish(cs)
    refs: list[tuple[Measurement, float | None]] = [(cs["rclone"].m, 1.0), (cs["0"].m, 0.8)]
    refs += [(cs["casync"].m, None), (cs["local"].m, None)]
    b.report.report(f"latency 10 ms: big dd {b.cold_word}", cs[f"{LINK}"].m, refs)
    if SLOW in delays:
        b.report.report(f"latency 50 ms: big dd {b.cold_word}", cs[f"{SLOW}"].m, [(cs["0"].m, None)])


def row_ttfb(b: Bench, delays: list[float]) -> None:
    d = b.data
    rel = d.tree_files[len(d.tree_files) // 2]

    def op(root: Path, cap: float) -> float:
        return first_byte(d, root / rel, rel)

    check = "the byte = the original's"
    subjects, cs = _subjects(b, delays, 1, "", "tree", op, check, quick_skip=("casync", "rclone"))
    subjects = [s for s in subjects if s.m is not cs["local"].m]  # the local mount is no first-byte reference
    interleave(b, "latency first byte", subjects)
    _finish(cs)
    for key, c in cs.items():
        if key == "local":
            continue
        goal = 4 if key == f"{LINK}" else None
        row = _calls_row(f"time to first byte ({b.cold_word}): {c.m.label}", c, None)
        med, lower = c.m.bound()
        if med is not None:
            row.rate = f"{'> ' if lower else ''}{med * 1000:.1f} ms"
        if goal is not None and med is not None:
            rt = med / c.rtt
            row.goal = f"≤ {goal} round trips"
            row.met = ("no" if rt > goal else "unknown") if lower else ("yes" if rt <= goal else "no")
        row.note += f"; open+read(1) of <tree>/{rel}, fresh daemon/mount/cache each run"
        b.report.emit(row)


def row_import(b: Bench) -> None:
    d = b.data
    for which, src, amount, unit in (
        ("tree", d.tree, len(d.tree_files), "files/s"),
        ("big", d.big, d.big_size, "MB/s"),
    ):
        want = b.paths[which]
        local = Measurement("tvix-store import (local store)", amount=amount, unit=unit)
        subjects = [Subject(local, lambda _v, i, cap, s=src, w=which, m=local: _local_import(b, m, s, w, i, cap))]
        counted: list[Counted] = []
        for delay in (LINK, 0.0):
            m = Measurement(label("tvix-store import over gRPC", delay), amount=amount, unit=unit)
            c = Counted(m, delay)
            counted.append(c)
            if b.quick and delay == 0:  # report only
                m.error, m.skipped = "not in --quick", True
                continue
            subjects.append(
                Subject(m, lambda _v, i, cap, s=src, w=which, c=c, p=want: _grpc_import(b, c, s, w, p, i, cap))
            )
        interleave(b, f"latency import {which}", subjects)
        for c in counted:
            c.note_requests()
        b.report.report(f"latency 10 ms: import {which} over gRPC", counted[0].m, [(local, 0.5), (counted[1].m, None)])


def _local_import(b: Bench, m: Measurement, src: Path, which: str, i: int, cap: float) -> float:
    store = b.fresh("import-store")
    try:
        os.sync()
        t0 = time.perf_counter()
        out = run([*b.ts, "import", "--store", f"local://{store}", str(src)], cap=cap)
        t = time.perf_counter() - t0
        if out.stdout.decode().strip() != b.paths[which]:
            raise BenchError(f"WRONG PATH: {out.stdout.decode().strip()}, expected {b.paths[which]}")
        if i == 0:
            check_nar(b, m, f"local://{store}", b.paths[which], which)
        return t
    finally:
        shutil.rmtree(store, ignore_errors=True)


def _grpc_import(b: Bench, c: Counted, src: Path, which: str, want: str, i: int, cap: float) -> float:
    """A fresh daemon over a fresh store, the import through the proxy at `c.delay`."""
    store = b.fresh("daemon-store")
    try:
        with b.daemon(store) as dmn, Proxy(dmn.port, delay=c.delay or 0.0) as px:
            os.sync()
            t0 = time.perf_counter()
            out = run([*b.ts, "import", "--store", px.url, str(src)], cap=cap)
            t = time.perf_counter() - t0
            c.requests.append(px.grpc_calls)
            if out.stdout.decode().strip() != want:
                raise BenchError(f"WRONG PATH: {out.stdout.decode().strip()}, expected {want}")
            if i == 0:
                check_nar(b, c.m, dmn.url, want, which)  # read back from the daemon directly
            return t
    finally:
        shutil.rmtree(store, ignore_errors=True)


def row_nar(b: Bench) -> None:
    """`tvix-store nar` of tree through the proxy at 10 ms and 0 ms (fresh daemon over the main
    store each run) beside `nar` of the local store; every output checked against nix-store --dump."""
    import hashlib

    d = b.data
    dump = run(["nix-store", "--dump", str(d.tree)]).stdout
    want, size, path = hashlib.sha256(dump).hexdigest(), len(dump), b.paths["tree"]

    def once(url: str | None, c: Counted | None, m: Measurement, cap: float) -> float:
        with contextlib.ExitStack() as stack:
            if url is None:
                assert c is not None
                dmn = stack.enter_context(b.daemon())
                px = stack.enter_context(Proxy(dmn.port, delay=c.delay or 0.0))
                url = px.url
            b.cold()
            t0 = time.perf_counter()
            out = run([*b.ts, "nar", "--store", url, path], cap=cap)
            t = time.perf_counter() - t0
            if c is not None:
                c.requests.append(px.grpc_calls)
        if hashlib.sha256(out.stdout).hexdigest() != want:
            raise BenchError("WRONG NAR: not nix-store --dump of the original")
        m.check("NAR = nix-store --dump of the original")
        return t

    local = Measurement("tvix-store nar (local store)", amount=size, unit="MB/s")
    subjects = [Subject(local, lambda _v, i, cap: once(f"local://{b.main_store}", None, local, cap))]
    counted: list[Counted] = []
    for delay in (LINK, 0.0):
        m = Measurement(label("tvix-store nar over gRPC", delay), amount=size, unit="MB/s")
        c = Counted(m, delay)
        counted.append(c)
        subjects.append(Subject(m, lambda _v, i, cap, c=c: once(None, c, c.m, cap)))
    interleave(b, "latency nar tree", subjects)
    for c in counted:
        c.note_requests()
    b.report.report("latency 10 ms: nar of tree over gRPC", counted[0].m, [(local, None), (counted[1].m, None)])
