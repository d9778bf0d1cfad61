"""Shared test data and helpers: blobs with digests known independently (PROTOCOL.md, b3sum),
tree builders, and disk-use measurement of a cache directory."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
from pathlib import Path

from tvix_store.compose import open_store
from tvix_store.core.castore import Directory, FileNode, Node, SymlinkNode
from tvix_store.store import Store
from tvix_store.verify import VerifyReport, verify_objects

EMPTY_HEX = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
HELLO = b"Hello World!"
HELLO_HEX = "5ca7815adcb484e9a136c11efe69c1d530176d549b5d18d038eb5280b4b3470c"

#: names whose order differs between bytes and locales (NAR order is bytewise)
ODD_NAMES = (b"A", b"a", b"-", b"_", b"~", b"B-", b"b_", "é".encode(), "Z\u00e4".encode(), b"0")


def random_bytes(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def make_tree(root: Path, seed: int = 0) -> Path:
    """A small tree with every kind of entry PROTOCOL.md allows: files, executables, empty
    files and dirs, symlinks (relative, absolute, dangling), nested dirs, non-ASCII names, and
    names whose bytewise order differs from their locale order (`order/`)."""
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
    order = root / "order"  # names whose bytewise (NAR) order differs from locale order
    order.mkdir()
    for i, name in enumerate(ODD_NAMES):
        (order / os.fsdecode(name)).write_bytes(b"%d\n" % i)
    (order / os.fsdecode(ODD_NAMES[0] + b"dir")).mkdir()
    return root


def coexisting_disk_use(cache: Path) -> int:
    """Bytes (st_blocks) of the objects and temp files of a cache directory that all existed at
    one moment (what `--cache-size` bounds: every object, rounded up to the block).

    A directory walk is not atomic: a file counted early may be evicted before a new one is
    counted later. So walk once, then re-stat what was counted: a file with the same inode at
    both stats existed all along, so all survivors existed together when the walk ended, and
    their sum is a real disk use at that moment (never an over-count made by the walk itself)."""
    seen: list[tuple[str, int]] = []
    stack = [str(cache / sub) for sub in ("chunks", "blobs", "directories", "pathinfos", "tmp")]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except FileNotFoundError:
            continue
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                stack.append(e.path)
            else:
                seen.append((e.path, e.inode()))
    total = 0
    for path, ino in seen:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if st.st_ino == ino:
            total += st.st_blocks * 512
    return total


def open_local(root: Path) -> Store:
    """The embedded store in `root` (opened through its URL, as users do)."""
    return open_store(f"local://{root}")


def verify(store: Store) -> VerifyReport:
    """The fsck of an embedded store's objects."""
    objects = getattr(store.blobs, "objects", None)
    assert objects is not None, f"{store.url} is not an object-backed store"
    return verify_objects(objects)


def materialize(node: Node, parent: Path, blobs: dict[bytes, bytes], dirs: dict[bytes, Directory]) -> Path:
    """Write a castore node to the filesystem under `parent` (by its name), from the known bytes
    of its blobs and its Directories: the tree an independent tool (`nix-store --dump`) reads."""
    path = parent / os.fsdecode(node.name)
    stack: list[tuple[Node, Path]] = [(node, path)]
    while stack:
        n, p = stack.pop()
        if isinstance(n, SymlinkNode):
            os.symlink(n.target, p)
        elif isinstance(n, FileNode):
            p.write_bytes(blobs[bytes(n.digest)])
            p.chmod(0o755 if n.executable else 0o644)
        else:
            p.mkdir()
            d = dirs[bytes(n.digest)]
            stack.extend((c, p / os.fsdecode(c.name)) for c in d.nodes())
    return path


def nix_dump(path: Path) -> bytes:
    """The NAR of a path as the real `nix-store --dump` writes it."""
    return subprocess.run(["nix-store", "--dump", str(path)], capture_output=True, check=True).stdout


def nix_nar_hash(path: Path) -> tuple[int, bytes]:
    """(size, sha256) of `nix-store --dump PATH`."""
    dump = nix_dump(path)
    return len(dump), hashlib.sha256(dump).digest()


# --- the embedded store's objects, whatever their layout ---------------------------------------


def object_keys(root: Path, kind: str) -> list[str]:
    """The keys of one kind (`chunks`, `blobs`, `directories`, `pathinfos`) in a local store."""
    from tvix_store.objects.packs import PackObjectStore

    o = PackObjectStore(root)
    try:
        return sorted(i.key for i in o.list(kind + "/"))
    finally:
        o.close()


def object_bytes(root: Path, key: str) -> bytes | None:
    """An object's stored bytes, read from its pack file directly (not through the store)."""
    from tvix_store.objects.packs import PackObjectStore

    o = PackObjectStore(root)
    try:
        loc = o.locate(key)
    finally:
        o.close()
    if loc is None:
        return None
    path, off, size = loc
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(size)


def damage_object(root: Path, key: str, at: int = 0) -> None:
    """Flip one bit of an object's stored bytes, in its pack file, as a failing disk would."""
    from tvix_store.objects.packs import PackObjectStore

    o = PackObjectStore(root)
    try:
        loc = o.locate(key)
    finally:
        o.close()
    assert loc is not None, f"{key} is not stored"
    path, off, size = loc
    assert 0 <= at < size
    with open(path, "r+b") as f:
        f.seek(off + at)
        b = f.read(1)
        f.seek(off + at)
        f.write(bytes([b[0] ^ 1]))


def pack_bytes(root: Path) -> int:
    """Bytes of all pack files of a local store."""
    return sum(p.stat().st_size for p in (root / "packs").glob("*.pack"))
