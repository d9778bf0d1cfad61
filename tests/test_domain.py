"""Unit tests of the domain modules: digest, castore, pathinfo, nixbase32, wire.

Expected values come from the spec (PROTOCOL.md's two example digests), from the real
tools (`b3sum`, `nix-hash`, `nix-store`), or from an independent computation (the
protobuf library's own encoder, a recursive count written here).
"""

from __future__ import annotations

import base64
import random
import subprocess
from pathlib import Path

import pytest
from fixtures import EMPTY_HEX, HELLO, HELLO_HEX

from tvix_store.core import nixbase32
from tvix_store.core.castore import (
    EMPTY_DIRECTORY,
    Directory,
    DirectoryNode,
    FileNode,
    SymlinkNode,
)
from tvix_store.core.chunks import ChunkMeta
from tvix_store.core.digest import B3Digest
from tvix_store.core.errors import ValidationError
from tvix_store.core.pathinfo import NarInfo, PathInfo, Signature, StorePath
from tvix_store.directoryservice.memory import MemoryDirectoryService
from tvix_store.protocol import wire
from tvix_store.protocol.g1 import castore_pb2, pathinfo_pb2

RNG_SEED = 1234


def rdigest(rng: random.Random) -> B3Digest:
    return B3Digest(rng.randbytes(32))


# --- B3Digest ------------------------------------------------------------------------------


def test_digest_spec_examples() -> None:
    assert B3Digest.of(b"").hex() == EMPTY_HEX
    assert B3Digest.of(HELLO).hex() == HELLO_HEX
    assert str(B3Digest.of(HELLO)) == HELLO_HEX


def test_digest_matches_b3sum(tmp_path: Path) -> None:
    data = random.Random(1).randbytes(3 << 20)  # > 1 MiB: the multithreaded path of B3Digest.of
    f = tmp_path / "blob"
    f.write_bytes(data)
    out = subprocess.run(["b3sum", "--no-names", str(f)], capture_output=True, check=True, text=True).stdout.strip()
    assert B3Digest.of(data).hex() == out
    assert B3Digest.of(data[:100]).hex() != out


@pytest.mark.parametrize("n", [0, 1, 31, 33, 64])
def test_digest_length_checked(n: int) -> None:
    with pytest.raises(ValidationError, match="length"):
        B3Digest(b"\x01" * n)


def test_digest_is_bytes_and_idempotent() -> None:
    d = B3Digest(bytes(range(32)))
    assert bytes(d) == bytes(range(32))
    assert B3Digest(d) is d
    assert d.b3_base64() == "b3:" + base64.b64encode(bytes(range(32))).decode()


def _digest_with_plus_and_slash() -> B3Digest:
    rng = random.Random(RNG_SEED)
    while True:
        d = rdigest(rng)
        s = base64.b64encode(d).decode()
        if "+" in s and "/" in s:
            return d


def test_digest_parse_forms() -> None:
    d = _digest_with_plus_and_slash()
    std = base64.b64encode(d).decode()
    url = base64.urlsafe_b64encode(d).decode()
    assert std.endswith("=") and url != std
    for text in [
        d.hex(),
        d.hex().upper(),
        "b3:" + std,
        "b3:" + std.rstrip("="),
        std,
        std.rstrip("="),
        url,
        url.rstrip("="),
        f"  {d.hex()}\n",
    ]:
        assert B3Digest.parse(text) == d, text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "zz",
        EMPTY_HEX[:-1],  # 63 hex chars
        EMPTY_HEX + "0",  # 65
        "b3:",
        base64.b64encode(b"\x00" * 31).decode(),
        base64.b64encode(b"\x00" * 33).decode(),
        "b3:" + "!" * 43,
        "g" * 64,
    ],
)
def test_digest_parse_rejects(text: str) -> None:
    with pytest.raises(ValidationError):
        B3Digest.parse(text)


def test_digest_from_hex_strict() -> None:
    assert B3Digest.from_hex(EMPTY_HEX).hex() == EMPTY_HEX
    with pytest.raises(ValidationError):
        B3Digest.from_hex("b3:" + base64.b64encode(bytes(32)).decode())


# --- Directory validation --------------------------------------------------------------------

D0 = B3Digest(bytes(32))


def f(name: bytes, size: int = 1, executable: bool = False) -> FileNode:
    return FileNode(name, D0, size, executable)


