"""Row group `gc`: `tvix-store gc` of a store where half the paths were removed (BENCH.md).

Data: `n` store paths (16; `--quick` 8), each a directory of files of its own random bytes
(small files and one multi-chunk file, about 12 MiB; `--quick` 6 MiB) plus content every path
shares (a 1 MiB file and a small one, identical in all). Each run: a fresh store, every path
imported (untimed), every other path removed with `path rm`, then `gc --grace 0s` timed.

Rows:
- seconds of gc per GiB scanned (the store's bytes as gc listed them);
- space reclaimed (disk use of the store directory before the removal minus after gc, in
  allocated blocks) as a fraction of the removed paths' unique bytes (the sizes of the files
  only they held; goal ≥ 0.9).

Checks: `verify` passes after gc, the kept paths are still listed and their NARs hash like
`nix-store --dump` of their directories (run 1, when nix-store is there), the removed ones
are gone. Not a measurement of import (`rows_import`).
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import time
from pathlib import Path

from .results import Measurement, Row, row_of
from .runner import Bench, Subject, interleave
from .util import BenchError, MiB, run

GiB = 1 << 30


def _make_paths(root: Path, n: int, unique: int, seed: int) -> tuple[list[Path], list[int]]:
    """n directories; returns them and each one's unique bytes."""
    rng = random.Random(seed)
    shared_big = rng.randbytes(MiB)
    dirs, sizes = [], []
    for i in range(n):
        d = root / f"gcpath{i:02}"
        (d / "sub").mkdir(parents=True)
        (d / "shared.bin").write_bytes(shared_big)
        (d / "sub" / "shared.txt").write_bytes(b"the same in every path\n")
        own = 0
        big = unique // 4
        (d / "big.bin").write_bytes(os.urandom(big))
        own += big
        k = 0
        while own < unique:
            size = min(rng.randint(1024, 64 * 1024), unique - own)
            (d / ("sub" if k % 3 else ".") / f"f{k:04}").write_bytes(os.urandom(size))
            own += size
            k += 1
        dirs.append(d)
        sizes.append(own)
    return dirs, sizes


def _disk_use(root: Path) -> int:
    total = 0
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            try:
                total += os.lstat(os.path.join(dirpath, n)).st_blocks * 512
            except FileNotFoundError:
                continue
    return total


_SCANNED = re.compile(r"of \d+ scanned \((\d+) bytes")


def rows_gc(b: Bench) -> None:
    n = 8 if b.quick else 16
    unique = (6 if b.quick else 12) * MiB
    data = b.tmp / "gc-data"
    dirs, sizes = _make_paths(data, n, unique, seed=20240611)
    removed_unique = sum(sizes[1::2])
    m = Measurement("tvix-store gc --grace 0s", unit="MB/s")
    seen: dict[str, list[float]] = {"fraction": [], "scanned": [], "per_gib": []}
    nix_ok = b.peer("nix-store") is None

    def once(_v: object, i: int, cap: float) -> float:
        store = b.fresh("gc-store")
        url = f"local://{store}"
        try:
            paths = run([*b.ts, "import", "--store", url, *map(str, dirs)], timeout=600).stdout.decode().split()
            if len(paths) != n:
                raise BenchError(f"import printed {len(paths)} paths, expected {n}")
            before = _disk_use(store)
            run([*b.ts, "path", "rm", "--store", url, *paths[1::2]])
            time.sleep(1.2)  # older than --grace 0s plus gc's one second of clock slack
            t0 = time.perf_counter()
            out = run([*b.ts, "gc", "--store", url, "--grace", "0s"], cap=cap).stdout.decode()
            t = time.perf_counter() - t0
            after = _disk_use(store)
            got = _SCANNED.search(out)
            if got is None:
                raise BenchError(f"gc printed no scanned size: {out[:200]!r}")
            scanned = int(got.group(1))
            seen["scanned"].append(scanned)
            seen["per_gib"].append(t / (scanned / GiB))
            seen["fraction"].append((before - after) / removed_unique)
            m.amount = scanned
            _check(b, m, url, paths, dirs, i == 0 and nix_ok)
        finally:
            shutil.rmtree(store, ignore_errors=True)
        return t

    interleave(b, "gc after removing half the paths", [Subject(m, once)])
    name = "gc after removing half the paths"
    row = row_of(f"{name}: {m.label}", m, goal="report s/GiB")
    if m.error is None and seen["per_gib"]:
        per_gib = sorted(seen["per_gib"])[len(seen["per_gib"]) // 2]
        row.ratio = f"{per_gib:.2f} s/GiB scanned"
        row.note += f"; scanned {seen['scanned'][0] / MiB:.0f} MiB, {n} paths, {n // 2} removed"
    b.report.emit(row)
    frow = Row(f"{name}: space reclaimed / removed paths' unique bytes", goal="≥ 0.9")
    if m.error is None and seen["fraction"]:
        f = sorted(seen["fraction"])[len(seen["fraction"]) // 2]
        frow.ratio = f"{f:.2f}"
        frow.met = "yes" if f >= 0.9 else "no"
        frow.note = (
            f"median of {len(seen['fraction'])} runs ({', '.join(f'{x:.2f}' for x in seen['fraction'])}); removed "
            f"paths' unique bytes {removed_unique / MiB:.0f} MiB; disk use of the store directory (blocks) "
            "before path rm minus after gc"
        )
    else:
        frow.note = f"FAILED: {m.error}"
    b.report.emit(frow)


def _check(b: Bench, m: Measurement, url: str, paths: list[str], dirs: list[Path], nar: bool) -> None:
    run([*b.ts, "verify", "--store", url])
    m.check("verify passes after gc")
    listed = run([*b.ts, "path", "list", "--store", url]).stdout.decode().split()
    if sorted(listed) != sorted(paths[0::2]):
        raise BenchError(f"after gc the store lists {len(listed)} paths, expected the {len(paths[0::2])} kept")
    m.check("kept paths listed, removed ones gone")
    if nar:
        for p, d in ((paths[0], dirs[0]), (paths[-2], dirs[-2])):
            got = hashlib.sha256(run([*b.ts, "nar", "--store", url, p]).stdout).hexdigest()
            want = hashlib.sha256(run(["nix-store", "--dump", str(d)]).stdout).hexdigest()
            if got != want:
                raise BenchError(f"WRONG DATA: NAR of kept path {p} differs from nix-store --dump after gc")
        m.check("NARs of kept paths = nix-store --dump (run 1)")
