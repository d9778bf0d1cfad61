"""Interoperability with the real Nix tools and b3sum, over every store kind.

For each generated tree: `tvix-store import PATH` prints what `nix-store --add PATH`
prints; `tvix-store nar STORE_PATH` is byte-identical to `nix-store --dump PATH`; the
stored PathInfo's narinfo agrees with `nix-hash --type sha256 --base32 PATH` and the
dump's length. Blobs: `blob put` prints what `b3sum` prints, `blob cat` round-trips,
`blob stat` prints the size and chunks that add up to it.

Stores: memory:// (in-process: it lives only as long as its process), local:// and
grpc+http:// to a real daemon (real `tvix-store` processes).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Daemon, cli
from fixtures import HELLO, make_tree

from tvix_store import nar
from tvix_store.compose import open_store
from tvix_store.core import nixbase32
from tvix_store.core.digest import B3Digest
from tvix_store.core.pathinfo import PathInfo, StorePath
from tvix_store.importer import import_path
from tvix_store.store import Store

pytestmark = pytest.mark.nix

BIG = 17 << 20  # over 16 MiB: streamed by the importer, several chunks in a chunking store


def _deep(root: Path, levels: int) -> None:
    p = root
    for i in range(levels):
        p = p / f"level{i}"
    p.mkdir(parents=True)
    (p / "bottom.txt").write_bytes(b"deep\n")
    os.symlink("../" * levels + "a.txt", p / "to-top")


def build_cases(base: Path) -> dict[str, Path]:
    """Every case of the importer's brief, each a path to hand to `import` and `nix-store --add`."""
    rng = random.Random(7)
    cases: dict[str, Path] = {}

    tree = make_tree(base / "tree")
    (tree / "big.bin").write_bytes(rng.randbytes(BIG))
    _deep(tree, 12)
    for d in ("dup1", "dup2"):  # identical subdirectories: one Directory, referenced twice
        (tree / d).mkdir()
        (tree / d / "same").write_bytes(b"same content\n")
    for name, mode in (("u-x", 0o744), ("g-x", 0o654), ("o-x", 0o645), ("ro", 0o444)):
        (tree / name).write_bytes(name.encode())
        (tree / name).chmod(mode)
    (tree / "same-as-a.txt").write_bytes(b"hello\n")  # a blob shared by two files
    cases["tree"] = tree

    f = base / "single" / "file.txt"
    f.parent.mkdir()
    f.write_bytes(rng.randbytes(1000))
    cases["file-root"] = f

    e = base / "empty-file" / "empty"
    e.parent.mkdir()
    e.write_bytes(b"")
    cases["empty-file-root"] = e

    x = base / "exe" / "tool"
    x.parent.mkdir()
    x.write_bytes(b"#!/bin/sh\nexit 0\n")
    x.chmod(0o755)
    cases["exe-root"] = x

    big = base / "big" / "big-root.bin"
    big.parent.mkdir()
    big.write_bytes(rng.randbytes(BIG + 12345))
    cases["big-file-root"] = big

    s = base / "sym" / "link"
    s.parent.mkdir()
    os.symlink("../single/file.txt", s)
    cases["symlink-root"] = s

    a = base / "abs" / "abslink"
    a.parent.mkdir()
    os.symlink("/nonexistent/ünï", a)
    cases["dangling-abs-symlink-root"] = a

    ed = base / "emptydir" / "nothing-here"
    ed.mkdir(parents=True)
    cases["empty-dir-root"] = ed

    dp = base / "deep"
    dp.mkdir()
    (dp / "a.txt").write_bytes(b"top\n")
    _deep(dp, 10)
    cases["deep"] = dp
    return cases


@dataclass
class NixResult:
    store_path: str
    dump: bytes
    nar_sha256: bytes


def _nix(path: Path) -> NixResult:
    def run(*cmd: str) -> bytes:
        return subprocess.run(cmd, capture_output=True, check=True).stdout

    return NixResult(
        run("nix-store", "--add", str(path)).decode().strip(),
        run("nix-store", "--dump", str(path)),
        nixbase32.decode(run("nix-hash", "--type", "sha256", "--base32", str(path)).decode().strip(), 32),
    )


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, NixResult]]:
    base = tmp_path_factory.mktemp("cases")
    return {k: (p, _nix(p)) for k, p in build_cases(base).items()}