@pytest.mark.parametrize(
    "name, msg",
    [
        (b"", "empty"),
        (b".", r"\. and \.\."),
        (b"..", r"\. and \.\."),
        (b"a/b", "'/' or NUL"),
        (b"/", "'/' or NUL"),
        (b"a\0b", "'/' or NUL"),
        (b"x" * 256, "longer than 255"),
    ],
)
def test_directory_rejects_bad_names(name: bytes, msg: str) -> None:
    for d in (
        Directory(files=(f(name),)),
        Directory(directories=(DirectoryNode(name, D0, 0),)),
        Directory(symlinks=(SymlinkNode(name, b"t"),)),
    ):
        with pytest.raises(ValidationError, match=msg):
            d.validate()


def test_directory_accepts_edge_names() -> None:
    Directory(files=(f(b"..."), f(b"x" * 255)), symlinks=(SymlinkNode("名前".encode(), b"t"),)).validate()


@pytest.mark.parametrize("kind", ["directories", "files", "symlinks"])
def test_directory_lists_must_be_strictly_ascending(kind: str) -> None:
    def mk(name: bytes) -> DirectoryNode | FileNode | SymlinkNode:
        if kind == "directories":
            return DirectoryNode(name, D0, 0)
        if kind == "files":
            return f(name)
        return SymlinkNode(name, b"t")

    Directory(**{kind: (mk(b"a"), mk(b"b"))}).validate()
    with pytest.raises(ValidationError, match="sorted"):
        Directory(**{kind: (mk(b"b"), mk(b"a"))}).validate()
    with pytest.raises(ValidationError, match="sorted"):
        Directory(**{kind: (mk(b"a"), mk(b"a"))}).validate()
    # bytewise, not by code point of a decoded string or locale: "Z" (0x5a) < "a" < "é" (0xc3...)
    Directory(**{kind: (mk(b"Z"), mk(b"a"), mk("é".encode()))}).validate()


def test_directory_name_unique_across_lists() -> None:
    with pytest.raises(ValidationError, match="duplicate"):
        Directory(directories=(DirectoryNode(b"a", D0, 0),), files=(f(b"a"),)).validate()
    with pytest.raises(ValidationError, match="duplicate"):
        Directory(files=(f(b"a"),), symlinks=(SymlinkNode(b"a", b"t"),)).validate()


@pytest.mark.parametrize("target, msg", [(b"", "empty"), (b"a\0b", "NUL"), (b"x" * 4096, "4095")])
def test_directory_rejects_bad_symlink_targets(target: bytes, msg: str) -> None:
    with pytest.raises(ValidationError, match=msg):
        Directory(symlinks=(SymlinkNode(b"l", target),)).validate()


def test_directory_accepts_long_and_odd_targets() -> None:
    Directory(symlinks=(SymlinkNode(b"a", b"x" * 4095), SymlinkNode(b"b", b"/abs/../x"))).validate()


def test_directory_sizes_are_uint64() -> None:
    """Sizes of 4 GiB and more are valid (uint64 since tvix.castore.v1); beyond uint64 they are not."""
    Directory(files=(f(b"a", 5 << 30),)).validate()
    Directory(directories=(DirectoryNode(b"a", D0, 1 << 32),)).validate()
    Directory(files=(f(b"a", (1 << 64) - 1),)).validate()
    with pytest.raises(ValidationError, match="uint64"):
        Directory(files=(f(b"a", 1 << 64),)).validate()
    with pytest.raises(ValidationError, match="uint64"):
        Directory(directories=(DirectoryNode(b"a", D0, 1 << 64),)).validate()


def test_directory_node_size_must_match_child() -> None:
    child = Directory(files=(f(b"x"), f(b"y")))
    good = Directory(directories=(child.as_node(b"c"),))
    bad = Directory(directories=(DirectoryNode(b"c", child.digest, 3),))
    good.check_child_sizes({child.digest: child.size})
    with pytest.raises(ValidationError, match="size"):
        bad.check_child_sizes({child.digest: child.size})
    svc = MemoryDirectoryService()
    with pytest.raises(ValidationError, match="size"):
        svc.put_graph([child, bad])
    assert svc.get(child.digest) is None  # nothing of a rejected graph is stored
    assert svc.put_graph([child, good]) == good.digest


