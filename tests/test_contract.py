"""One contract suite over every backend and combinator (memory, local, the gRPC client to a
real daemon, the cache over memory and over a real daemon):
the interface contracts written in the docstrings of `tvix_store.blobservice`,
`tvix_store.directoryservice` and `tvix_store.pathinfoservice`."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from fixtures import EMPTY_HEX, HELLO, HELLO_HEX, ODD_NAMES, materialize, nix_nar_hash, random_bytes

from tvix_store.core.castore import Directory, DirectoryNode, FileNode, SymlinkNode
from tvix_store.core.digest import B3Digest
from tvix_store.core.errors import NotFoundError, ValidationError
from tvix_store.core.pathinfo import NarInfo, PathInfo, StorePath
from tvix_store.store import Store

SIZES = [0, 1, len(HELLO), 100_000, (3 << 20) + 17]


def blob(n: int) -> bytes:
    return HELLO if n == len(HELLO) else random_bytes(n, seed=n)


# --- BlobService ------------------------------------------------------------------------


def test_known_digests(store: Store) -> None:
    assert store.blobs.put(HELLO).hex() == HELLO_HEX
    assert store.blobs.put(b"").hex() == EMPTY_HEX


@pytest.mark.parametrize("size", SIZES)
def test_blob_put_chunks_read(store: Store, size: int) -> None:
    data = blob(size)
    d = store.blobs.put(data)
    assert d == B3Digest.of(data)
    assert store.blobs.has(d)
    assert store.blobs.size(d) == size
    chunks = store.blobs.chunks(d)
    assert chunks is not None
    if size == 0:
        assert chunks == []
    assert sum(c.size for c in chunks) == size
    parts = []
    for c in chunks:
        part = store.blobs.read_chunk(c.digest)
        assert part is not None and len(part) == c.size and B3Digest.of(part) == c.digest
        parts.append(part)
        # every chunk is itself a readable blob
        sub = store.blobs.chunks(c.digest)
        assert sub is not None and sum(s.size for s in sub) == c.size
        r = store.blobs.open_read(c.digest)
        assert r is not None and r.read() == part
    assert b"".join(parts) == data
    reader = store.blobs.open_read(d)
    assert reader is not None and reader.read() == data


def test_blob_reader_seek_and_partial_reads(store: Store) -> None:
    data = blob((3 << 20) + 17)
    d = store.blobs.put(data)
    r = store.blobs.open_read(d)
    assert r is not None
    assert r.read(5) == data[:5]
    assert r.read(7) == data[5:12]
    for off, n in [(1 << 20, 100), (len(data) - 10, 100), (12345, 2 << 20), (0, 1)]:
        assert r.seek(off) == off
        assert r.read(n) == data[off : off + n]
    r.seek(-3, io.SEEK_END)
    assert r.read() == data[-3:]
    r.seek(len(data) + 5)
    assert r.read(10) == b""


def test_batch_methods_answer_in_order(store: Store) -> None:
    """`put_many` and `has_many` do what the single calls do, in order; `read_many` answers each
    once (in any order), absent blobs as such (a remote keeps the calls in flight together)."""
    blobs = [blob(n) for n in (0, 1, len(HELLO), 100_000)] + [random_bytes(3000 + i, seed=i) for i in range(70)]
    digests = store.blobs.put_many(blobs)
    assert digests == [B3Digest.of(b) for b in blobs]
    absent = [B3Digest.of(b"absent %d" % i) for i in range(3)]
    asked = [digests[3], absent[0], *digests[4:], absent[1], digests[0], absent[2]]
    assert store.blobs.has_many(asked) == [d not in absent for d in asked]
    got = list(store.blobs.read_many(asked))
    assert sorted(d for d, _ in got) == sorted(asked)
    by_digest = dict(zip(digests, blobs, strict=True))
    for d, data in got:
        assert data == (None if d in absent else by_digest[d])


def test_blob_absent_is_none(store: Store) -> None:
    d = B3Digest.of(b"not in any store")
    assert store.blobs.chunks(d) is None
    assert store.blobs.read_chunk(d) is None
    assert store.blobs.open_read(d) is None
    assert store.blobs.size(d) is None
    assert not store.blobs.has(d)


def test_empty_blob(store: Store) -> None:
    d = store.blobs.put(b"")
    assert store.blobs.chunks(d) == []
    assert store.blobs.size(d) == 0
    r = store.blobs.open_read(d)
    assert r is not None and r.read() == b""


def test_writer_streams_in_pieces_and_close_is_idempotent(store: Store) -> None:
    data = blob(100_000)
    w = store.blobs.open_write()
    for off in range(0, len(data), 9999):
        assert w.write(data[off : off + 9999]) == len(data[off : off + 9999])
    d = w.close()
    assert d == B3Digest.of(data) == w.close()
    assert store.blobs.open_read(d).read() == data  # type: ignore[union-attr]


@pytest.mark.parametrize("size", [100, (2 << 20) + 1])
def test_aborted_writer_stores_nothing(store: Store, size: int) -> None:
    data = random_bytes(size, seed=99)
    d = B3Digest.of(data)
    w = store.blobs.open_write()
    w.write(data)
    w.abort()
    with pytest.raises(KeyError), store.blobs.open_write() as w2:
        w2.write(data)
        raise KeyError("caller failed")
    assert not store.blobs.has(d)
    assert store.blobs.chunks(d) is None


# --- DirectoryService -------------------------------------------------------------------


def file_node(name: bytes, data: bytes, executable: bool = False) -> FileNode:
    return FileNode(name, B3Digest.of(data), len(data), executable)


def put_file_blobs(store: Store) -> None:
    """The blobs the Directories of these tests name: a daemon refuses a Directory naming a blob
    it lacks (tests/test_admission.py), so blobs go first, as every importer sends them."""
    for data in (HELLO, b"", b"x", b"y", b"u"):
        store.blobs.put(data)


def diamond() -> tuple[Directory, Directory, Directory, Directory]:
    """root → a, b; a → c; b → c (c reachable twice)."""
    c = Directory(files=(file_node(b"hello", HELLO),), symlinks=(SymlinkNode(b"l", b"hello"),))
    a = Directory(directories=(c.as_node(b"c"),))
    b = Directory(directories=(c.as_node(b"c2"),), files=(file_node(b"e", b""),))
    root = Directory(directories=(a.as_node(b"a"), b.as_node(b"b")))
    return c, a, b, root


def test_directory_put_get(store: Store) -> None:
    put_file_blobs(store)
    c, a, b, root = diamond()
    assert store.directories.put(c) == c.digest
    assert store.directories.get(c.digest) == c
    assert store.directories.has(c.digest)
    assert store.directories.put(Directory()) == Directory().digest
    assert store.directories.get(Directory().digest) == Directory()
    assert store.directories.get(B3Digest.of(b"nope")) is None


def test_put_graph_and_get_recursive_bfs(store: Store) -> None:
    put_file_blobs(store)
    c, a, b, root = diamond()
    assert store.directories.put_graph([c, a, c, b, root]) == root.digest  # resending c is harmless
    got = list(store.directories.get_recursive(root.digest))
    assert got == [root, a, b, c]  # breadth-first, each once, after one that references it
    assert list(store.directories.get_recursive(a.digest)) == [a, c]
    assert list(store.directories.get_recursive(B3Digest.of(b"absent"))) == []


def test_directory_put_can_reference_stored_directories(store: Store) -> None:
    put_file_blobs(store)
    c, a, b, root = diamond()
    store.directories.put_graph([c, a])
    store.directories.put_graph([b, root])  # c and a are already stored
    assert list(store.directories.get_recursive(root.digest)) == [root, a, b, c]


def test_unknown_reference_rejected(store: Store) -> None:
    put_file_blobs(store)
    c, a, _, _ = diamond()
    with pytest.raises(ValidationError):
        store.directories.put(a)
    assert store.directories.get(a.digest) is None


def test_size_mismatch_rejected(store: Store) -> None:
    put_file_blobs(store)
    c, _, _, _ = diamond()
    store.directories.put(c)
    bad = Directory(directories=(DirectoryNode(b"c", c.digest, c.size + 1),))
    with pytest.raises(ValidationError):
        store.directories.put(bad)
    assert store.directories.get(bad.digest) is None


def test_multiple_roots_rejected_and_nothing_stored(store: Store) -> None:
    put_file_blobs(store)
    x = Directory(files=(file_node(b"x", b"x"),))
    y = Directory(files=(file_node(b"y", b"y"),))
    with pytest.raises(ValidationError):
        store.directories.put_graph([x, y])
    assert store.directories.get(x.digest) is None and store.directories.get(y.digest) is None


def test_rejected_graph_stores_nothing(store: Store) -> None:
    put_file_blobs(store)
    c, a, _, _ = diamond()
    unknown = Directory(files=(file_node(b"u", b"u"),))
    bad_root = Directory(directories=(a.as_node(b"a"), unknown.as_node(b"u")))  # unknown never sent
    with pytest.raises(ValidationError):
        store.directories.put_graph([c, a, bad_root])
    for d in (c, a, bad_root):
        assert store.directories.get(d.digest) is None


def test_invalid_directory_rejected(store: Store) -> None:
    unsorted = Directory(files=(file_node(b"b", b""), file_node(b"a", b"")))
    dup = Directory(files=(file_node(b"a", b""),), symlinks=(SymlinkNode(b"a", b"t"),))
    for d in (unsorted, dup):
        with pytest.raises(ValidationError):
            store.directories.put(d)
        assert store.directories.get(d.digest) is None


# --- PathInfoService --------------------------------------------------------------------


def tree_objects() -> tuple[Directory, list[Directory], dict[bytes, bytes]]:
    """A small tree with a multi-chunk executable, the diamond below it, a symlink, and names
    whose bytewise order differs from locale order: (top, Directories leaves first, blobs)."""
    big = blob((3 << 20) + 17)
    datas = {bytes(B3Digest.of(x)): x for x in (big, HELLO, b"")}
    odd = [FileNode(n, B3Digest.of(b""), 0) for n in ODD_NAMES]
    c, a, b, root = diamond()
    top = Directory.from_nodes(
        [
            root.as_node(b"d"),
            FileNode(b"big", B3Digest.of(big), len(big), True),
            FileNode(b"hello", B3Digest.of(HELLO), len(HELLO)),
            SymlinkNode(b"link", b"../x"),
            *odd,
        ]
    )
    return top, [c, a, b, root, top], datas


def put_tree(store: Store) -> tuple[DirectoryNode, Directory]:
    """`tree_objects`, all of it stored."""
    top, graph, datas = tree_objects()
    for data in datas.values():
        store.blobs.put(data)
    store.directories.put_graph(graph)
    return top.as_node(b"x"), top


def test_calculate_nar(store: Store, tmp_path: Path) -> None:
    """The NAR size and sha256 of what the real `nix-store --dump` writes for the same tree."""
    node, top = put_tree(store)
    _, graph, datas = tree_objects()
    dirs = {bytes(d.digest): d for d in graph}
    assert store.pathinfos.calculate_nar(node) == nix_nar_hash(materialize(node, tmp_path, datas, dirs))
    for leaf in (top.files[1].renamed(b"f"), top.files[0].renamed(b"exe"), SymlinkNode(b"l", b"target")):
        assert store.pathinfos.calculate_nar(leaf) == nix_nar_hash(materialize(leaf, tmp_path, datas, dirs))


def test_calculate_nar_missing_is_not_found(store: Store) -> None:
    with pytest.raises(NotFoundError):
        store.pathinfos.calculate_nar(FileNode(b"f", B3Digest.of(b"absent"), 6))
    with pytest.raises(NotFoundError):
        store.pathinfos.calculate_nar(DirectoryNode(b"d", B3Digest.of(b"absent dir"), 1))


def test_pathinfo_put_get(store: Store) -> None:
    node, top = put_tree(store)
    size, sha = store.pathinfos.calculate_nar(node)
    sp = StorePath.from_nar_sha256(sha, "tree")
    ref = StorePath.from_nar_sha256(bytes(32), "dep")
    info = PathInfo(
        top.as_node(sp.basename.encode()),
        references=(ref.digest,),
        narinfo=NarInfo(size, sha, reference_names=(ref.basename,)),
    )
    assert store.pathinfos.put(info).node == info.node
    got = store.pathinfos.get(sp.digest)
    assert got is not None
    assert got.node == info.node and got.references == info.references
    assert got.narinfo is not None and got.narinfo.nar_sha256 == sha and got.narinfo.nar_size == size
    assert got.narinfo.reference_names == (ref.basename,)
    assert store.pathinfos.get(bytes(20)) is None
    with pytest.raises(ValidationError):
        store.pathinfos.get(bytes(19))


def test_pathinfo_validation_rejects(store: Store) -> None:
    node = FileNode(b"f", B3Digest.of(HELLO), len(HELLO))
    sp = StorePath.from_nar_sha256(bytes(32), "ok")
    good_name = node.renamed(sp.basename.encode())
    other = StorePath.from_nar_sha256(bytes([1]) * 32, "other")
    bad = [
        PathInfo(None),
        PathInfo(node),  # root node name not a store path basename
        PathInfo(node.renamed(b"e" * 32 + b"-name")),  # "e" is not a nixbase32 digit
        PathInfo(good_name, references=(bytes(19),)),
        PathInfo(good_name, references=(other.digest,), narinfo=NarInfo(1, bytes(32), reference_names=())),
        PathInfo(good_name, references=(other.digest,), narinfo=NarInfo(1, bytes(32), reference_names=(sp.basename,))),
        PathInfo(good_name, narinfo=NarInfo(1, bytes(31))),
    ]
    for info in bad:
        with pytest.raises(ValidationError):
            store.pathinfos.put(info)
    assert store.pathinfos.get(sp.digest) is None
