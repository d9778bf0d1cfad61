"""The bench's data set and the references every read is checked against.

`make_data()` writes `big` (one file of random bytes, alone in `bigdir/`) and `tree` (many
small random files in ~100 directories, a few executables and symlinks). `Data` then answers
what a correct read must give: the BLAKE3 of big, the BLAKE3 of the tree's files concatenated in
any order a `find` listed them (computed from the originals), the `ls -lR` listing of the tree
(names, types, sizes, link targets), and the NAR hashes for import checks.

Not a fixture generator for the tests: sizes and layout follow BENCH.md ("big", "tree").
"""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import blake3

from .util import BenchError, MiB, run


@dataclass
class Data:
    big: Path  # the file
    bigdir: Path  # the directory holding only `big` (what casync and borg archive)
    tree: Path
    big_size: int
    tree_files: list[str]  # relative paths of the regular files, sorted
    tree_bytes: int
    _big_b3: str = ""
    _order_b3: dict[int, str] = field(default_factory=dict)
    _ls: set[tuple[str, str, str, str]] | None = None
    _nar: dict[str, str] = field(default_factory=dict)

    def big_b3(self) -> str:
        if not self._big_b3:
            self._big_b3 = b3_file(self.big)
        return self._big_b3

    def range_bytes(self, off: int, n: int) -> bytes:
        with open(self.big, "rb") as f:
            f.seek(off)
            return f.read(n)

    def tree_b3_in_order(self, order: list[str]) -> str:
        """BLAKE3 of the original files' contents concatenated in `order` (relative paths as find printed
        them). Raises if `order` is not exactly the tree's regular files."""
        rel = [p.removeprefix("./") for p in order]
        if sorted(rel) != self.tree_files:
            missing = sorted(set(self.tree_files) - set(rel))
            extra = sorted(set(rel) - set(self.tree_files))
            raise BenchError(
                f"WRONG DATA: find listed {len(rel)} files, the tree has {len(self.tree_files)}"
                + (f"; missing e.g. {missing[0]}" if missing else "")
                + (f"; unexpected e.g. {extra[0]}" if extra else "")
            )
        key = hash(tuple(rel))
        if key not in self._order_b3:
            h = blake3.blake3()
            for p in rel:
                h.update((self.tree / p).read_bytes())
            self._order_b3[key] = h.hexdigest()
        return self._order_b3[key]

    def ls_reference(self) -> set[tuple[str, str, str, str]]:
        if self._ls is None:
            self._ls = parse_ls(run(LS_CMD, cwd=self.tree).stdout.decode(errors="replace"))
        return self._ls

    def nar_b3(self, which: str, nix_ok: bool) -> str | None:
        """BLAKE3 of the NAR of big or tree as `nix-store --dump` writes it (None without nix-store)."""
        if which not in self._nar:
            if not nix_ok:
                return None
            src = self.big if which == "big" else self.tree
            self._nar[which] = b3_of_command(["nix-store", "--dump", str(src)])
        return self._nar[which]


#: `ls -lR` of the current directory, with numeric ids and a one-token time so it parses exactly
LS_CMD = ["ls", "-lRn", "--time-style=+T", "."]


def parse_ls(text: str) -> set[tuple[str, str, str, str]]:
    """(directory, type, name (-> target), size of a regular file else '-') of every entry `ls -lR` printed."""
    out: set[tuple[str, str, str, str]] = set()
    cur = ""
    for line in text.splitlines():
        if not line or line.startswith("total "):
            continue
        if line.endswith(":") and not line.startswith(("-", "d", "l")):
            cur = line[:-1]
            continue
        parts = line.split(maxsplit=6)
        if len(parts) < 7:
            out.add((cur, "?", line, "?"))
            continue
        kind = parts[0][0]
        out.add((cur, kind, parts[6], parts[4] if kind == "-" else "-"))  # a file's size; a link's target
    return out


def b3_file(path: Path) -> str:
    return run(["b3sum", "--no-names", str(path)], timeout=600).stdout.decode().split()[0]


def b3_of_command(cmd: list[str], timeout: float = 600) -> str:
    """BLAKE3 of what `cmd` writes to stdout, streamed (never held in memory)."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as p:
        assert p.stdout is not None
        h = blake3.blake3()
        while chunk := p.stdout.read(MiB):
            h.update(chunk)
        rc = p.wait(timeout)
    if rc != 0:
        raise BenchError(f"{' '.join(cmd[:2])} exited {rc}")
    return h.hexdigest()


def make_data(root: Path, big_size: int, n_files: int, n_dirs: int, seed: int) -> Data:
    rng = random.Random(seed)
    bigdir = root / "bigdir"
    bigdir.mkdir(parents=True)
    big = bigdir / "big"
    with open(big, "wb") as f:
        left = big_size
        while left:
            n = min(left, 4 * MiB)
            f.write(os.urandom(n))
            left -= n
    tree = root / "tree"
    top = max(1, round(n_dirs**0.5))
    leaves = []
    for i in range(top):
        for j in range(max(1, n_dirs // top)):
            d = tree / f"d{i:02}" / f"s{j:02}"
            d.mkdir(parents=True)
            leaves.append(d)
    files: list[str] = []
    total = 0
    for k in range(n_files):
        d = leaves[rng.randrange(len(leaves))]
        size = rng.randint(1024, 16 * 1024)
        p = d / f"f{k:05}.bin"
        if k % max(1, n_files // 5) == 1:  # a few executables
            p = d / f"run{k:05}.sh"
            p.write_bytes(b"#!/bin/sh\nexit 0\n#" + os.urandom(size - 18))
            p.chmod(0o755)
        else:
            p.write_bytes(os.urandom(size))
        files.append(str(p.relative_to(tree)))
        total += size
    # a few symlinks: to files (relative, some across directories) and to a directory
    for i in range(4):
        target = tree / files[rng.randrange(len(files))]
        link = leaves[rng.randrange(len(leaves))] / f"link{i}"
        link.symlink_to(os.path.relpath(target, link.parent))
    (tree / "link-dir").symlink_to(os.path.relpath(leaves[0], tree))
    files.sort()
    return Data(big, bigdir, tree, big_size, files, total)


def snapshot(d: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file under d: what a re-import may not change."""
    out: dict[str, tuple[int, int]] = {}
    for dirpath, _dirs, names in os.walk(d):
        for n in names:
            p = os.path.join(dirpath, n)
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(p)
                out[os.path.relpath(p, d)] = (st.st_size, st.st_mtime_ns)
    return out


def compare_trees(a: Path, b: Path) -> str | None:
    """None when b has the same files (content, exec bit), symlinks and directories as a; else the first difference."""
    for dirpath, dirs, names in os.walk(a):
        rel = os.path.relpath(dirpath, a)
        other = b / rel
        try:
            theirs = set(os.listdir(other))
        except OSError as e:
            return f"{rel}: {e.strerror}"
        if theirs != set(dirs) | set(names):
            return f"{rel}: entries differ"
        for n in names + dirs:
            pa, pb = Path(dirpath) / n, other / n
            sa, sb = os.lstat(pa), os.lstat(pb)
            if os.path.islink(pa):
                if not os.path.islink(pb) or os.readlink(pa) != os.readlink(pb):
                    return f"{rel}/{n}: symlink differs"
            elif pa.is_file():
                if not pb.is_file() or bool(sa.st_mode & 0o100) != bool(sb.st_mode & 0o100):
                    return f"{rel}/{n}: type or executable bit differs"
                if pa.read_bytes() != pb.read_bytes():
                    return f"{rel}/{n}: content differs"
    return None
