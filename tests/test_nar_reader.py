"""The NAR reader (`tvix_store.importer.nar.read_nar`): round trips against the real
`nix-store --dump`, into a memory and a local on-disk store, rendered back by
`tvix_store.nar` byte for byte; sha256 and size as `nix-hash` and `hashlib` say; the same
root as the filesystem importer; depth beyond the recursion limit; bounded memory for a big
NAR; and one negative test per class of malformation, each asserting the error, its byte
offset, and that no Directory (and no PathInfo) was stored.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Daemon
from fixtures import ODD_NAMES, make_tree, nix_dump, open_local, random_bytes

from tvix_store import nar
from tvix_store.compose import open_store
from tvix_store.core import nixbase32
from tvix_store.core.castore import DirectoryNode, FileNode, SymlinkNode
from tvix_store.core.errors import ValidationError
from tvix_store.importer import import_path
from tvix_store.importer.nar import NarResult, read_nar
from tvix_store.store import Store

REPO = Path(__file__).resolve().parent.parent


# --- building NARs by hand (also malformed ones) ---


def s(b: bytes) -> bytes:
    """A NAR string: u64 little-endian length, the bytes, zero padding to 8."""
    return len(b).to_bytes(8, "little") + b + b"\0" * (-len(b) % 8)


MAGIC = s(b"nix-archive-1")


def reg(data: bytes, executable: bool = False) -> bytes:
    return (
        s(b"(")
        + s(b"type")
        + s(b"regular")
        + (s(b"executable") + s(b"") if executable else b"")
        + (s(b"contents") + s(data) + s(b")"))
    )


def sym(target: bytes) -> bytes:
    return s(b"(") + s(b"type") + s(b"symlink") + s(b"target") + s(target) + s(b")")


def dir_(*entries: tuple[bytes, bytes]) -> bytes:
    """A directory node with these (name, node) entries, in the order given (not sorted)."""
    body = b"".join(s(b"entry") + s(b"(") + s(b"name") + s(n) + s(b"node") + node + s(b")") for n, node in entries)
    return s(b"(") + s(b"type") + s(b"directory") + body + s(b")")


def sample() -> bytes:
    """A small valid NAR with every kind of node."""
    return MAGIC + dir_(
        (b"a", reg(b"hello\n", executable=True)),
        (b"b", sym(b"a")),
        (b"c", dir_((b"x", reg(b"")), (b"y", dir_()))),
        (b"d", reg(b"12345678")),
    )


def deep_nar(levels: int, leaf: bytes) -> bytes:
    """`levels` directories nested as d/d/d/…, the innermost holding `leaf` (a node) as `x`."""
    opened = (s(b"(") + s(b"type") + s(b"directory") + s(b"entry") + s(b"(") + s(b"name") + s(b"d") + s(b"node")) * (
        levels - 1
    )
    inner = dir_((b"x", leaf))
    closed = (s(b")") + s(b")")) * (levels - 1)  # the entry's end, then the directory's
    return MAGIC + opened + inner + closed


# --- helpers ---


def render(r: NarResult, store: Store) -> bytes:
    return b"".join(nar.render(r.node, store.blobs, store.directories))


def pieces(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def check_roundtrip(store: Store, dump: bytes) -> NarResult:
    """Read `dump` three ways (file object, odd-sized pieces, bytes); each renders back to it."""
    r = read_nar(store, io.BytesIO(dump))
    assert r.nar_size == len(dump)
    assert r.nar_sha256 == hashlib.sha256(dump).digest()
    assert render(r, store) == dump
    for source in (pieces(dump, 7), dump):
        assert read_nar(store, source) == r
    return r


def stored_directories(store: Store) -> list[object]:
    return list(store.directories.iter_digests())


def reject(nar_bytes: bytes, *needles: str, store: Store | None = None) -> str:
    """Assert the NAR is rejected with a ValidationError naming each needle, storing no Directory."""
    store = store or open_store("memory://")
    with pytest.raises(ValidationError) as info:
        read_nar(store, nar_bytes)
    msg = str(info.value)
    for n in needles:
        assert n in msg, (n, msg)
    assert stored_directories(store) == []
    assert list(store.pathinfos.iter_all()) == []
    return msg


@pytest.fixture(params=["memory", "local"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    s = open_store("memory://") if request.param == "memory" else open_local(tmp_path / "store")
    try:
        yield s
    finally:
        s.close()


# --- round trips against the real nix-store --dump ---


@pytest.mark.nix
def test_tree_roundtrip_against_nix(store: Store, tmp_path: Path) -> None:
    """Files, executables, symlinks, empty files and dirs, odd names, a big file (streamed, several
    chunks), identical subtrees: read as nix-store dumps it, rendered back byte-identical, sha256
    as nix-hash, the same root as importing the tree from the filesystem."""
    root = make_tree(tmp_path / "tree")
    (root / "big.bin").write_bytes(random_bytes(5 << 20, seed=3))
    (root / "exe-empty").write_bytes(b"")
    (root / "exe-empty").chmod(0o755)
    for d in ("dup1", "dup2"):
        (root / d / "inner").mkdir(parents=True)
        (root / d / "inner" / "same").write_bytes(b"same\n")
    odd = root / "odd"
    odd.mkdir()
    for name in ODD_NAMES:
        os.symlink(os.fsdecode(name) + "-target", odd / os.fsdecode(name))
    dump = nix_dump(root)
    r = check_roundtrip(store, dump)
    nix_hash = subprocess.run(
        ["nix-hash", "--type", "sha256", "--base32", str(root)], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert nixbase32.encode(r.nar_sha256) == nix_hash
    assert isinstance(r.node, DirectoryNode)
    assert r.node.name == b""
    assert import_path(open_store("memory://"), root).node.renamed(b"") == r.node
    # everything it references is stored: the whole closure, and every blob
    closure = list(store.directories.get_recursive(r.node.digest))
    assert len(closure) == len({d.digest for d in closure}) > 5
    assert store.pathinfos.calculate_nar(r.node) == (len(dump), r.nar_sha256)


@pytest.mark.nix
@pytest.mark.parametrize(
    "kind", ["file", "executable", "empty-file", "big-file", "symlink", "dangling-symlink", "empty-dir", "deep"]
)
def test_root_kinds_against_nix(kind: str, store: Store, tmp_path: Path) -> None:
    p = tmp_path / "root"
    if kind == "file":
        p.write_bytes(b"hello\n")
    elif kind == "executable":
        p.write_bytes(b"#!/bin/sh\n")
        p.chmod(0o755)
    elif kind == "empty-file":
        p.write_bytes(b"")
    elif kind == "big-file":  # > SMALL_FILE: streamed to a blob writer in pieces
        p.write_bytes(random_bytes(3 << 20 | 5, seed=9))
    elif kind == "symlink":
        os.symlink("/etc/hostname", p)
    elif kind == "dangling-symlink":
        os.symlink("does/not/exist", p)
    elif kind == "empty-dir":
        p.mkdir()
    else:  # 1,500 levels (beyond the recursion limit) built step by step, the path under PATH_MAX
        cur = str(p)
        os.mkdir(cur)
        for _ in range(1500):
            cur += "/d"
            os.mkdir(cur)
        with open(cur + "/f", "wb") as f:
            f.write(b"bottom\n")
    try:
        dump = nix_dump(p)
    finally:
        if kind == "deep":  # too deep for shutil.rmtree (recursive), so for pytest's tmp cleanup
            subprocess.run(["rm", "-rf", "--", str(p)], check=True)
    r = check_roundtrip(store, dump)
    want = {"symlink": SymlinkNode, "dangling-symlink": SymlinkNode, "empty-dir": DirectoryNode, "deep": DirectoryNode}
    assert isinstance(r.node, want.get(kind, FileNode))
    if isinstance(r.node, FileNode):
        assert r.node.executable == (kind == "executable")
    if kind == "deep":
        assert r.node.size == 1501


@pytest.mark.nix
def test_into_a_remote_store(daemon: Daemon, tmp_path: Path) -> None:
    """Through gRPC to a real daemon (blobs settled by the worker pool, Directories in Put
    streams, early flushes too): the daemon's store renders it back identical; a NAR rejected
    midway leaves no Directory on the daemon."""
    root = make_tree(tmp_path / "tree")
    (root / "big.bin").write_bytes(random_bytes(3 << 20, seed=5))
    dump = nix_dump(root)
    with open_store(daemon.url) as remote:
        r = read_nar(remote, pieces(dump, 4096))
        assert render(r, remote) == dump
        assert read_nar(remote, dump, flush_entries=2) == r
    with open_store(daemon.url) as remote:
        with pytest.raises(ValidationError, match="trailing bytes"):
            read_nar(remote, deep_nar(30, reg(b"other")) + b"\0")
    with open_local(tmp_path / "daemon-store") as local:  # the daemon's own store, read directly
        assert len(stored_directories(local)) == len(list(local.directories.get_recursive(r.node.digest)))


def test_name_is_given_to_the_root(store: Store) -> None:
    r = read_nar(store, sample(), name=b"x-root")
    assert r.node.name == b"x-root"


def test_5000_levels_deep(store: Store) -> None:
    """5,000 nested directories (5x the recursion limit, too deep for a PATH_MAX path): built by
    hand, read, rendered back identical; the tree's size is right at every level."""
    dump = deep_nar(5000, sym(b"../" * 10 + b"top"))
    r = check_roundtrip(store, dump)
    assert isinstance(r.node, DirectoryNode) and r.node.size == 5000
    assert len(list(store.directories.get_recursive(r.node.digest))) == 5000


