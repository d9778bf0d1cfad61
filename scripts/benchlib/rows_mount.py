"""Row group `mount`: the tvix mount over a local store beside the original data, borg mount and
casync mount (local stores), all runs interleaved.

Rows: big warm sequential (second `dd`), big cold sequential (fresh mount, caches dropped),
tree `find | xargs cat` cold and warm, 1,000 random 4 KiB reads of big (bytes compared). Peer
mounts keep their own read-ahead settings; the tvix mount raises its BDI read_ahead_kb itself.

Not the remote mount (`rows_remote`, `rows_latency`).
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from .peers import borg_mount, casync_mount, ensure_borg, ensure_casync, in_borg
from .procs import Mount
from .reads import DD_CHECK, TREE_CHECK, check_big, dd_read, tree_read
from .results import Measurement
from .runner import Bench, Subject, interleave
from .util import BenchError, run, timed

DD = ["of=/dev/null", "bs=1M", "status=none"]
Ctx = Callable[[], contextlib.AbstractContextManager[Path]]


def rows_mount(b: Bench) -> None:
    b.ensure_main_store()
    row_big_warm(b)
    row_big_cold(b)
    rows_tree(b)
    row_random(b)


def row_big_warm(b: Bench) -> None:
    d = b.data
    ref = Measurement("dd of the original (page cache)", amount=d.big_size)
    m = Measurement("tvix mount, dd (second read)", amount=d.big_size)

    def ref_once(_v: object, i: int, cap: float) -> float:
        return timed(["dd", f"if={d.big}", *DD], cap=cap)[0]

    @contextlib.contextmanager
    def mounted() -> Iterator[Path]:
        with b.local_mount() as mnt:
            f = b.store_file(mnt.mnt, "big")
            run(["dd", f"if={f}", *DD])  # the first read
            yield f

    def once(f: Path, i: int, cap: float) -> float:
        t = timed(["dd", f"if={f}", *DD], cap=cap)[0]
        if i == 0:
            check_big(d, f)
            m.check(DD_CHECK)
        return t

    interleave(
        b,
        "mount big warm",
        [Subject(ref, ref_once, setup=lambda: run(["dd", f"if={d.big}", *DD])), Subject(m, once, session=mounted)],
    )
    b.report.report("mount big warm seq", m, [(ref, 0.8)])


def cold_dd_subject(b: Bench, label: str, mount: Callable[[], Mount], path: Callable[[Path], Path]) -> Subject:
    """`dd` of big on a fresh mount after dropping caches, checked after each run."""
    m = Measurement(label, amount=b.data.big_size)

    def once(_v: object, i: int, cap: float) -> float:
        with mount() as mnt:
            f = path(mnt.mnt)
            os.stat(f)
            b.cold()
            t = dd_read(b.data, f, cap)
            m.check(DD_CHECK)
            return t

    return Subject(m, once)


def row_big_cold(b: Bench) -> None:
    d = b.data
    subjects = []
    if (why := b.peer("borg")) is None:
        s = cold_dd_subject(b, "borg mount", lambda: borg_mount(b), lambda mnt: in_borg(mnt, d.big))
        s.setup = lambda: ensure_borg(b)
        subjects.append(s)
        borg = s.m
    else:
        borg = b.skipped("borg mount", why)
    if (why := b.peer("casync")) is None:
        s = cold_dd_subject(b, "casync mount", lambda: casync_mount(b, "big"), lambda mnt: mnt / "big")
        s.setup = lambda: ensure_casync(b, "big")
        subjects.append(s)
        cas = s.m
    else:
        cas = b.skipped("casync mount", why)
    tv = cold_dd_subject(b, "tvix mount (local store)", b.local_mount, lambda mnt: b.store_file(mnt, "big"))
    subjects.append(tv)
    interleave(b, "mount big cold", subjects)
    b.report.report(f"mount big {b.cold_word} seq", tv.m, [(borg, 1.5), (cas, 4.0)])


def rows_tree(b: Bench) -> None:
    d = b.data
    n = len(d.tree_files)

    @contextlib.contextmanager
    def tvix() -> Iterator[Path]:
        with b.local_mount() as mnt:
            yield b.store_file(mnt.mnt, "tree")

    @contextlib.contextmanager
    def borg() -> Iterator[Path]:
        with borg_mount(b) as mnt:
            yield in_borg(mnt.mnt, d.tree)

    @contextlib.contextmanager
    def cas() -> Iterator[Path]:
        with casync_mount(b, "tree") as mnt:
            yield mnt.mnt

    @contextlib.contextmanager
    def original() -> Iterator[Path]:
        yield d.tree

    kinds: list[tuple[str, Ctx, str | None]] = [
        ("tvix mount", tvix, None),
        ("borg mount", borg, "borg"),
        ("casync mount", cas, "casync"),
        ("original tree", original, None),
    ]
    for temp in ("cold", "warm"):
        ms: dict[str, Measurement] = {}
        subjects = []
        for label, ctx, peer in kinds:
            m = Measurement(label, amount=n, unit="files/s")
            ms[label] = m
            if peer is not None and (why := b.peer(peer)) is not None:
                m.error, m.skipped = why, True
                continue
            setup = (lambda: ensure_borg(b)) if peer == "borg" else (lambda: ensure_casync(b, "tree")) if peer else None
            listfile = b.fresh("find-list")
            if temp == "cold":

                def once(
                    _v: object, i: int, cap: float, ctx: Ctx = ctx, m: Measurement = m, lf: Path = listfile
                ) -> float:
                    with ctx() as root:
                        b.cold()
                        t = tree_read(d, root, cap, lf)
                        m.check(TREE_CHECK)
                        return t

                subjects.append(Subject(m, once, setup=setup))
            else:

                @contextlib.contextmanager
                def warmed(ctx: Ctx = ctx, lf: Path = listfile) -> Iterator[Path]:
                    with ctx() as root:
                        tree_read(d, root, 600, lf)  # the first read
                        yield root

                def once_w(root: Path, i: int, cap: float, m: Measurement = m, lf: Path = listfile) -> float:
                    t = tree_read(d, root, cap, lf)
                    m.check(TREE_CHECK)
                    return t

                subjects.append(Subject(m, once_w, session=warmed, setup=setup))
        interleave(b, f"tree {temp}", subjects)
        word = b.cold_word if temp == "cold" else "warm"
        refs: list[tuple[Measurement, float | None]] = [
            (ms["borg mount"], 1.0),
            (ms["casync mount"], None),
            (ms["original tree"], None),
        ]
        b.report.report(f"mount tree find|xargs cat {word}", ms["tvix mount"], refs)


def row_random(b: Bench) -> None:
    d = b.data
    rng = random.Random(1234)
    n = 1000
    pages = d.big_size // 4096
    offsets = [rng.randrange(pages) * 4096 for _ in range(n)]
    want = [d.range_bytes(off, 4096) for off in offsets]

    def reads(path: Path) -> float:
        fd = os.open(path, os.O_RDONLY)
        got = []
        try:
            t0 = time.perf_counter()
            for off in offsets:
                got.append(os.pread(fd, 4096, off))
            t = time.perf_counter() - t0
        finally:
            os.close(fd)
        bad = [off for off, g, w in zip(offsets, got, want, strict=True) if g != w]
        if bad:
            raise BenchError(f"WRONG DATA: {len(bad)} of {n} reads differ from the original, e.g. at {bad[0]}")
        return t

    ref = Measurement("original file", amount=n, unit="reads/s", note=b.cold_word)
    m = Measurement("tvix mount", amount=n, unit="reads/s", note=f"{b.cold_word}, fresh mount each run")

    def ref_once(_v: object, i: int, cap: float) -> float:
        b.cold()
        return reads(d.big)

    def once(_v: object, i: int, cap: float) -> float:
        with b.local_mount() as mnt:
            f = b.store_file(mnt.mnt, "big")
            os.stat(f)
            b.cold()
            t = reads(f)
            m.check("every 4 KiB read = the original's bytes")
            return t

    interleave(b, "random reads", [Subject(ref, ref_once), Subject(m, once)])
    b.report.report("mount big 4 KiB random reads x1000", m, [(ref, None)])