def _count(tree: dict) -> int:
    """Recursive entry count of a nested dict/None tree, computed independently of castore."""
    return sum(1 + (_count(v) if isinstance(v, dict) else 0) for v in tree.values())


def _build(tree: dict) -> Directory:
    nodes: list = []
    for name, v in tree.items():
        if isinstance(v, dict):
            nodes.append(_build(v).as_node(name.encode()))
        else:
            nodes.append(f(name.encode()))
    return Directory.from_nodes(nodes)


def test_directory_size_is_recursive_entry_count() -> None:
    tree = {"a": {"b": {"c": {}, "d": None, "e": {"f": None, "g": None}}, "h": None}, "i": None, "j": {}}
    d = _build(tree)
    assert d.size == _count(tree) == 10
    assert d.as_node(b"x").size == 10
    assert EMPTY_DIRECTORY.size == 0
    deep: dict = {}
    cur = deep
    for i in range(12):
        cur[f"l{i}"] = {}
        cur = cur[f"l{i}"]
    assert _build(deep).size == 12


def _random_directory(rng: random.Random) -> Directory:
    names = rng.sample([f"n{i}-{'é' * rng.randint(0, 2)}" for i in range(60)], rng.randint(0, 20))
    nodes: list = []
    for n in names:
        kind = rng.randrange(3)
        if kind == 0:
            nodes.append(DirectoryNode(n.encode(), rdigest(rng), rng.choice([0, 1, 127, 128, 300, 1 << 20])))
        elif kind == 1:
            size = rng.choice([0, 1, 127, 128, 16384, (1 << 32) - 1])
            nodes.append(FileNode(n.encode(), rdigest(rng), size, rng.random() < 0.5))
        else:
            nodes.append(SymlinkNode(n.encode(), rng.choice(["t", "/abs", "x" * 200, "ü/../v"]).encode()))
    return Directory.from_nodes(nodes)


def test_directory_encoding_matches_protobuf() -> None:
    rng = random.Random(RNG_SEED)
    assert EMPTY_DIRECTORY.encoded == b""
    assert EMPTY_DIRECTORY.digest.hex() == EMPTY_HEX
    for _ in range(200):
        d = _random_directory(rng)
        d.validate()
        m = wire.directory_to_proto(d)
        assert d.encoded == m.SerializeToString(deterministic=True)
        assert d.digest == B3Digest.of(m.SerializeToString(deterministic=True))
        # what the wire conversion takes as the encoding (the library's, unknown fields dropped)
        # is the hand encoder's, also for a message that arrived with a field we do not know
        raw = m.SerializeToString() + b"\xa0\x06\x01"  # field 100, varint 1
        got = wire.directory_from_bytes(raw)
        fresh = Directory(got.directories, got.files, got.symlinks)
        assert got.encoded == fresh.encoded == d.encoded and got.digest == d.digest


def test_directory_nodes_and_lookup() -> None:
    d = Directory.from_nodes([f(b"b"), SymlinkNode(b"a", b"t"), DirectoryNode(b"c", D0, 0)])
    assert [n.name for n in d.nodes()] == [b"a", b"b", b"c"]
    assert d.lookup(b"b") == f(b"b")
    assert d.lookup(b"zz") is None


# --- nixbase32 -----------------------------------------------------------------------------------


def test_nixbase32_round_trips() -> None:
    rng = random.Random(RNG_SEED)
    for n in range(0, 65):
        data = rng.randbytes(n)
        text = nixbase32.encode(data)
        assert len(text) == nixbase32.encoded_len(n)
        assert set(text) <= set(nixbase32.ALPHABET)
        assert nixbase32.decode(text, n) == data
    assert nixbase32.encoded_len(20) == 32
    assert nixbase32.encoded_len(32) == 52


@pytest.mark.nix
def test_nixbase32_matches_nix_hash() -> None:
    rng = random.Random(RNG_SEED)
    for algo, n in (("sha256", 32), ("sha1", 20), ("md5", 16), ("sha512", 64)):
        for _ in range(3):
            data = rng.randbytes(n)
            out = subprocess.run(
                ["nix-hash", "--type", algo, "--to-base32", data.hex()], capture_output=True, text=True, check=True
            ).stdout.strip()
            assert nixbase32.encode(data) == out
            assert nixbase32.decode(out, n) == data