@pytest.mark.parametrize("flush_entries", [1, 2, 3, 7])
def test_directories_flushed_early_as_complete_subgraphs(flush_entries: int, tmp_path: Path) -> None:
    """A NAR with more Directory entries than `flush_entries` puts complete subtrees as it goes:
    the result is the same, and a NAR rejected after a flush has stored only complete subgraphs
    (every stored Directory's children are stored)."""
    root = make_tree(tmp_path / "tree")
    for d in ("dup1", "dup2"):
        (root / d / "inner").mkdir(parents=True)
        (root / d / "inner" / "same").write_bytes(b"same\n")
    dump = nix_dump(root)
    plain = read_nar(open_store("memory://"), dump)
    st = open_store("memory://")
    assert read_nar(st, dump, flush_entries=flush_entries) == plain
    assert render(plain, st) == dump
    bad = dump[:-16] + s(b"x")  # the root's end mangled: rejected at the very end
    s2 = open_store("memory://")
    with pytest.raises(ValidationError):
        read_nar(s2, bad, flush_entries=flush_entries)
    stored = stored_directories(s2)
    assert stored, "a flush happened before the error"
    for dg in stored:
        d = s2.directories.get(dg)  # type: ignore[arg-type]
        assert d is not None
        for c in d.directories:
            assert s2.directories.get(c.digest) is not None
    assert plain.node.digest not in stored  # type: ignore[union-attr]


