"""Row group `storage`: what the embedded store's layout costs (issue: packs and an index).

Rows: files in the store directory after importing big and tree (goal < 50); 100,000 tiny files
(a few bytes each, one directory) imported into a fresh store: disk use of the packs against the content
(goal ≤ 2×, the index reported beside) and bytes per object; `ls -l` of that 100,000-entry
directory on a fresh tvix mount (with and without extended attributes: `ls -l` asks each file
for two) beside a fresh `borg mount` of the same directory (goal ≥ 3×).

Checks: the listing (names and sizes) equals the original's; the tiny tree's NAR equals
`nix-store --dump` of it.
"""

from __future__ import annotations

import os
import random
import shutil
import sqlite3
import time
from pathlib import Path

from .peers import in_borg
from .results import Measurement, Row, row_of
from .runner import Bench, Subject, interleave
from .util import BenchError, log, run

TINY = 100_000


def rows_storage(b: Bench) -> None:
    row_store_files(b)
    tiny = _tiny_tree(b)
    store = row_tiny_disk(b, tiny)
    row_ls_l(b, tiny, store)


def row_store_files(b: Bench) -> None:
    b.ensure_main_store()
    assert b.main_store is not None
    files = [p for p in b.main_store.rglob("*") if p.is_file()]
    row = Row(
        name="store dir after importing big and tree: files",
        seconds="-",
        rate=f"{len(files)} files",
        ratio="-",
        goal="< 50 files",
        met="yes" if len(files) < 50 else "no",
        note=", ".join(sorted({p.relative_to(b.main_store).parts[0] for p in files})),
    )
    b.report.emit(row)


def _tiny_tree(b: Bench) -> Path:
    root = b.tmp / "tiny"
    if root.exists():
        return root
    log(f"generating {TINY:,} tiny files in one directory")
    rng = random.Random(5)
    root.mkdir(parents=True)
    for i in range(TINY):
        (root / f"f{i:06}").write_bytes(b"%d %d\n" % (i, rng.randrange(1 << 16)))
    return root


def row_tiny_disk(b: Bench, tiny: Path) -> Path:
    content = sum(p.stat().st_size for p in tiny.rglob("*") if p.is_file())
    store = b.tmp / "tiny-store"
    m = Measurement(f"tvix-store import of {TINY:,} tiny files", amount=TINY, unit="files/s")

    def once(_v: object, i: int, cap: float) -> float:
        shutil.rmtree(store, ignore_errors=True)
        os.sync()
        t0 = time.perf_counter()
        out = run([*b.ts, "import", "--store", f"local://{store}", str(tiny)], cap=cap)
        t = time.perf_counter() - t0
        b.paths["tiny"] = out.stdout.decode().strip()
        return t

    interleave(b, "tiny files", [Subject(m, once, cap=600, budget=600)])
    b.report.emit(row_of(m.label, m))
    if m.error is not None:
        return store
    packs = sum(p.stat().st_size for p in (store / "packs").glob("*.pack"))
    index = sum(p.stat().st_size for p in store.glob("index.sqlite*"))
    db = sqlite3.connect(f"file:{store / 'index.sqlite'}?mode=ro", uri=True)
    try:  # live bytes by kind (0 chunks, 1 chunk lists, 2 Directories, 3 path infos; +1000: text names)
        by_kind = {k % 1000: v for k, v in db.execute("SELECT kind, SUM(size) FROM objects GROUP BY kind")}
    finally:
        db.close()
    chunks, dirs = by_kind.get(0, 0), by_kind.get(2, 0)
    unique = len({p.read_bytes() for p in tiny.rglob("*") if p.is_file()})
    objects = unique + 2  # distinct contents (one chunk each), the Directory, the path info
    b.report.emit(
        Row(
            name=f"store disk use for {TINY:,} tiny files ({content:,} B of content, {unique:,} distinct)",
            seconds="-",
            rate=f"{packs:,} B packs",
            ratio=f"{packs / content:.2f}× content",
            goal="≤ 2× content (+ index)",
            met="yes" if packs <= 2 * content else "no",
            note=f"packs: {chunks:,} B file contents (no per-object overhead), {dirs:,} B Directories "
            f"(castore: a 32-byte BLAKE3 digest per entry), {packs - sum(by_kind.values()):,} B dead; "
            f"index {index:,} B ({index / objects:.0f} B per object)",
        )
    )
    return store


def row_ls_l(b: Bench, tiny: Path, store: Path) -> None:
    name = f"ls -l of a {TINY:,}-entry directory cold"
    want = sorted((p.relative_to(tiny).as_posix(), p.stat().st_size) for p in tiny.rglob("*") if p.is_file())
    tv = Measurement("tvix mount", amount=TINY, unit="files/s")
    borg = Measurement("borg mount", amount=TINY, unit="files/s")

    def ls(root: Path, cap: float) -> float:
        t0 = time.perf_counter()
        out = run(["ls", "-l", "--time-style=+", str(root)], cap=cap)
        t = time.perf_counter() - t0
        got = _listing(out.stdout.decode())
        if got != want:
            raise BenchError(f"WRONG LISTING: {len(got)} entries, the original has {len(want)}")
        return t

    nx = Measurement("tvix mount --no-xattrs", amount=TINY, unit="files/s")

    def tv_once(m: Measurement, extra: tuple[str, ...], cap: float) -> float:
        with b.tvix_mount(f"local://{store}", extra, name="tiny-mnt") as mnt:
            b.cold()
            t = ls(mnt.mnt / "store" / Path(b.paths["tiny"]).name, cap)
            m.check("listing (names, sizes) = the original's")
            return t

    subjects = [
        Subject(tv, lambda _v, i, cap: tv_once(tv, (), cap), cap=300),
        Subject(nx, lambda _v, i, cap: tv_once(nx, ("--no-xattrs",), cap), cap=300),
    ]
    if (why := b.peer("borg")) is not None:
        borg.error, borg.skipped = why, True
    else:
        repo = b.tmp / "borg-tiny"

        def setup() -> None:
            run(["borg", "init", "-e", "none", str(repo)], env=b.env, timeout=120)
            run(["borg", "create", f"{repo}::a", str(tiny)], env=b.env, timeout=1200)

        def borg_once(_v: object, i: int, cap: float) -> float:
            mnt = b.fresh("borg-tiny-mnt")
            with b.peer_mount("borg mount", ["borg", "mount", "-f", f"{repo}::a", str(mnt)], mnt) as m:
                b.cold()
                t = ls(in_borg(m.mnt, tiny), cap)
                borg.check("listing (names, sizes) = the original's")
                return t

        subjects.append(Subject(borg, borg_once, setup=setup, cap=300))
    interleave(b, name, subjects)
    b.report.report(name, tv, [(borg, 3.0)])
    b.report.report(name, nx, [(borg, 3.0)])


def _listing(text: str) -> list[tuple[str, int]]:
    """(name, size) of every regular file in `ls -l --time-style=+` output."""
    out = []
    for line in text.splitlines():
        if line.startswith("-"):
            parts = line.split(None, 5)
            out.append((parts[5].strip(), int(parts[4])))
    return sorted(out)
