"""`tvix-store import` / `tvix_store.importer`: what gets written, and refusals.

- A re-import of an unchanged tree writes nothing new: on a local store no file under
  the store directory is created or touched; against a remote (a real daemon) and in
  memory, an in-process counting double around the store's services sees no upload
  (blob writes, Directory puts, PathInfo puts) the second time.
- Stat before put: blobs the store already has are not uploaded.
- Special files, bad store path names:
  a clear error naming the path, exit 1, no traceback, no PathInfo.
- Failures in the upload threads reach the caller; nothing is registered.
"""

from __future__ import annotations

import hashlib
import os
import pty
import random
import socket
import stat
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import blake3
import pytest
from conftest import Daemon, cli, one_line_error
from fixtures import make_tree

from tvix_store import importer, nar
from tvix_store.blobservice import BlobService, BlobWriter
from tvix_store.compose import open_store
from tvix_store.core.castore import Directory, Node
from tvix_store.core.chunks import ChunkMeta
from tvix_store.core.digest import B3Digest
from tvix_store.core.errors import StoreError, ValidationError
from tvix_store.core.pathinfo import PathInfo
from tvix_store.directoryservice import DirectoryService
from tvix_store.importer import import_path, nix_basename
from tvix_store.pathinfoservice import PathInfoService
from tvix_store.store import Store

# --- an in-process counting double around a store's services -----------------------------------


class CountingBlobs(BlobService):
    def __init__(self, inner: BlobService, fail_puts: bool = False) -> None:
        self.inner = inner
        self.writes = 0
        self.bytes = 0
        self.has_calls = 0
        self.fail_puts = fail_puts

    def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        return self.inner.chunks(digest)

    def has(self, digest: B3Digest) -> bool:
        self.has_calls += 1
        return self.inner.has(digest)

    def read_chunk(self, digest: B3Digest) -> bytes | None:
        return self.inner.read_chunk(digest)

    def open_write(self) -> BlobWriter:
        self.writes += 1
        if self.fail_puts:
            raise StoreError("injected failure: blob writes are refused")
        outer = self
        w = self.inner.open_write()

        class Counting(BlobWriter):
            def write(self, data: bytes | memoryview) -> int:
                outer.bytes += len(data)
                return w.write(data)

            def close(self) -> B3Digest:
                return w.close()

            def abort(self) -> None:
                w.abort()

        return Counting()


class CountingDirectories(DirectoryService):
    def __init__(self, inner: DirectoryService) -> None:
        self.inner = inner
        self.graph_puts: list[int] = []

    def get(self, digest: B3Digest) -> Directory | None:
        return self.inner.get(digest)

    def has(self, digest: B3Digest) -> bool:
        return self.inner.has(digest)

    def _store(self, directory: Directory) -> None:  # pragma: no cover - everything goes through put_graph
        raise AssertionError("not used")

    def put_graph(self, directories: Iterable[Directory]) -> B3Digest:
        dirs = list(directories)
        self.graph_puts.append(len(dirs))
        return self.inner.put_graph(dirs)


class CountingPathInfos(PathInfoService):
    def __init__(self, inner: PathInfoService) -> None:
        self.inner = inner
        self.puts = 0
        self.on_get: Callable[[], None] | None = None  # fault injection: runs between the two phases

    def get(self, output_hash: bytes) -> PathInfo | None:
        if self.on_get is not None:
            self.on_get()
        return self.inner.get(output_hash)

    def put(self, info: PathInfo) -> PathInfo:
        self.puts += 1
        return self.inner.put(info)

    def calculate_nar(self, node: Node) -> tuple[int, bytes]:
        return self.inner.calculate_nar(node)


Counted = tuple[Store, CountingBlobs, CountingDirectories, CountingPathInfos]


def counting(store: Store, fail_puts: bool = False) -> Counted:
    b = CountingBlobs(store.blobs, fail_puts)
    d = CountingDirectories(store.directories)
    p = CountingPathInfos(store.pathinfos)
    return Store(b, d, p, store.url), b, d, p


def content_digests(root: Path, min_size: int = 0) -> set[bytes]:
    """The distinct blake3 digests of regular files under root (computed here, independently)."""
    out = set()
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath, f)
            if p.is_file() and not p.is_symlink() and p.stat().st_size >= min_size:
                out.add(blake3.blake3(p.read_bytes()).digest())
    return out


def rich_tree(root: Path, big: bool = True) -> Path:
    make_tree(root)
    rng = random.Random(3)
    if big:
        (root / "big.bin").write_bytes(rng.randbytes(3 << 20))  # streamed (> 1 MiB)
    for i in range(150):  # enough small files for several upload batches
        d = root / "many" / f"d{i % 7}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}").write_bytes(rng.randbytes(rng.randint(0, 3000)))
    (root / "dup-a").write_bytes(b"dup\n")
    (root / "dup-b").write_bytes(b"dup\n")
    return root


# --- re-import writes nothing new ------------------------------------------------------------------


@pytest.fixture(params=["memory", "grpc"])
def service_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "memory":
        yield open_store("memory://")
        return
    d = Daemon(f"local://{tmp_path / 'daemon-store'}")
    s = open_store(d.url)
    try:
        yield s
    finally:
        s.close()
        d.stop()


