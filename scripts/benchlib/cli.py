"""The command line of `scripts/bench`: arguments, the run of the selected row groups, the final table.

It generates the data under a temp dir, installs missing peers (root + apt only), runs the
groups in order (import, mount, remote, latency), prints every row as it is made and the whole
table at the end (also to `--output`), and always cleans up: every mount, process, proxy and
nix path it made is removed, also on Ctrl-C and SIGTERM. Time is bounded: each timed run has a
cap, each subject a budget per row, and the whole bench a deadline (see `runner`).

Not a test: it asserts nothing beyond the data being right (a failed or wrong read becomes
that row's reason, never a crash), and its numbers only mean something side by side.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import shutil
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from .data import make_data
from .peers import ensure_peers
from .results import Row, format_table
from .rows_gc import rows_gc
from .rows_import import rows_import
from .rows_latency import rows_latency
from .rows_mount import rows_mount
from .rows_narbridge import rows_narbridge
from .rows_remote import rows_remote
from .rows_scaleout import rows_scaleout
from .rows_storage import rows_storage
from .runner import Bench
from .util import CLEANUP, WARNINGS, BenchError, MiB, log, on_signal, say, sweep

GROUPS: dict[str, Callable[[Bench], None]] = {
    "import": rows_import,
    "mount": rows_mount,
    "remote": rows_remote,
    "latency": rows_latency,
    "gc": rows_gc,
    "storage": rows_storage,
    "narbridge": rows_narbridge,
    "scaleout": rows_scaleout,
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/bench", description="Side-by-side benchmark (BENCH.md).")
    p.add_argument(
        "--quick", action="store_true", help="reduced set: big 128 MiB, tree 1,000 files, latency 10 ms only"
    )
    p.add_argument(
        "--rows", default=",".join(GROUPS), help=f"comma-separated subset of {','.join(GROUPS)} (default: all)"
    )
    p.add_argument("--runs", type=int, default=3, help="runs per measurement, the median is reported (default 3)")
    p.add_argument("--output", metavar="FILE", help="also write the final table to FILE")
    p.add_argument("--big-mib", type=int, help="size of big in MiB (default 512, --quick 128)")
    p.add_argument("--tree-files", type=int, help="files in tree (default 5000, --quick 1000)")
    p.add_argument("--skip-peers", default="", help="comma-separated peers not to run: casync,borg,nix-store,rclone")
    p.add_argument("--no-install", action="store_true", help="never apt-get install missing peers")
    p.add_argument(
        "--cap", type=float, help="seconds a timed run may take before it is stopped (default 120, quick 40)"
    )
    p.add_argument("--budget", type=float, help="seconds of runs per subject and row (default 60, quick 12)")
    p.add_argument("--deadline", type=float, help="seconds the bench may run (default 1110, quick 160)")
    p.add_argument("--tmpdir", help="where to put the temp dir (default: $TMPDIR or /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the temp data (mounts and processes are still ended)")
    a = p.parse_args(argv)
    a.rows = [r.strip() for r in a.rows.split(",") if r.strip()]
    bad = [r for r in a.rows if r not in GROUPS]
    if bad or not a.rows:
        p.error(f"--rows: unknown {','.join(bad) or '(empty)'}; choose from {','.join(GROUPS)}")
    if a.runs < 1:
        p.error("--runs must be >= 1")
    a.skip_peers = {s.strip() for s in a.skip_peers.split(",") if s.strip()}
    a.cap = a.cap or (40.0 if a.quick else 120.0)
    a.budget = a.budget or (12.0 if a.quick else 60.0)
    a.deadline = a.deadline or (160.0 if a.quick else 1110.0)
    return a


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    big_mib = args.big_mib or (128 if args.quick else 512)
    n_files = args.tree_files or (1000 if args.quick else 5000)
    n_dirs = 20 if n_files <= 1000 else 100
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started in the background
    tmp = Path(tempfile.mkdtemp(prefix="tvix-bench-", dir=args.tmpdir)).resolve()
    atexit.register(lambda: finish(tmp, args.keep))
    started = time.monotonic()
    bench = Bench(args, tmp, started)
    try:
        (tmp / "logs").mkdir()
        ensure_peers(bench)
        if args.runs < 3:
            log(f"warning: --runs {args.runs} < 3: medians are not what BENCH.md asks for")
        if not bench.cold_ok:
            log("warning: cannot write /proc/sys/vm/drop_caches (not root): rows say NOT cold")
        log(f"generating data in {tmp}: big {big_mib} MiB, tree {n_files} files in ~{n_dirs} directories")
        bench.data = make_data(tmp / "data", big_mib * MiB, n_files, n_dirs, seed=20240601)
        for group, fn in GROUPS.items():
            if group not in args.rows:
                continue
            t0 = time.monotonic()
            try:
                fn(bench)
            except BenchError as e:  # a setup step of the whole group failed
                bench.report.emit(Row(f"{group} rows", note=f"FAILED: {e}"))
            log(f"group {group} took {time.monotonic() - t0:.0f} s")
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
        f"scripts/bench ({mode}, rows {','.join(args.rows)}): big {big_mib} MiB, tree {n_files} files "
        f"({bench.data.tree_bytes / MiB:.1f} MiB), {args.runs} interleaved runs per row, medians; "
        f"ratio = subject rate / reference rate (> 1: faster); runs capped at {args.cap:g} s "
        f"(a capped median is a lower bound: '> s', ratio '< x'); {time.strftime('%Y-%m-%d %H:%M')}, {elapsed:.0f} s"
    )
    table = format_table(bench.report.rows)
    if WARNINGS:
        counts = Counter(WARNINGS)
        table += "\nwarnings: " + "; ".join(f"{n}× {w}" for w, n in counts.items())
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