def test_deep_with_flushes(store: Store) -> None:
    dump = deep_nar(3000, reg(b"x"))
    r = read_nar(store, dump, flush_entries=100)
    assert render(r, store) == dump


@pytest.mark.slow
def test_big_nar_in_bounded_memory(tmp_path: Path) -> None:
    """A ~900 MiB NAR (three 300 MiB files and 2,000 small ones) streamed from a generator into a
    local store: the process's peak RSS grows by far less than the NAR (measured in a fresh
    process)."""
    script = r"""
import hashlib, random, resource, sys
from tvix_store import nar
from tvix_store.compose import open_store
from tvix_store.importer.nar import read_nar

BIG = 300 << 20
def gen(h):
    blk = random.Random(1).randbytes(1 << 20)
    def out(b):
        h.update(b)
        return b
    yield out(nar.MAGIC + nar.DIRECTORY_OPEN)
    for i in range(3):
        yield out(nar.entry_open(b"big%d" % i) + nar.regular_header(False, BIG))
        for j in range(BIG >> 20):
            yield out(j.to_bytes(8, "little") + bytes([i]) + blk[9:])
        yield out(nar.regular_trailer(BIG) + nar.ENTRY_CLOSE)
    for i in range(2000):
        d = b"small %d\n" % i
        yield out(nar.entry_open(b"s%05d" % i) + nar.regular_header(False, len(d)) + d
                  + nar.regular_trailer(len(d)) + nar.ENTRY_CLOSE)
    yield out(nar.DIRECTORY_CLOSE)

store = open_store("local://" + sys.argv[1])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
h = hashlib.sha256()
r = read_nar(store, gen(h))
assert r.nar_sha256 == h.digest(), "sha256"
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(r.nar_size, before, after)
"""
    p = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "store")], capture_output=True, text=True, timeout=240
    )
    assert p.returncode == 0, p.stderr
    size, before, after = map(int, p.stdout.split())
    assert size > 900 << 20
    assert (after - before) << 10 < 128 << 20, f"peak RSS grew by {(after - before) >> 10} MiB"


def test_source_errors_propagate_and_store_nothing() -> None:
    def source() -> Iterator[bytes]:
        yield sample()[:200]
        raise OSError("connection reset")

    store = open_store("memory://")
    with pytest.raises(OSError, match="connection reset"):
        read_nar(store, source())
    assert stored_directories(store) == []


# --- malformations: each rejected, naming what and where, nothing stored ---