def test_reimport_uploads_nothing(service_store: Store, tmp_path: Path) -> None:
    tree = rich_tree(tmp_path / "tree")
    want = content_digests(tree)
    s1, b1, d1, p1 = counting(service_store)
    first = import_path(s1, tree)
    assert b1.writes == len(want)  # each distinct blob exactly once
    assert d1.graph_puts and len(d1.graph_puts) == 1  # all Directories in ONE put_graph call
    assert p1.puts == 1
    s2, b2, d2, p2 = counting(service_store)
    second = import_path(s2, tree)
    assert second.node == first.node and second.narinfo == first.narinfo
    assert (b2.writes, b2.bytes, d2.graph_puts, p2.puts) == (0, 0, [], 0)
    # small blobs are not even asked about (an equal PathInfo is stored only after everything it
    # references); big ones are asked once each, during the walk, before deciding to upload
    assert b2.has_calls == len(content_digests(tree, min_size=importer.SMALL_FILE + 1)) == 1


def test_stat_before_put_skips_present_blobs(tmp_path: Path) -> None:
    tree = rich_tree(tmp_path / "tree")
    store = open_store("memory://")
    present = [(tree / "a.txt").read_bytes(), (tree / "big.bin").read_bytes()]
    for data in present:
        store.blobs.put(data)
    s, b, _, _ = counting(store)
    import_path(s, tree)
    assert b.writes == len(content_digests(tree)) - len(present)
    assert b.bytes == sum(len(x) for x in _unique_contents(tree)) - sum(len(x) for x in present)


def _unique_contents(root: Path) -> list[bytes]:
    seen: dict[bytes, bytes] = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath, f)
            if p.is_file() and not p.is_symlink():
                data = p.read_bytes()
                seen[blake3.blake3(data).digest()] = data
    return list(seen.values())


def _snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            st = os.lstat(os.path.join(dirpath, n))
            out[os.path.join(dirpath, n)] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return out


def test_reimport_into_local_store_writes_nothing(tmp_path: Path) -> None:
    tree = rich_tree(tmp_path / "tree")
    url = f"local://{tmp_path / 'store'}"
    first = cli("import", "--store", url, str(tree)).stdout
    before = _snapshot(tmp_path / "store")
    assert before
    second = cli("import", "--store", url, str(tree)).stdout
    assert second == first
    assert _snapshot(tmp_path / "store") == before


# --- refusals ---------------------------------------------------------------------------------------


def _assert_one_line_error(p: subprocess.CompletedProcess[bytes], *needles: str, code: int = 1) -> str:
    line = one_line_error(p, code, *needles)
    assert p.stdout == b""
    return line


