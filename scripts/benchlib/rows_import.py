"""Row group `import`: `tvix-store import` of big and of tree into a fresh store, beside
`nix-store --add` and `casync make` (interleaved), and the re-import of an unchanged tree.

Checks: the store path equals nix-store's, and the NAR that the store then serves
(`tvix-store nar`) hashes like `nix-store --dump` of the original; casync's index digests like
the original (`casync digest`); the re-import prints the same path and writes nothing new.

Not the import over gRPC: that is in `rows_latency` (through the delaying proxy).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from .data import b3_of_command, snapshot
from .peers import casync_make, nix_add
from .results import Measurement, row_of
from .runner import Bench, Subject, interleave
from .util import BenchError, run


def rows_import(b: Bench) -> None:
    d = b.data
    for which, src, amount, unit in (
        ("big", d.big, d.big_size, "MB/s"),
        ("tree", d.tree, len(d.tree_files), "files/s"),
    ):
        name = f"import {which} (fresh store)"
        nix = Measurement("nix-store --add", amount=amount, unit=unit)
        tv = Measurement("tvix-store import", amount=amount, unit=unit)
        cs = Measurement(
            "casync make", amount=amount, unit=unit, note="caidx of " + ("bigdir/" if which == "big" else "tree/")
        )
        paths: dict[str, str] = {}
        subjects = []
        if (why := b.peer("nix-store")) is not None:
            nix.error, nix.skipped = why, True
        else:
            subjects.append(Subject(nix, lambda _v, i, cap, s=src, ps=paths: _nix_once(ps, s)))
        subjects.append(
            Subject(tv, lambda _v, i, cap, s=src, w=which, m=tv, ps=paths: _tvix_once(b, m, ps, s, w, i, cap))
        )
        if (why := b.peer("casync")) is not None:
            cs.error, cs.skipped = why, True
        else:
            subjects.append(Subject(cs, lambda _v, i, cap, w=which, m=cs: _casync_once(b, m, w, i, cap)))
        interleave(b, name, subjects)
        if "nix" in paths:
            nix.note = paths["nix"]
            nix.check("its store path = tvix-store's")
        b.report.report(name, tv, [(nix, 1.0), (cs, None)])
        if which == "tree":
            b.memo["import-tree"] = tv
    row_reimport(b)


def _nix_once(paths: dict[str, str], src: Path) -> float:
    t, path = nix_add(src)
    paths["nix"] = path
    return t


def _tvix_once(b: Bench, m: Measurement, paths: dict[str, str], src: Path, which: str, i: int, cap: float) -> float:
    store = b.fresh("import-store")
    os.sync()
    try:
        t0 = time.perf_counter()
        out = run([*b.ts, "import", "--store", f"local://{store}", str(src)], cap=cap)
        t = time.perf_counter() - t0
        path = out.stdout.decode().strip()
        if "nix" in paths and path != paths["nix"]:
            raise BenchError(f"WRONG PATH: {path}, nix-store --add gives {paths['nix']}")
        if i == 0:
            check_nar(b, m, f"local://{store}", path, which)
    finally:
        shutil.rmtree(store, ignore_errors=True)
    return t


def check_nar(b: Bench, m: Measurement, url: str, path: str, which: str) -> None:
    """The NAR the store serves for `path` must hash like `nix-store --dump` of the original (run 1 only)."""
    want = b.data.nar_b3(which, b.peer("nix-store") is None)
    if want is None:
        m.check("store path only (no nix-store for the NAR)")
        return
    got = b3_of_command([*b.ts, "nar", "--store", url, path])
    if got != want:
        raise BenchError(f"WRONG DATA: NAR of {path} hashes {got[:16]}…, nix-store --dump gives {want[:16]}…")
    m.check("NAR served = nix-store --dump of the original (run 1)")


def _casync_once(b: Bench, m: Measurement, which: str, i: int, cap: float) -> float:
    t = casync_make(b, which, cap)
    if i == 0:
        src = b.data.bigdir if which == "big" else b.data.tree
        s = b.casync[which]
        got = run(["casync", "digest", f"--store={s / 'store'}", str(s / "x.caidx")]).stdout.split()
        want = run(["casync", "digest", str(src)]).stdout.split()
        if got != want:
            raise BenchError("WRONG DATA: casync digest of the index differs from the original's")
        m.check("casync digest of the index = the original's (run 1)")
    return t


def row_reimport(b: Bench) -> None:
    name = "re-import unchanged tree"
    m = Measurement("tvix-store import (again)", amount=len(b.data.tree_files), unit="files/s")
    first = b.memo.get("import-tree")
    seen: dict[str, Any] = {"new": set(), "changed": set(), "delta": 0}

    def once(_v: object, i: int, cap: float) -> float:
        assert b.main_store is not None
        before = snapshot(b.main_store)
        os.sync()
        t0 = time.perf_counter()
        out = run([*b.ts, "import", "--store", f"local://{b.main_store}", str(b.data.tree)], cap=cap)
        t = time.perf_counter() - t0
        after = snapshot(b.main_store)
        if out.stdout.decode().strip() != b.paths["tree"]:
            raise BenchError(f"re-import printed {out.stdout.decode().strip()}, first import {b.paths['tree']}")
        seen["new"] |= set(after) - set(before)
        seen["changed"] |= {k for k in before if k in after and after[k] != before[k]}
        seen["delta"] += sum(v[0] for v in after.values()) - sum(v[0] for v in before.values())
        m.check("same store path as the first import")
        return t

    b.guard(m, b.ensure_main_store)
    if m.error is None:
        interleave(b, name, [Subject(m, once)])
    row = row_of(f"{name}: {m.label}", m, goal="report; nothing new written")
    if m.error is None:
        new = sorted(seen["new"])
        row.met = "yes" if not new else "no"
        fm = first.median if isinstance(first, Measurement) else None
        s = m.median
        row.ratio = f"{fm / s:.2f}× first import" if fm and s else "-"
        row.note += (
            f"; new files in store dir: {len(new)}, changed: {len(seen['changed'])}, size delta: {seen['delta']} B"
            + (f" (e.g. {new[0]})" if new else "")
        )
    b.report.emit(row)