@pytest.mark.parametrize(
    "text, length, msg",
    [
        ("e" * 32, 20, "character"),  # e, o, u, t are not in the alphabet
        ("0" * 31, 20, "length"),
        ("0" * 33, 20, "length"),
        ("z" + "0" * 51, 32, "padding"),  # 52 chars carry 260 bits: the top 4 must be zero
    ],
)
def test_nixbase32_rejects(text: str, length: int, msg: str) -> None:
    with pytest.raises(ValidationError, match=msg):
        nixbase32.decode(text, length)


# --- StorePath -----------------------------------------------------------------------------------

H = "0" * 31 + "1"  # a syntactically valid 20-byte hash part


def test_store_path_parse() -> None:
    sp = StorePath.parse(f"/nix/store/{H}-hello-2.12")
    assert sp.name == "hello-2.12"
    assert len(sp.digest) == 20
    assert sp.basename == f"{H}-hello-2.12"
    assert str(sp) == sp.absolute == f"/nix/store/{H}-hello-2.12"
    assert StorePath.parse(f"{H}-x") == StorePath.parse(f"/nix/store/{H}-x/")
    assert StorePath.parse_basename(f"{H}-x".encode()).name == "x"
    assert StorePath.parse(f"{H}-" + "a" * 211).name == "a" * 211


@pytest.mark.parametrize(
    "text",
    [
        f"/nix/store/{H}-x/bin",
        f"{H}x",
        f"{H}-",
        f"{H}-a b",
        f"{H}-ü",
        f"{H}-" + "a" * 212,
        f"{H[:-1]}-x",
        "e" * 32 + "-x",
        "foo",
        "",
    ],
)
def test_store_path_parse_rejects(text: str) -> None:
    with pytest.raises(ValidationError):
        StorePath.parse(text)


@pytest.mark.nix
def test_store_path_from_nar_sha256_matches_nix(tmp_path: Path) -> None:
    rng = random.Random(RNG_SEED)
    for i, name in enumerate(["a", "with-dash_and.dots+=?", "x" * 100]):
        p = tmp_path / str(i) / name
        p.parent.mkdir()
        p.write_bytes(rng.randbytes(100 + i))
        h = subprocess.run(
            ["nix-hash", "--type", "sha256", "--base32", str(p)], capture_output=True, text=True, check=True
        ).stdout.strip()
        added = subprocess.run(["nix-store", "--add", str(p)], capture_output=True, text=True, check=True).stdout
        sp = StorePath.from_nar_sha256(nixbase32.decode(h, 32), name)
        assert sp.absolute == added.strip()
        assert StorePath.parse(added.strip()) == sp


def test_store_path_from_nar_sha256_validates_name() -> None:
    for bad in ["", "a/b", "a b", "ü", "x" * 212]:
        with pytest.raises(ValidationError, match="name"):
            StorePath.from_nar_sha256(bytes(32), bad)


# --- PathInfo ----------------------------------------------------------------------------------------


REF = b"\x01" * 20


def _info(**kw: object) -> PathInfo:
    base: dict = {
        "node": FileNode(f"{H}-x".encode(), D0, 1),
        "references": (REF,),
        "narinfo": NarInfo(100, b"\x02" * 32, (Signature("k", b"s"),), (nixbase32.encode(REF) + "-dep",)),
    }
    base.update(kw)
    return PathInfo(**base)  # type: ignore[arg-type]


def test_pathinfo_valid() -> None:
    assert _info().validate() == StorePath.parse(f"{H}-x")
    PathInfo(SymlinkNode(f"{H}-x".encode(), b"/t")).validate()
    PathInfo(DirectoryNode(f"{H}-x".encode(), D0, 0), narinfo=NarInfo(1, bytes(32))).validate()


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"node": None}, "no root node"),
        ({"node": FileNode(b"x", D0, 1)}, "store path basename"),
        ({"node": FileNode(f"{H}-a b".encode(), D0, 1)}, "store path basename"),
        ({"node": SymlinkNode(f"{H}-x".encode(), b"")}, "empty target"),
        ({"references": (b"\x01" * 19,)}, "length 19"),
        ({"narinfo": NarInfo(1, b"\x02" * 31, (), (f"{H}-dep",))}, "nar_sha256"),
        ({"narinfo": NarInfo(1, b"\x02" * 32, (), ())}, "reference_names"),
        ({"narinfo": NarInfo(1, b"\x02" * 32, (), (f"{H}-dep",))}, "does not match"),
        ({"narinfo": NarInfo(1, b"\x02" * 32, (), ("nonsense",))}, "reference_names"),
    ],
)
def test_pathinfo_rejects(kw: dict, msg: str) -> None:
    with pytest.raises(ValidationError, match=msg):
        _info(**kw).validate()


