"""The timed reads every read row is made of, each followed by a check of what it read.

- `tree_read`: `find . -type f | xargs cat` (NUL-separated) in the root of the tree, the bytes
  hashed on the way out (`| b3sum`) and the names kept (`tee`), then compared with the BLAKE3 of
  the original files concatenated in that same find order.
- `dd_read`: `dd bs=1M` of big (or of a prefix) to /dev/null, then `b3sum` of the same file on
  the same mount right after (served from the pages the dd just read in) against the original.
  Hashing inside the timed pipe would cap every subject at the pipe's ~0.75 GB/s and hide the
  ratios of the fast rows, so the check follows the read instead.
- `ls_read`: `ls -lR`, its listing (names, types, sizes, link targets) against the original's.
- `first_byte`: open + read(1) of one file, the byte compared.

Not a place for timing policy (cold caches, fresh mounts, caps): the row groups decide that.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import blake3

from .data import LS_CMD, Data, parse_ls
from .util import BenchError, MiB, run, timed

TREE_CMD = "find . -type f -print0 | tee {list} | xargs -0 cat | b3sum --no-names"
TREE_CHECK = "b3sum of the bytes read = the originals concatenated in the same find order"
DD_CHECK = "b3sum of the file on the same mount right after the read"
LS_CHECK = "listing (names, types, sizes, link targets) = the original's"


def tree_read(data: Data, root: Path, cap: float, listfile: Path) -> float:
    """Seconds of one `find -type f | xargs cat` of the tree at `root`; raises unless every byte was right."""
    cmd = ["bash", "-o", "pipefail", "-c", TREE_CMD.format(list=listfile)]
    t, p = timed(cmd, cap=cap, cwd=root)
    order = [x.decode(errors="surrogateescape") for x in listfile.read_bytes().split(b"\0") if x]
    want = data.tree_b3_in_order(order)
    got = p.stdout.decode().split()[0]
    if got != want:
        raise BenchError(f"WRONG DATA: b3sum of the tree read {got[:16]}…, the originals give {want[:16]}…")
    return t


def dd_read(data: Data, path: Path, cap: float, prefix: int | None = None) -> float:
    """Seconds of one `dd bs=1M` of big at `path` (or its first `prefix` bytes); then checks its content."""
    cmd = ["dd", f"if={path}", "of=/dev/null", "bs=1M", "status=none"]
    if prefix is not None:
        cmd.append(f"count={prefix // MiB}")
    t, _ = timed(cmd, cap=cap)
    check_big(data, path, prefix)
    return t


def check_big(data: Data, path: Path, prefix: int | None = None) -> None:
    if prefix is None:
        got = run(["b3sum", "--no-names", "--no-mmap", str(path)], timeout=600).stdout.decode().split()[0]
        want = data.big_b3()
    else:
        got, want = b3_prefix(path, prefix), b3_prefix(data.big, prefix)
    if got != want:
        raise BenchError(f"WRONG DATA: b3sum of big on the mount {got[:16]}…, the original {want[:16]}…")


def b3_prefix(path: Path, n: int) -> str:
    h = blake3.blake3()
    with open(path, "rb") as f:
        left = n
        while left and (chunk := f.read(min(left, 4 * MiB))):
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def ls_read(data: Data, root: Path, cap: float, symlinks: bool = True) -> float:
    """Seconds of one `ls -lR` at `root`; raises unless it listed what the original tree holds
    (without its symlinks when `symlinks` is False: a static HTTP server has none)."""
    t, p = timed(LS_CMD, cap=cap, cwd=root)
    got = parse_ls(p.stdout.decode(errors="replace"))
    want = data.ls_reference()
    if not symlinks:
        want = {e for e in want if e[1] != "l"}
    if got != want:
        diff = sorted(got ^ want)
        raise BenchError(f"WRONG LISTING: {len(got ^ want)} entries differ, e.g. {diff[0]}")
    return t


def first_byte(data: Data, path: Path, rel: str) -> float:
    """Seconds of open + read(1) of `path`; raises unless the byte is the original's first."""
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        b = os.read(fd, 1)
        t = time.perf_counter() - t0
    finally:
        os.close(fd)
    if b != (data.tree / rel).read_bytes()[:1]:
        raise BenchError("WRONG DATA: first byte differs")
    return t