class Target:
    """A store to test against, driven the way a user would (CLI) where the store outlives a process."""

    def import_paths(self, paths: list[Path]) -> list[str]:
        raise NotImplementedError

    def nar(self, store_path: str) -> bytes:
        raise NotImplementedError

    def pathinfo(self, store_path: str) -> PathInfo | None:
        with self.open() as s:
            return s.pathinfos.get(StorePath.parse(store_path).digest)

    def open(self) -> Store:
        raise NotImplementedError


class MemoryTarget(Target):
    def __init__(self) -> None:
        self.store = open_store("memory://")

    def import_paths(self, paths: list[Path]) -> list[str]:
        return [import_path(self.store, p).store_path.absolute for p in paths]

    def nar(self, store_path: str) -> bytes:
        info = self.store.pathinfos.get(StorePath.parse(store_path).digest)
        assert info is not None and info.node is not None
        return b"".join(nar.render(info.node, self.store.blobs, self.store.directories))

    def pathinfo(self, store_path: str) -> PathInfo | None:
        return self.store.pathinfos.get(StorePath.parse(store_path).digest)


class CliTarget(Target):
    def __init__(self, url: str) -> None:
        self.url = url

    def import_paths(self, paths: list[Path]) -> list[str]:
        p = cli("import", "--store", self.url, *map(str, paths))
        assert p.stderr == b"", p.stderr  # no progress output when stderr is not a terminal
        return p.stdout.decode().splitlines()

    def nar(self, store_path: str) -> bytes:
        return cli("nar", "--store", self.url, store_path).stdout

    def open(self) -> Store:
        return open_store(self.url)


STORE_KINDS = ["memory", "local", "grpc"]


def make_target(kind: str, tmp: Path) -> tuple[Target, Callable[[], None]]:
    if kind == "memory":
        return MemoryTarget(), lambda: None
    if kind == "local":
        return CliTarget(f"local://{tmp / 'store'}"), lambda: None
    d = Daemon(f"local://{tmp / 'daemon-store'}")
    return CliTarget(d.url), lambda: d.stop() and None


@pytest.fixture(scope="module", params=STORE_KINDS)
def imported(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, cases: dict[str, tuple[Path, NixResult]]
) -> Iterator[tuple[Target, dict[str, str]]]:
    """Every case imported into one store of each kind with ONE `import` call (many PATHs)."""
    target, stop = make_target(request.param, tmp_path_factory.mktemp(request.param))
    try:
        names = list(cases)
        printed = target.import_paths([cases[n][0] for n in names])
        assert len(printed) == len(names)
        yield target, dict(zip(names, printed, strict=True))
    finally:
        stop()


CASE_NAMES = [
    "tree",
    "file-root",
    "empty-file-root",
    "exe-root",
    "big-file-root",
    "symlink-root",
    "dangling-abs-symlink-root",
    "empty-dir-root",
    "deep",
]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_import_matches_nix(
    case: str, cases: dict[str, tuple[Path, NixResult]], imported: tuple[Target, dict[str, str]]
) -> None:
    target, printed = imported
    _, nixr = cases[case]
    # the same store path as nix-store --add
    assert printed[case] == nixr.store_path
    # the NAR, rendered from the store, byte-identical to nix-store --dump
    dump = target.nar(printed[case])
    assert len(dump) == len(nixr.dump)
    assert dump == nixr.dump
    # the narinfo: sha256 as nix-hash, size as the dump
    info = target.pathinfo(printed[case])
    assert info is not None and info.narinfo is not None
    assert info.narinfo.nar_sha256 == nixr.nar_sha256
    assert info.narinfo.nar_size == len(nixr.dump)
    assert info.node is not None and info.node.name.decode() == StorePath.parse(nixr.store_path).basename
    assert info.references == ()


def test_all_cases_listed(cases: dict[str, tuple[Path, NixResult]]) -> None:
    assert sorted(cases) == sorted(CASE_NAMES)