# --- wire -----------------------------------------------------------------------------------------------


def test_wire_directory_round_trip() -> None:
    rng = random.Random(RNG_SEED + 1)
    for _ in range(50):
        d = _random_directory(rng)
        raw = wire.directory_to_proto(d).SerializeToString(deterministic=True)
        m = castore_pb2.Directory()
        m.ParseFromString(raw)
        assert wire.directory_from_proto(m) == d


def test_wire_directory_from_proto_validates() -> None:
    m = castore_pb2.Directory(files=[castore_pb2.FileNode(name="b", digest=bytes(32)), castore_pb2.FileNode(name="a")])
    with pytest.raises(ValidationError):
        wire.directory_from_proto(m)
    m = castore_pb2.Directory(files=[castore_pb2.FileNode(name="a", digest=bytes(31))])
    with pytest.raises(ValidationError, match="32 bytes"):
        wire.directory_from_proto(m)
    m = castore_pb2.Directory(symlinks=[castore_pb2.SymlinkNode(name="a", target="")])
    with pytest.raises(ValidationError, match="empty target"):
        wire.directory_from_proto(m)


@pytest.mark.parametrize(
    "node",
    [
        DirectoryNode(f"{H}-d".encode(), D0, 7),
        FileNode(f"{H}-f".encode(), D0, 5, True),
        FileNode(f"{H}-f".encode(), D0, 0, False),
        SymlinkNode(f"{H}-s".encode(), "ziel/ü".encode()),
    ],
)
def test_wire_pathinfo_round_trip(node: DirectoryNode | FileNode | SymlinkNode) -> None:
    for info in (PathInfo(node), _info(node=node)):
        raw = wire.pathinfo_to_proto(info).SerializeToString(deterministic=True)
        m = pathinfo_pb2.PathInfo()
        m.ParseFromString(raw)
        assert wire.pathinfo_from_proto(m) == info
        n = pathinfo_pb2.Node()
        n.ParseFromString(wire.node_to_proto(node).SerializeToString())
        assert wire.node_from_proto(n) == node


def test_wire_pathinfo_from_proto_validates() -> None:
    with pytest.raises(ValidationError, match="no root node"):
        wire.pathinfo_from_proto(pathinfo_pb2.PathInfo())
    with pytest.raises(ValidationError, match="no root node"):
        wire.pathinfo_from_proto(pathinfo_pb2.PathInfo(node=pathinfo_pb2.Node()))
    with pytest.raises(ValidationError):
        wire.node_from_proto(pathinfo_pb2.Node())
    bad = wire.pathinfo_to_proto(_info())
    bad.references[0] = b"\x01" * 21
    with pytest.raises(ValidationError, match="length 21"):
        wire.pathinfo_from_proto(bad)
    bad = wire.pathinfo_to_proto(PathInfo(FileNode(f"{H}-x".encode(), D0, 1)))
    bad.node.file.digest = b"\x00" * 20
    with pytest.raises(ValidationError, match="32 bytes"):
        wire.pathinfo_from_proto(bad)


def test_wire_chunks_round_trip() -> None:
    rng = random.Random(RNG_SEED)
    chunks = [ChunkMeta(rdigest(rng), rng.randint(1, 1 << 20)) for _ in range(5)]
    assert wire.chunks_from_proto(wire.chunks_to_proto(chunks)) == chunks
    assert wire.chunks_from_proto(wire.chunks_to_proto([])) == []


def test_names_and_targets_are_bytes() -> None:
    """Names and targets need not be UTF-8 (bytes in tvix.castore.v1 and snix.castore.v1)."""
    d = Directory(files=(f(b"caf\xe9"),), symlinks=(SymlinkNode(b"\xff\xfe", b"\xc3\x28"),))
    d.validate()
    assert d.lookup(b"\xff\xfe") == SymlinkNode(b"\xff\xfe", b"\xc3\x28")
