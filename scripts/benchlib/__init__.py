"""The modules of `scripts/bench` (the side-by-side benchmark of /work/shared/spec/BENCH.md).

Layout, one job per module:
- `util`: logging, errors, the cleanup registry, running commands with a time cap, cold caches.
- `results`: measurements, lower bounds of capped runs, rows, ratios and the table.
- `data`: the generated data set and the reference hashes every read is checked against.
- `procs`: FUSE mounts, the tvix daemon, static HTTP servers, the delaying proxy (all cleaned up).
- `peers`: installing and driving the peers (nix-store, borg, casync, rclone, nginx).
- `runner`: the bench context and the interleaving runner (run 1 of every subject, then run 2 …).
- `reads`: the timed reads (find | xargs cat, dd, ls -lR, first byte) and their content checks.
- `rows_import`, `rows_mount`, `rows_remote`, `rows_latency`, `rows_gc`: the row groups.
- `cli`: arguments, the main loop, the final table.

Not an importable library for the project: it drives `tvix-store` only through its command
line, so it does not depend on how the Python packages are laid out. It reuses the test
helpers `tests/tcpproxy.py` and `tests/mountutil.py` (imported as `tcpproxy` and `mountutil`
with the repo's `tests/` directory on sys.path, as pytest's rootdir conftest does).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
TESTS = REPO / "tests"
if str(TESTS) not in sys.path:
    sys.path.append(str(TESTS))  # appended: nothing in tests/ shadows an installed module