def test_executable_bit_is_owner_x_as_nix(cases: dict[str, tuple[Path, NixResult]]) -> None:
    """Nix marks a file executable iff S_IXUSR: g+x or o+x alone do not count. Check nix agrees here."""
    tree = cases["tree"][0]
    for name, want in (("u-x", True), ("g-x", False), ("o-x", False), ("ro", False)):
        d = subprocess.run(["nix-store", "--dump", str(tree / name)], capture_output=True, check=True).stdout
        assert (b"executable" in d) is want, name
    store = open_store("memory://")
    for name, want in (("u-x", True), ("g-x", False), ("o-x", False), ("run.sh", True)):
        info = import_path(store, tree / name)
        assert getattr(info.node, "executable", None) is want, name


# --- blobs vs b3sum ---------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["local", "grpc"])
def blob_store_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    target, stop = make_target(request.param, tmp_path_factory.mktemp("blobs-" + request.param))
    try:
        assert isinstance(target, CliTarget)
        yield target.url
    finally:
        stop()


@pytest.mark.parametrize("size", [0, len(HELLO), 100_000, BIG])
def test_blob_put_cat_stat(size: int, blob_store_url: str, tmp_path: Path) -> None:
    data = HELLO if size == len(HELLO) else random.Random(size).randbytes(size)
    f = tmp_path / "blob"
    f.write_bytes(data)
    b3 = subprocess.run(["b3sum", "--no-names", str(f)], capture_output=True, check=True, text=True).stdout.strip()
    url = blob_store_url
    assert cli("blob", "put", "--store", url, str(f)).stdout.decode() == b3 + "\n"
    assert cli("blob", "put", "--store", url, "-", input=data).stdout.decode() == b3 + "\n"  # stdin
    assert cli("blob", "cat", "--store", url, b3).stdout == data
    assert cli("blob", "stat", "--store", url, b3).stdout.decode() == f"{size}\n"
    lines = cli("blob", "stat", "--chunks", "--store", url, b3).stdout.decode().splitlines()
    assert lines[0] == str(size)
    chunks = [(B3Digest.parse(d), int(n)) for d, n in (line.split() for line in lines[1:])]
    assert sum(n for _, n in chunks) == size
    if size:
        assert chunks
    # every listed chunk is readable by its digest and hashes to it; together they are the blob
    joined = b""
    for d, n in chunks[:8]:
        part = cli("blob", "cat", "--store", url, d.hex()).stdout
        assert len(part) == n and B3Digest.of(part) == d
        joined += part
    if len(chunks) <= 8:
        assert joined == data


def _max_rss_kib(*args: str) -> tuple[int, bytes]:
    """Run `tvix-store ARGS` under /usr/bin/time; (peak RSS in KiB, stdout)."""
    p = subprocess.run(
        ["/usr/bin/time", "-f", "%M", sys.executable, "-m", "tvix_store.cli", *args], capture_output=True, check=True
    )
    return int(p.stderr.decode().strip().splitlines()[-1]), p.stdout


def test_big_file_import_and_nar_use_bounded_memory(tmp_path: Path) -> None:
    """Import and `nar` of a 96 MiB file stay far below its size in resident memory."""
    url = local_url(tmp_path)
    f = tmp_path / "big"
    size = 96 << 20
    with open(f, "wb") as out:
        rng = random.Random(11)
        for _ in range(size >> 20):
            out.write(rng.randbytes(1 << 20))
    rss_import, out = _max_rss_kib("import", "--store", url, str(f))
    rss_nar, dump = _max_rss_kib("nar", "--store", url, out.decode().strip())
    assert len(dump) > size
    nix_dump = subprocess.run(["nix-store", "--dump", str(f)], capture_output=True, check=True).stdout
    assert dump == nix_dump
    # against the same commands on a 1-byte file (the interpreter and its libraries): the
    # 96 MiB file may add at most a third of its size
    small = tmp_path / "small"
    small.write_bytes(b"x")
    base_import, out = _max_rss_kib("import", "--store", url, str(small))
    base_nar, _ = _max_rss_kib("nar", "--store", url, out.decode().strip())
    limit = 32 << 10  # KiB
    assert rss_import - base_import < limit, f"import peak RSS {rss_import} KiB, {base_import} KiB for 1 byte"
    assert rss_nar - base_nar < limit, f"nar peak RSS {rss_nar} KiB, {base_nar} KiB for 1 byte"


def local_url(tmp: Path) -> str:
    return f"local://{tmp / 'store'}"
