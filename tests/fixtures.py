"""Shared test data: blobs with digests known independently (PROTOCOL.md, b3sum) and tree builders."""

from __future__ import annotations

import os
import random
from pathlib import Path

EMPTY_HEX = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
HELLO = b"Hello World!"
HELLO_HEX = "5ca7815adcb484e9a136c11efe69c1d530176d549b5d18d038eb5280b4b3470c"


def random_bytes(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def make_tree(root: Path, seed: int = 0) -> Path:
    """A small tree with every kind of entry PROTOCOL.md allows: files, executables, empty
    files and dirs, symlinks (relative, absolute, dangling), nested dirs, non-ASCII names."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "a.txt").write_bytes(b"hello\n")
    (root / "empty").write_bytes(b"")
    exe = root / "run.sh"
    exe.write_bytes(b"#!/bin/sh\necho hi\n")
    exe.chmod(0o755)
    (root / "emptydir").mkdir()
    sub = root / "sub" / "deeper"
    sub.mkdir(parents=True)
    (sub / "data.bin").write_bytes(rng.randbytes(70_000))
    (root / "sub" / "x").write_bytes(rng.randbytes(100))
    (root / "ünïcödé-名前.txt").write_bytes("ünïcödé\n".encode())
    os.symlink("a.txt", root / "link-rel")
    os.symlink("/etc/hostname", root / "link-abs")
    os.symlink("does/not/exist", root / "link-dangling")
    os.symlink("../a.txt", root / "sub" / "up")
    return root
