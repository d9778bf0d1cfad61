"""The on-disk store (`local:///path`, pack files + index): deduplication, verification on read,
persistence, atomicity of writers, torn pack tails, fsync mode, read-ahead hints, migration
from the one-file-per-object layout, and the CLI over it."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import cli
from fixtures import (
    EMPTY_HEX,
    HELLO,
    HELLO_HEX,
    damage_object,
    object_bytes,
    object_keys,
    open_local,
    pack_bytes,
    random_bytes,
    verify,
)

from tvix_store.chunking import DEFAULT
from tvix_store.compose import open_store
from tvix_store.core.castore import Directory, FileNode
from tvix_store.core.digest import B3Digest
from tvix_store.core.errors import IntegrityError, StoreError, ValidationError
from tvix_store.core.pathinfo import PathInfo, StorePath
from tvix_store.store import Store

MIN = DEFAULT.min_size


def b3sum(data: bytes) -> str:
    """The digest as the independent `b3sum` tool computes it."""
    return subprocess.run(["b3sum", "--no-names"], input=data, capture_output=True, check=True).stdout.decode().strip()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def store(root: Path) -> Store:
    return open_store(f"local://{root}")


@pytest.mark.parametrize("size", [0, 1, MIN - 1, MIN, MIN + 1, 3 * DEFAULT.max_size + 12345])
def test_put_read_stat(store: Store, root: Path, size: int) -> None:
    data = random_bytes(size, seed=size)
    d = store.blobs.put(data)
    assert d.hex() == b3sum(data)
    chunks = store.blobs.chunks(d)
    assert chunks is not None
    assert sum(c.size for c in chunks) == size == store.blobs.size(d)
    assert b"".join(store.blobs.read_chunk(c.digest) or b"" for c in chunks) == data
    reader = store.blobs.open_read(d)
    assert reader is not None and reader.read() == data
    if size <= MIN:
        assert len(chunks) == min(size, 1)
    if size > 3 * DEFAULT.max_size:
        assert len(chunks) >= 4
    if size == 0:
        assert chunks == [] and d.hex() == EMPTY_HEX
        assert len(object_keys(root, "blobs")) == 1 and not object_keys(root, "chunks")
    elif len(chunks) == 1:
        assert size <= DEFAULT.max_size
        # a one-chunk blob is its chunk file: no record
        assert [c.digest for c in chunks] == [d]
        assert not object_keys(root, "blobs")
        assert object_bytes(root, f"chunks/{d.hex()}") == data
    else:
        assert size > MIN and len(object_keys(root, "blobs")) == 1
        for c in chunks:  # every chunk is a blob of its own
            assert store.blobs.chunks(c.digest) == [c]
            assert c.digest.hex() == b3sum(store.blobs.read_chunk(c.digest) or b"")
    assert verify(store).ok


def test_absent(store: Store) -> None:
    d = B3Digest.of(b"never stored")
    assert store.blobs.chunks(d) is None
    assert store.blobs.read_chunk(d) is None
    assert store.blobs.open_read(d) is None
    assert not store.blobs.has(d)
    assert store.directories.get(d) is None
    assert store.pathinfos.get(bytes(20)) is None


def test_similar_large_files_share_chunks(store: Store, root: Path) -> None:
    a = random_bytes(32 << 20, seed=1)
    b = bytearray(a)
    for off in (5 << 20, 17 << 20, 30 << 20):  # three bytes changed
        b[off] ^= 0xFF
    da = store.blobs.put(a)
    n_a = len(object_keys(root, "chunks"))
    db = store.blobs.put(bytes(b))
    n_b = len(object_keys(root, "chunks"))
    assert da != db
    assert n_a >= 32 << 20 >> 20  # at least one chunk per MiB
    assert n_b - n_a <= 3  # only the chunks holding a changed byte are new
    assert pack_bytes(root) <= (32 << 20) + 3 * DEFAULT.max_size + 4096  # (+ two chunk lists)
    ca, cb = store.blobs.chunks(da), store.blobs.chunks(db)
    assert ca is not None and cb is not None
    assert len({c.digest for c in ca} & {c.digest for c in cb}) >= len(ca) - 3
    reader = store.blobs.open_read(db)
    assert reader is not None and reader.read() == bytes(b)
    # putting the same blob again writes nothing new
    before = pack_bytes(root)
    store.blobs.put(a)
    assert len(object_keys(root, "chunks")) == n_b and pack_bytes(root) == before


def test_streaming_write_in_odd_pieces_gives_same_chunks(store: Store) -> None:
    data = random_bytes(5 << 20, seed=2)
    whole = store.blobs.chunks(store.blobs.put(data))
    w = store.blobs.open_write()
    off, step = 0, 1
    buf = bytearray()
    while off < len(data):  # a reused mutable buffer: the writer must copy what it keeps
        buf[:] = data[off : off + step]
        w.write(buf)
        off += step
        step = step * 7 % 100_003 + 1
    assert w.close() == B3Digest.of(data)
    assert store.blobs.chunks(w.close()) == whole


def test_reader_seek_and_partial_reads(store: Store) -> None:
    data = random_bytes(4 << 20, seed=3)
    d = store.blobs.put(data)
    r = store.blobs.open_read(d)
    assert r is not None
    for off, n in [(0, 10), (MIN - 5, 10), (len(data) - 3, 100), ((1 << 20) + 7, 2 << 20), (len(data), 5)]:
        r.seek(off)
        assert r.read(n) == data[off : off + n]
    r.seek(-4, io.SEEK_END)
    assert r.read() == data[-4:]


def test_corrupted_chunk_is_an_integrity_error(store: Store, root: Path) -> None:
    data = random_bytes(3 << 20, seed=4)
    d = store.blobs.put(data)
    chunks = store.blobs.chunks(d)
    assert chunks is not None
    victim = chunks[1].digest
    damage_object(root, f"chunks/{victim.hex()}", at=100)
    with pytest.raises(IntegrityError, match=victim.hex()):
        store.blobs.read_chunk(victim)
    r = store.blobs.open_read(d)
    assert r is not None
    assert r.read(chunks[0].size) == data[: chunks[0].size]  # chunks before it are fine
    with pytest.raises(IntegrityError):
        r.read(10)
    rep = verify(store)
    assert not rep.ok and any(victim.hex() in p for p in rep.problems)


def test_damaged_blob_record_is_detected(store: Store, root: Path) -> None:
    d = store.blobs.put(random_bytes(2 << 20, seed=5))
    damage_object(root, f"blobs/{d.hex()}", at=30)
    with pytest.raises(IntegrityError, match="damaged"):
        store.blobs.chunks(d)
    assert not verify(store).ok


def test_corrupted_directory_is_detected(store: Store, root: Path) -> None:
    f = FileNode(b"f", B3Digest.of(HELLO), len(HELLO))
    d = store.directories.put(Directory(files=(f,)))
    damage_object(root, f"directories/{d.hex()}", at=len(Directory(files=(f,)).encoded) - 1)
    with pytest.raises(IntegrityError):
        store.directories.get(d)
    assert not verify(store).ok


def test_persistence_across_reopen(root: Path) -> None:
    data = random_bytes(2 << 20, seed=6)
    with open_store(f"local://{root}") as s:
        bd = s.blobs.put(data)
        hd = s.blobs.put(HELLO)
        sub = Directory(files=(FileNode(b"hello", hd, len(HELLO)),))
        top = Directory(directories=(sub.as_node(b"sub"),), files=(FileNode(b"big", bd, len(data), True),))
        td = s.directories.put_graph([sub, top])
        size, sha = s.pathinfos.calculate_nar(top.as_node(b"x"))
        sp = StorePath.from_nar_sha256(sha, "tree")
        info = PathInfo(top.as_node(sp.basename.encode()))
        s.pathinfos.put(info)
    with open_store(f"local://{root}") as s:
        assert s.blobs.open_read(bd).read() == data  # type: ignore[union-attr]
        assert s.blobs.read_chunk(hd) == HELLO and hd.hex() == HELLO_HEX
        assert [d.digest for d in s.directories.get_recursive(td)] == [td, sub.digest]
        assert s.pathinfos.get(sp.digest) == info
        assert list(s.pathinfos.iter_all()) == [info]
        assert s.pathinfos.calculate_nar(info.node) == (size, sha)  # type: ignore[arg-type]
        assert set(s.directories.iter_digests()) == {td, sub.digest}
        assert verify(s).ok


def test_iter_digests_lists_written_blobs(store: Store) -> None:
    big = store.blobs.put(random_bytes(3 << 20, seed=7))
    small = store.blobs.put(HELLO)
    empty = store.blobs.put(b"")
    listed = set(store.blobs.iter_digests())
    assert listed == {big, small, empty}  # chunks of the big blob resolve but are not listed


def test_aborted_writer_leaves_nothing(store: Store, root: Path) -> None:
    data = random_bytes(5 << 20, seed=8)
    with pytest.raises(RuntimeError), store.blobs.open_write() as w:
        w.write(data)
        raise RuntimeError("client went away")
    w2 = store.blobs.open_write()
    w2.write(data[: 3 << 20])
    w2.abort()
    assert not object_keys(root, "chunks") and not object_keys(root, "blobs")
    assert store.blobs.chunks(B3Digest.of(data)) is None
    with pytest.raises(ValueError):
        w2.write(b"more")


def test_a_dead_writers_torn_pack_tail_is_cut_and_its_pack_reused(root: Path) -> None:
    """A pack whose writer died mid-append (bytes past its last indexed object) is sealed and its
    torn tail cut on the next open; what was committed stays readable and verifies."""
    import sqlite3

    with open_local(root) as s:
        digests = [s.blobs.put(random_bytes(5000 + i, seed=i)) for i in range(20)]
    (pack,) = (root / "packs").glob("*.pack")
    committed = pack.stat().st_size
    p = subprocess.Popen(["true"])
    p.wait()
    db = sqlite3.connect(root / "index.sqlite")
    with db:  # as if process `p` had been appending to it when it was killed
        db.execute("UPDATE packs SET sealed=0, pid=?", (p.pid,))
    db.close()
    with open(pack, "ab") as f:
        f.write(b"half of an object that never got its index row")
    with open_local(root) as s:
        assert pack.stat().st_size == committed
        assert all(s.blobs.read_chunk(d) == random_bytes(5000 + i, seed=i) for i, d in enumerate(digests))
        s.blobs.put(HELLO)  # appended to the same (adopted) pack, not a new file
        assert list((root / "packs").glob("*.pack")) == [pack]
        assert verify(s).ok


def test_open_refuses_foreign_directory_and_bad_options(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "precious.txt").write_text("not a store")
    with pytest.raises(StoreError, match="not a tvix-store directory"):
        open_store(f"local://{tmp_path / 'x'}")
    with pytest.raises(ValidationError, match="unknown option"):
        open_store(f"local://{tmp_path / 'y'}?compress=1")
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "TVIX-STORE").write_text("tvix-store local store, layout 99\n")
    with pytest.raises(StoreError, match="layout"):
        open_store(f"local://{tmp_path / 'z'}")


def _fsyncs_of_a_put(url: str, src: Path, store: Path) -> tuple[int, int]:
    """(fsyncs of pack files, fsyncs of the index) inside `store` during a real `blob put`, as
    strace sees them (`-y` names the path behind each descriptor)."""
    log = src.with_suffix(".strace")
    subprocess.run(
        [
            *("strace", "-f", "-qq", "-y", "-e", "trace=fsync,fdatasync", "-o", str(log)),
            *(sys.executable, "-m", "tvix_store.cli", "blob", "put", "--store", url, str(src)),
        ],
        check=True,
        capture_output=True,
    )
    packs = index = 0
    for path in re.findall(r"(?:fsync|fdatasync)\(\d+<([^>]*)>", log.read_text()):
        if path.startswith(str(store / "packs")):
            packs += 1
        elif path.startswith(str(store / "index.sqlite")):
            index += 1
    return packs, index


def test_fsync_mode_really_fsyncs_packs_and_the_index(tmp_path: Path) -> None:
    """Observed from outside: with `?fsync=1` the pack is fdatasync'ed before the objects in it
    are indexed, and the index commits durably; without, nothing is (the default trades
    power-loss durability for speed)."""
    data = random_bytes(8 << 20, seed=9)  # many chunks and a chunk list
    src = tmp_path / "f"
    src.write_bytes(data)
    packs, index = _fsyncs_of_a_put(f"local://{tmp_path / 'durable'}?fsync=1", src, tmp_path / "durable")
    with open_store(f"local://{tmp_path / 'durable'}") as s:
        chunks = s.blobs.chunks(B3Digest.of(data))
        assert chunks is not None and len(chunks) > 1
        assert s.blobs.open_read(B3Digest.of(data)).read() == data  # type: ignore[union-attr]
    # before each chunk's index row and the chunk list's: a pack fsync; the index: per commit
    assert packs >= len(chunks) + 1 and index >= len(chunks) + 1, (packs, index)
    # without: no pack is ever synced; SQLite syncs its files when it creates them and at
    # checkpoints, never per object
    packs, index = _fsyncs_of_a_put(f"local://{tmp_path / 'fast'}", src, tmp_path / "fast")
    assert packs == 0 and index <= 8 < len(chunks) // 2, (packs, index, len(chunks))


def test_a_store_of_the_one_file_per_object_layout_is_migrated_on_open(tmp_path: Path) -> None:
    """A store written in layout 1 (one file per object, as earlier versions wrote it) is moved
    into packs on its first open, losing nothing: same store paths, same NARs, verify passes,
    no object file left."""
    from fixtures import make_tree, nix_dump

    from tvix_store.blobservice.objects import ObjectBlobService
    from tvix_store.directoryservice.objects import ObjectDirectoryService
    from tvix_store.importer import import_path
    from tvix_store.objects.files import FileObjectStore
    from tvix_store.pathinfoservice.objects import ObjectPathInfoService

    root = tmp_path / "old"
    tree = make_tree(tmp_path / "tree", seed=3)
    (tree / "big.bin").write_bytes(random_bytes(3 << 20, seed=3))
    old = FileObjectStore(root)
    b, d = ObjectBlobService(old), ObjectDirectoryService(old)
    legacy = Store(b, d, ObjectPathInfoService(old, b, d))
    info = import_path(legacy, tree)
    legacy.close()
    n_files = sum(1 for p in root.rglob("*") if p.is_file() and p.parent.name != "tmp")
    assert (root / "TVIX-STORE").read_text().startswith("tvix-store local store, layout 1")
    sp = str(info.store_path)
    assert cli("nar", "--store", f"local://{root}", sp).stdout == nix_dump(tree)
    assert "layout 2" in (root / "TVIX-STORE").read_text()
    assert not any((root / kind).exists() for kind in ("chunks", "blobs", "directories", "pathinfos", "tmp"))
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert len(files) < 10 < n_files, files
    with open_local(root) as s:
        assert verify(s).ok
        assert s.pathinfos.get(info.store_path.digest) == info


def test_cli_blob_commands_over_local_store(tmp_path: Path) -> None:
    data = random_bytes((2 << 20) + 3, seed=10)
    (tmp_path / "f").write_bytes(data)
    url = f"local://{tmp_path / 's'}"
    digest = cli("blob", "put", "--store", url, str(tmp_path / "f")).stdout.decode().strip()
    assert digest == b3sum(data)
    assert cli("blob", "cat", "--store", url, digest).stdout == data
    lines = cli("blob", "stat", "--chunks", "--store", url, digest).stdout.decode().split("\n")
    assert lines[0] == str(len(data))
    chunk_lines = [ln.split() for ln in lines[1:] if ln]
    assert len(chunk_lines) >= 3 and sum(int(n) for _, n in chunk_lines) == len(data)
    first_hex, first_size = chunk_lines[0]
    assert cli("blob", "cat", "--store", url, first_hex).stdout == data[: int(first_size)]


def test_advise_warms_objects_in_the_background_and_is_bounded(store: Store) -> None:
    """`advise` returns at once, skips what is not stored, and drops hints past its bound."""
    from tvix_store.objects.packs import MAX_ADVISED, PackObjectStore

    objects = store.blobs.objects  # type: ignore[attr-defined]
    assert isinstance(objects, PackObjectStore)
    digests = [store.blobs.put(random_bytes(1000 + i, seed=i)) for i in range(40)]
    absent = B3Digest.of(b"not stored")
    store.blobs.advise([*digests, absent])
    deadline = time.monotonic() + 10
    while objects.advised:  # every hinted file handled (absent ones skipped, no error)
        assert time.monotonic() < deadline, "advise did not finish"
        time.sleep(0.01)
    # past the bound a hint is dropped, not queued: the counter never exceeds it
    store.blobs.advise([absent] * (MAX_ADVISED + 1))
    assert objects.advised == 0
    for d in digests:
        assert store.blobs.read_chunk(d) is not None