def test_not_a_nar() -> None:
    reject(b"", "truncated NAR", "ends at byte 0", "magic")
    reject(b"\x0d\0\0\0", "truncated NAR", "ends at byte 4")
    reject(s(b"nix-archive-2") + dir_(), "at byte 0", "not a NAR", "'nix-archive-2'")
    reject(s(b"nix-archive-10") + dir_(), "at byte 0", "not a NAR", "string of 14 bytes")
    reject(b"\xff" * 64, "at byte 0", "not a NAR")
    reject(b"<html>\n<body>Not Found</body></html>\n", "at byte 0", "not a NAR")
    magic_bad_pad = MAGIC[:-1] + b"\x01"
    reject(magic_bad_pad + dir_(), "at byte 21", "non-zero padding")


def test_every_truncation_is_detected() -> None:
    good = sample()
    read_nar(open_store("memory://"), good)
    for n in range(len(good)):
        reject(good[:n], "truncated NAR", f"ends at byte {n}")


def test_truncated_big_file() -> None:
    """A file announced bigger than what follows (streamed path): truncation, nothing stored."""
    data = random_bytes(2 << 20)
    whole = MAGIC + dir_((b"f", reg(data)))
    cut = whole[: len(MAGIC) + 200 + (1 << 20)]
    reject(cut, "truncated NAR", "inside the contents of a file", "in /")


def test_trailing_bytes() -> None:
    good = sample()
    reject(good + b"\0", f"at byte {len(good)}", "trailing bytes")
    reject(good + MAGIC, f"at byte {len(good)}", "trailing bytes")
    reject(MAGIC + reg(b"x") + b"\0" * 8, "trailing bytes")


def test_non_zero_padding() -> None:
    # after a name: "a" is 1 byte, its 7 padding bytes follow
    good = MAGIC + dir_((b"a", reg(b"x")))
    at = good.index(s(b"a")) + 9
    reject(good[:at] + b"\x01" + good[at + 1 :], f"at byte {at}", "non-zero padding", "an entry name")
    # after file contents
    good = MAGIC + reg(b"abc")
    at = good.index(b"abc") + 3
    reject(good[: at + 4] + b"\x80" + good[at + 5 :], f"at byte {at}", "non-zero padding", "contents")
    # after a symlink target
    good = MAGIC + sym(b"linkto")
    at = good.index(b"linkto") + 6
    reject(good[:at] + b"\x01\x00" + good[at + 2 :], f"at byte {at}", "non-zero padding")
    # after a token ("type" is 4 bytes + 4 padding)
    good = MAGIC + reg(b"x")
    at = good.index(b"type") + 4
    reject(good[:at] + b"\0\0\0\x01" + good[at + 4 :], f"at byte {at}", "non-zero padding")


def test_wrong_tokens() -> None:
    def node(*tokens: bytes) -> bytes:
        return MAGIC + b"".join(s(t) for t in tokens)

    reject(node(b"[", b"type"), f"at byte {len(MAGIC)}", "expected '(', found '['")
    reject(node(b"(", b"kind"), "expected 'type', found 'kind'")
    reject(node(b"(", b"type", b"fifo", b")"), "expected 'regular' or 'directory' or 'symlink', found 'fifo'")
    reject(node(b"(", b"type", b"regular", b"data", b"x", b")"), "expected 'contents' or 'executable'")
    reject(node(b"(", b"type", b"regular", b"executable", b"1", b"contents", b"", b")"), "empty string")
    reject(node(b"(", b"type", b"regular", b"executable", b"", b"executable", b""), "expected 'contents'")
    reject(node(b"(", b"type", b"regular", b"contents", b"x", b"executable", b"", b")"), "expected ')'")
    reject(node(b"(", b"type", b"symlink", b"contents", b"x", b")"), "expected 'target'")
    reject(node(b"(", b"type", b"directory", b"entry", b"(", b"node"), "expected 'name', found 'node'")
    reject(node(b"(", b"type", b"directory", b"file"), "expected 'entry' or ')', found 'file'")
    reject(MAGIC + dir_((b"a", reg(b"x")))[:-16] + s(b"]"), "expected 'entry' or ')', found ']'")
    entry_missing_node = MAGIC + s(b"(") + s(b"type") + s(b"directory") + s(b"entry") + s(b"(") + s(b"name")
    reject(entry_missing_node + s(b"a") + reg(b"x"), "expected 'node', found '('")
    # the entry's closing ")" missing: the next entry comes instead
    two = MAGIC + s(b"(") + s(b"type") + s(b"directory") + s(b"entry") + s(b"(") + s(b"name") + s(b"a") + s(b"node")
    reject(two + reg(b"x") + s(b"entry"), "expected ')', found 'entry'")
    # a huge token length: refused from the prefix alone
    reject(MAGIC + s(b"(") + (1 << 62).to_bytes(8, "little"), "expected 'type', found a string of 4611686018427387904")


