"""The side-by-side benchmark (the project's BENCH.md contract), run as `scripts/bench [--quick] [--rows …]`.

This file is only the entry point; the bench itself is the package `scripts/benchlib/` (see its
`__init__` for the layout: runner and table, data, peers, processes, row groups import, mount,
remote, latency). It drives this project only through the `tvix-store` command line and reuses
the test helpers tests/tcpproxy.py and tests/mountutil.py.

Not a test suite: it asserts nothing beyond the data read being the data written.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