def _make_special(kind: str, p: Path) -> None:
    if kind == "fifo":
        os.mkfifo(p)
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(p))
        s.close()
    else:
        os.mknod(p, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # like /dev/null


@pytest.mark.parametrize("kind", ["fifo", "socket", "device"])
@pytest.mark.parametrize("where", ["inside", "root"])
def test_special_file_is_refused(kind: str, where: str, tmp_path: Path) -> None:
    if kind == "device" and os.geteuid() != 0:
        pytest.skip("mknod needs root")
    tree = make_tree(tmp_path / "tree")
    bad = tree / "sub" / "special" if where == "inside" else tmp_path / "special"
    _make_special(kind, bad)
    p = cli("import", "--store", "memory://", str(tree if where == "inside" else bad), check=False, timeout=30)
    kind_word = {"fifo": "FIFO", "socket": "socket", "device": "device"}[kind]
    _assert_one_line_error(p, str(bad), kind_word)
    store = open_store("memory://")
    with pytest.raises(ValidationError, match=kind_word):
        import_path(store, tree if where == "inside" else bad)
    assert list(store.pathinfos.iter_all()) == []


@pytest.mark.nix
def test_non_utf8_names_and_targets_import(tmp_path: Path) -> None:
    """Names and symlink targets are bytes: a tree with names and a target that are not UTF-8
    imports, with the NAR `nix-store --dump` writes (its size and sha256)."""
    tree = make_tree(tmp_path / "tree")
    Path(os.fsdecode(os.fsencode(tree / "sub") + b"/bytes-\xff\xfe")).write_bytes(b"x")
    os.symlink(b"\xff-target", os.fsencode(tree / "link-\xe9"))
    nar_bytes = subprocess.run(["nix-store", "--dump", str(tree)], check=True, capture_output=True).stdout
    store = open_store("memory://")
    info = import_path(store, tree)
    assert info.narinfo is not None
    assert (info.narinfo.nar_size, info.narinfo.nar_sha256) == (len(nar_bytes), hashlib.sha256(nar_bytes).digest())
    assert b"".join(nar.render(info.node, store.blobs, store.directories)) == nar_bytes  # type: ignore[arg-type]


def _sparse(p: Path, size: int) -> None:
    with open(p, "wb") as f:
        f.truncate(size)


@pytest.mark.parametrize("name", ["has space", "ünï", "semi;colon"])
def test_bad_store_path_name_is_refused(name: str, tmp_path: Path) -> None:
    f = tmp_path / name
    f.write_bytes(b"x")
    p = cli("import", "--store", "memory://", str(f), check=False)
    _assert_one_line_error(p, str(f), "name")


def test_trailing_slashes_follow_nix(tmp_path: Path) -> None:
    assert nix_basename("a/b/") == "b"
    assert nix_basename("a/b") == "b"
    assert nix_basename("b") == "b"
    assert nix_basename("a//") == ""
    assert nix_basename("/") == ""
    d = tmp_path / "dir"
    d.mkdir()
    p = cli("import", "--store", "memory://", f"{d}//", check=False)
    _assert_one_line_error(p, "name")
    out = cli("import", "--store", "memory://", f"{d}/").stdout.decode()
    assert out.strip().endswith("-dir")


def test_nonexistent_path(tmp_path: Path) -> None:
    p = cli("import", "--store", "memory://", str(tmp_path / "nope"), check=False)
    _assert_one_line_error(p, str(tmp_path / "nope"), "No such file")


def test_several_paths_print_one_line_each_and_stop_at_first_error(tmp_path: Path) -> None:
    a = make_tree(tmp_path / "a")
    b = tmp_path / "b.txt"
    b.write_bytes(b"b")
    p = cli("import", "--store", "memory://", str(a), str(b))
    lines = p.stdout.decode().splitlines()
    assert len(lines) == 2 and lines[0].endswith("-a") and lines[1].endswith("-b.txt")
    p = cli("import", "--store", "memory://", str(b), str(tmp_path / "nope"), check=False)
    assert p.returncode == 1
    assert p.stdout.decode().splitlines() == [lines[1]]


# --- failures inside the upload machinery --------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_upload_failure_reaches_caller_and_registers_nothing(workers: int, tmp_path: Path) -> None:
    tree = rich_tree(tmp_path / "tree", big=False)  # the small files' upload phase fails
    store = open_store("memory://")
    s, b, d, p = counting(store, fail_puts=True)
    with pytest.raises(StoreError, match="injected"):
        import_path(s, tree, workers=workers)
    assert b.writes >= 1
    assert d.graph_puts == [] and p.puts == 0
    assert list(store.pathinfos.iter_all()) == []


def test_big_file_upload_failure(tmp_path: Path) -> None:
    f = tmp_path / "big"
    f.write_bytes(random.Random(5).randbytes(importer.SMALL_FILE * 3 + 5))
    store = open_store("memory://")
    s, _, _, p = counting(store, fail_puts=True)
    with pytest.raises(StoreError, match="injected"):
        import_path(s, f)
    assert p.puts == 0


@pytest.mark.nix
@pytest.mark.parametrize("keep", [0, 10_000])
def test_small_files_read_again_beyond_memory_budget(
    keep: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(importer.walk, "KEEP_BYTES", keep)
    tree = rich_tree(tmp_path / "tree", big=False)
    store = open_store("memory://")
    info = import_path(store, tree)
    assert info.node is not None
    dump = subprocess.run(["nix-store", "--dump", str(tree)], capture_output=True, check=True).stdout
    assert b"".join(nar.render(info.node, store.blobs, store.directories)) == dump


@pytest.mark.parametrize("keep", [0, importer.KEEP_BYTES])
def test_file_changed_between_hashing_and_upload(keep: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file rewritten after it was hashed: read again (or kept) bytes must not be stored under a wrong name."""
    monkeypatch.setattr(importer.walk, "KEEP_BYTES", keep)
    tree = rich_tree(tmp_path / "tree", big=False)
    victim = tree / "sub" / "x"
    s, _, _, p = counting(open_store("memory://"))
    p.on_get = lambda: victim.write_bytes(b"changed behind our back")
    if keep:  # the bytes hashed are the bytes stored: consistent, whatever the file says now
        info = import_path(s, tree)
        assert info.node is not None
        assert b"changed behind" not in b"".join(nar.render(info.node, s.blobs, s.directories))
        return
    with pytest.raises(StoreError, match=f"{victim}: file changed while being imported"):
        import_path(s, tree)
    assert p.puts == 0


# --- progress -------------------------------------------------------------------------------------


def test_progress_only_on_a_terminal(tmp_path: Path) -> None:
    tree = rich_tree(tmp_path / "tree")
    quiet = cli("import", "--store", "memory://", str(tree))
    assert quiet.stderr == b""
    master, slave = pty.openpty()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "tvix_store.cli", "import", "--store", "memory://", str(tree)],
            stdout=subprocess.PIPE,
            stderr=slave,
            timeout=60,
        )
        os.close(slave)
        slave = -1
        out = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the other side is closed and drained
                break
            if not chunk:
                break
            out += chunk
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    assert proc.returncode == 0
    assert proc.stdout == quiet.stdout
    text = out.decode(errors="replace")
    # a tqdm bar: the total (the tree's size) known, so a percentage and a rate
    assert "\r" in text and "import tree" in text and "%|" in text and "B/s" in text, text
    assert "\n" not in text.replace("\r\n", "")  # one line, rewritten in place