def test_entry_order_and_duplicates() -> None:
    reject(MAGIC + dir_((b"b", reg(b"")), (b"a", reg(b""))), "not in ascending bytewise order", "'a' after 'b'")
    reject(MAGIC + dir_((b"a", reg(b"")), (b"a", sym(b"x"))), "duplicate entry 'a'")
    reject(MAGIC + dir_((b"a", dir_()), (b"a", dir_())), "duplicate entry 'a'")
    # bytewise, not locale order: "B" (0x42) sorts before "a" (0x61), "é" (0xc3…) after "z"
    read_nar(open_store("memory://"), MAGIC + dir_((b"B", reg(b"")), (b"a", reg(b"")), ("é".encode(), reg(b""))))
    reject(MAGIC + dir_((b"a", reg(b"")), (b"B", reg(b""))), "'B' after 'a'")
    reject(MAGIC + dir_(("é".encode(), reg(b"")), (b"z", reg(b""))), "not in ascending")
    # order is per directory: the error names the directory
    msg = reject(MAGIC + dir_((b"sub", dir_((b"y", reg(b"")), (b"x", reg(b""))))), "in /sub")
    assert "at byte" in msg


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        (b"", "empty"),
        (b".", ". and .."),
        (b"..", ". and .."),
        (b"a/b", "'/' or NUL"),
        (b"/", "'/' or NUL"),
        (b"a\0b", "'/' or NUL"),
    ],
)
def test_invalid_names(name: bytes, needle: str) -> None:
    good = MAGIC + dir_((b"ok", reg(b"")))
    bad = MAGIC + dir_((name, reg(b"")))
    at = good.index(s(b"ok"))
    reject(bad, needle, f"at byte {at}", "in /")


def test_name_lengths() -> None:
    read_nar(open_store("memory://"), MAGIC + dir_((b"n" * 255, reg(b""))))
    reject(MAGIC + dir_((b"n" * 256, reg(b""))), "entry name of 256 bytes is longer than the limit of 255")
    huge = MAGIC + s(b"(") + s(b"type") + s(b"directory") + s(b"entry") + s(b"(") + s(b"name")
    reject(huge + (1 << 60).to_bytes(8, "little"), "longer than the limit of 255")


@pytest.mark.parametrize(
    ("target", "needle"),
    [(b"", "empty target"), (b"a\0b", "NUL"), (b"x" * 4096, "longer than the limit of 4095")],
)
def test_invalid_symlink_targets(target: bytes, needle: str) -> None:
    reject(MAGIC + sym(target), needle)
    reject(MAGIC + dir_((b"l", sym(target))), needle, "in /")


def test_symlink_target_limits() -> None:
    read_nar(open_store("memory://"), MAGIC + sym(b"x" * 4095))
    reject(MAGIC + s(b"(") + s(b"type") + s(b"symlink") + s(b"target") + b"\xff" * 8, "longer than the limit")


def test_file_of_4gib_announced_is_streamed_not_allocated() -> None:
    """A file of 4 GiB or more is a valid FileNode (uint64): its announced size allocates
    nothing; a stream that ends before the contents do is refused as such."""
    head = MAGIC + dir_((b"a", reg(b"")))[:-16]  # the root still open
    big = s(b"entry") + s(b"(") + s(b"name") + s(b"b") + s(b"node") + s(b"(") + s(b"type") + s(b"regular")
    reject(head + big + s(b"contents") + (1 << 32).to_bytes(8, "little") + b"x" * 4096, "end")
    reject(MAGIC + s(b"(") + s(b"type") + s(b"regular") + s(b"contents") + b"\xff" * 8, "end")


def test_rejected_deep_inside_stores_no_directory(tmp_path: Path) -> None:
    """An error at the very end of a big, deep, otherwise valid NAR: blobs may be stored, but no
    Directory, in a memory and in a local store."""
    for store in (open_store("memory://"), open_local(tmp_path / "store")):
        good = deep_nar(2000, reg(b"bottom"))
        bad = good[:-16] + s(b"x")
        reject(bad, "expected 'entry' or ')', found 'x'", store=store)
        bad_inner = deep_nar(2000, reg(b"bottom", executable=True)).replace(s(b"executable") + s(b""), s(b"x"))
        reject(bad_inner, "expected 'contents' or 'executable'", "in /d/d/d", store=store)
