"""Property-based fuzzing (hypothesis) of everything that parses untrusted input.

- wire conversion (`tvix_store.protocol.wire`): arbitrary bytes and well-typed but invalid
  messages either convert or raise ValidationError (the request deserializers: a message or
  `Malformed`), never anything else; valid Directories and PathInfos round-trip exactly, a
  Directory's digest is the BLAKE3 of its deterministic encoding;
- Directory validation (`Directory.validate`, `validate_graph`, `put_graph`): generated graphs
  are accepted, every mutation (wrong size, bad name or target, unsorted, duplicate name,
  dangling reference, two roots, root not last, empty) is rejected and stores nothing;
- the NAR reader (`tvix_store.importer.nar`): random bytes, token soup, mutated valid NARs (bit
  flips, truncation, insertions, deletions, overwritten lengths) give ValidationError (nothing
  stored) or a result that renders back to exactly the input; the outcome does not depend on
  how the stream is cut into pieces;
- store paths and nixbase32 (`tvix_store.core.pathinfo`, `tvix_store.core.nixbase32`):
  round trips, and arbitrary strings give ValidationError or a parse that round-trips.

Bounded by default (the "ci" profile: derandomized, no example database, a fixed number of
examples; the whole file takes well under a minute on 2 cores). `TVIX_FUZZ=long` selects the
"long" profile for runs of hours by hand (`scripts/fuzz`): random, many more examples
(`TVIX_FUZZ_EXAMPLES`), failures kept in an example database (`TVIX_FUZZ_DB`) and replayed.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import string
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any
from unittest import mock

import blake3
import pytest
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from hypothesis.database import DirectoryBasedExampleDatabase

from tvix_store import nar
from tvix_store.compose import open_store
from tvix_store.core import nixbase32
from tvix_store.core.castore import (
    MAX_NAME_LEN,
    MAX_TARGET_LEN,
    MAX_U32,
    MAX_U64,
    Directory,
    DirectoryNode,
    FileNode,
    Node,
    SymlinkNode,
)
from tvix_store.core.digest import B3Digest
from tvix_store.core.errors import UnrepresentableError, ValidationError
from tvix_store.core.pathinfo import NarInfo, PathInfo, Signature, StorePath
from tvix_store.directoryservice import validate_graph
from tvix_store.directoryservice.memory import MemoryDirectoryService
from tvix_store.importer import nar as nar_reader
from tvix_store.importer.nar import read_nar
from tvix_store.protocol import wire
from tvix_store.protocol.g1 import castore_pb2, pathinfo_pb2, rpc_blobstore_pb2, rpc_directory_pb2, rpc_pathinfo_pb2
from tvix_store.protocol.wire_g2 import G2
from tvix_store.protocol.wire_g3 import G3

# --- profiles ---

LONG = os.environ.get("TVIX_FUZZ") == "long"
_common: dict[str, Any] = {
    "deadline": None,  # a loaded 2-core CI machine: no per-example timing (pytest-timeout catches hangs)
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    "print_blob": True,
}
if LONG:
    _home = os.environ.get("TVIX_FUZZ_DB", os.path.expanduser("~/.cache/tvix-store-fuzz"))
    set_hypothesis_home_dir(_home)
    settings.register_profile(
        "tvix-long",
        max_examples=int(os.environ.get("TVIX_FUZZ_EXAMPLES", "200000")),
        database=DirectoryBasedExampleDatabase(os.path.join(_home, "examples")),
        **_common,
    )
else:
    # nothing written into the checkout (hypothesis keeps a few caches in its home directory)
    set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), f"tvix-store-hypothesis-{os.getuid()}"))
    settings.register_profile("tvix-ci", max_examples=150, database=None, derandomize=True, **_common)
FUZZ = settings.get_profile("tvix-long" if LONG else "tvix-ci")


def scaled(n: int) -> settings:
    """The profile with `n` CI examples (cheap properties get more); long mode keeps its count."""
    return FUZZ if LONG else settings(FUZZ, max_examples=n)


pytestmark = pytest.mark.timeout(0 if LONG else 240)

# --- strategies: names, targets, nodes ---

_NAME_CHARS = st.characters(exclude_characters="/\0", exclude_categories=("Cs",))
ODD = ["A", "a", "-", "_", "~", "B-", "b_", "é", "Zä", "0", "...", ".a", "a.", " ", "\n", "名前"]
valid_names = (
    st.one_of(
        st.sampled_from(ODD),
        st.text(_NAME_CHARS, min_size=1, max_size=12),
    )
    .map(str.encode)
    .filter(lambda n: n not in (b".", b"..") and len(n) <= MAX_NAME_LEN)
)
BAD_NAMES = [b"", b".", b"..", b"a/b", b"/", b"a\0", b"x" * 256, "é".encode() * 128]
any_names = st.one_of(valid_names, st.sampled_from(BAD_NAMES), st.binary(max_size=8))
valid_targets = st.text(st.characters(exclude_characters="\0", exclude_categories=("Cs",)), min_size=1, max_size=40)
BAD_TARGETS = [b"", b"a\0b", b"x" * (MAX_TARGET_LEN + 1)]
digests = st.binary(min_size=32, max_size=32).map(B3Digest)
u32 = st.integers(0, MAX_U32)
#: the characters of a store path name
SP_CHARS = string.ascii_letters + string.digits + "+-_?=."


def valid_name_set(n: int) -> st.SearchStrategy[list[bytes]]:
    return st.lists(valid_names, min_size=n, max_size=n, unique=True)


@st.composite
def leaf_nodes(draw: st.DrawFn, name: bytes) -> Node:
    if draw(st.booleans()):
        return FileNode(name, draw(digests), draw(u32), draw(st.booleans()))
    return SymlinkNode(name, draw(valid_targets).encode())


# --- strategies: directory graphs ---


@st.composite
def graphs(draw: st.DrawFn, max_dirs: int = 6) -> list[Directory]:
    """A valid leaves-first graph: each Directory references earlier ones (by a random subset),
    the last references every Directory nothing else references (exactly one root)."""
    built: list[Directory] = []
    n = draw(st.integers(1, max_dirs))
    for i in range(n):
        unreferenced = {d.digest: d for d in built}
        for d in built:
            for c in d.directories:
                unreferenced.pop(c.digest, None)
        children = draw(st.lists(st.sampled_from(built), max_size=3)) if built else []
        if i == n - 1:
            children += list(unreferenced.values())
        leaves = draw(st.integers(0, 4))
        names = draw(valid_name_set(len(children) + leaves))
        nodes: list[Node] = [c.as_node(nm) for c, nm in zip(children, names, strict=False)]
        nodes += [draw(leaf_nodes(nm)) for nm in names[len(children) :]]
        d = Directory.from_nodes(nodes)
        if i == n - 1:
            assume(all(d.digest != b.digest for b in built))  # a root equal to an inner one is no root
        built.append(d)
    return built


def replaced(graph: list[Directory], i: int, d: Directory) -> list[Directory]:
    """The graph with every occurrence of graph[i]'s digest replaced by `d`."""
    old = graph[i].digest
    return [d if g.digest == old else g for g in graph]


def with_lists(d: Directory, kind: str, lst: list[Any]) -> Directory:
    parts = {"directories": d.directories, "files": d.files, "symlinks": d.symlinks}
    parts[kind] = tuple(lst)
    return Directory(parts["directories"], parts["files"], parts["symlinks"])


MUTATIONS = ["size", "name", "target", "unsorted", "duplicate", "dangling", "two-roots", "drop", "root-first", "empty"]


@st.composite
def mutated_graphs(draw: st.DrawFn) -> tuple[str, list[Directory]]:
    """A generated graph with one mutation that makes it invalid."""
    g = draw(graphs())
    kind = draw(st.sampled_from(MUTATIONS))
    idx = list(range(len(g)))
    if kind == "size":
        cands = [i for i in idx if g[i].directories]
        assume(cands)
        i = draw(st.sampled_from(cands))
        j = draw(st.integers(0, len(g[i].directories) - 1))
        c = g[i].directories[j]
        size = draw(st.integers(0, MAX_U32 + 2).filter(lambda s: s != c.size))
        lst = list(g[i].directories)
        lst[j] = DirectoryNode(c.name, c.digest, size)
        return kind, replaced(g, i, with_lists(g[i], "directories", lst))
    if kind in ("name", "target"):
        i = draw(st.sampled_from(idx))
        kinds = [k for k in ("directories", "files", "symlinks") if getattr(g[i], k)]
        if kind == "target":
            kinds = ["symlinks"] if g[i].symlinks else []
        assume(kinds)
        k = draw(st.sampled_from(kinds))
        lst = list(getattr(g[i], k))
        j = draw(st.integers(0, len(lst) - 1))
        if kind == "name":
            lst[j] = lst[j].renamed(draw(st.sampled_from(BAD_NAMES)))
        else:
            lst[j] = SymlinkNode(lst[j].name, draw(st.sampled_from(BAD_TARGETS)))
        return kind, replaced(g, i, with_lists(g[i], k, lst))
    if kind == "unsorted":
        cands = [(i, k) for i in idx for k in ("directories", "files", "symlinks") if len(getattr(g[i], k)) >= 2]
        assume(cands)
        i, k = draw(st.sampled_from(cands))
        lst = list(getattr(g[i], k))
        a, b = draw(st.lists(st.integers(0, len(lst) - 1), min_size=2, max_size=2, unique=True))
        lst[a], lst[b] = lst[b], lst[a]
        return kind, replaced(g, i, with_lists(g[i], k, lst))
    if kind == "duplicate":
        cands = [i for i in idx if len(g[i].nodes()) >= 2]
        assume(cands)
        i = draw(st.sampled_from(cands))
        nodes = g[i].nodes()
        a, b = draw(st.lists(st.integers(0, len(nodes) - 1), min_size=2, max_size=2, unique=True))
        nodes[b] = nodes[b].renamed(nodes[a].name)
        return kind, replaced(g, i, Directory.from_nodes(nodes))  # sorted lists, a name used twice
    if kind == "dangling":
        i = draw(st.sampled_from(idx))
        known = {d.digest for d in g}
        missing = draw(digests.filter(lambda d: d not in known))
        names = {n.name for n in g[i].nodes()}
        name = draw(valid_names.filter(lambda n: n not in names))
        node = DirectoryNode(name, missing, draw(st.integers(0, 100)))
        return kind, replaced(g, i, Directory.from_nodes([*g[i].nodes(), node]))
    if kind == "two-roots":
        extra = Directory(symlinks=(SymlinkNode(b"extra-root", b"not referenced by anything"),))
        assume(all(d.digest != extra.digest for d in g))
        at = draw(st.integers(0, len(g)))
        return kind, [*g[:at], extra, *g[at:]]
    if kind == "drop":
        assume(len(g) > 1)
        i = draw(st.integers(0, len(g) - 2))
        gone = g[i].digest
        return kind, [d for d in g if d.digest != gone]
    if kind == "root-first":
        assume(len(g) > 1 and g[-1].directories)
        return kind, [g[-1], *g[:-1]]
    return kind, []


def check_directory(d: Directory) -> None:
    """An independent statement of PROTOCOL.md's rules, for what a conversion accepted."""
    seen: set[bytes] = set()
    for lst in (d.directories, d.files, d.symlinks):
        names = [n.name for n in lst]
        assert names == sorted(set(names)), names
        for n in lst:
            assert n.name and n.name not in (b".", b"..") and b"/" not in n.name and b"\0" not in n.name
            assert len(n.name) <= MAX_NAME_LEN
            assert n.name not in seen
            seen.add(n.name)
            if isinstance(n, SymlinkNode):
                assert n.target and b"\0" not in n.target and len(n.target) <= MAX_TARGET_LEN
            else:
                assert len(n.digest) == 32 and 0 <= n.size <= MAX_U64


# --- wire conversion ---


MESSAGE_CLASSES = [
    wire.message_class(desc)
    for mod in (castore_pb2, pathinfo_pb2, rpc_blobstore_pb2, rpc_directory_pb2, rpc_pathinfo_pb2)
    for desc in mod.DESCRIPTOR.message_types_by_name.values()
]


@scaled(300)
@given(st.sampled_from(MESSAGE_CLASSES), st.binary(max_size=200))
def test_safe_deserializers_never_raise(cls: type, raw: bytes) -> None:
    got = wire.safe_deserializer(cls)(raw)
    if isinstance(got, wire.Malformed):
        assert cls.DESCRIPTOR.full_name in got.error
    else:
        assert isinstance(got, cls)


@scaled(300)
@given(st.binary(max_size=64))
def test_digest_from_proto(raw: bytes) -> None:
    if len(raw) == 32:
        assert bytes(wire.digest_from_proto(raw)) == raw
    else:
        with pytest.raises(ValidationError, match="expected 32 bytes"):
            wire.digest_from_proto(raw)


def _accepts_directory(raw: bytes) -> None:
    try:
        d = wire.directory_from_bytes(raw)
    except ValidationError:
        return
    check_directory(d)
    fresh = Directory(d.directories, d.files, d.symlinks)
    assert d.encoded == fresh.encoded  # the protobuf library's canonical bytes = the hand encoder's
    assert d.digest == blake3.blake3(d.encoded).digest()
    assert wire.directory_from_bytes(d.encoded) == d
    for c in (G2, G3):
        assert c.directory_to_proto(d).SerializeToString(deterministic=True) == d.encoded
    try:
        g1 = wire.directory_to_proto(d)
    except UnrepresentableError:  # a name or target that is not UTF-8, a size ≥ 4 GiB: not for G1
        assert any(_beyond_g1(n) for n in d.nodes())
    else:
        assert g1.SerializeToString(deterministic=True) == d.encoded


def _beyond_g1(n: Node) -> bool:
    """Whether the 2022 protocol cannot carry a node (stated independently of the codec)."""
    texts = [n.name, n.target] if isinstance(n, SymlinkNode) else [n.name]
    try:
        for x in texts:
            x.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return not isinstance(n, SymlinkNode) and n.size >= 1 << 32


@scaled(300)
@given(st.binary(max_size=300))
def test_directory_from_arbitrary_bytes(raw: bytes) -> None:
    _accepts_directory(raw)


@st.composite
def proto_directories(draw: st.DrawFn) -> castore_pb2.Directory:
    """Well-typed Directory messages with any names, digests, sizes, targets, in any order."""

    def name() -> str:
        return draw(any_names).decode("utf-8", "replace") if draw(st.booleans()) else draw(st.text(max_size=6))

    def digest() -> bytes:
        return draw(st.one_of(st.binary(min_size=32, max_size=32), st.binary(max_size=40)))

    m = castore_pb2.Directory()
    for _ in range(draw(st.integers(0, 3))):
        m.directories.add(name=name(), digest=digest(), size=draw(u32))
    for _ in range(draw(st.integers(0, 3))):
        m.files.add(name=name(), digest=digest(), size=draw(u32), executable=draw(st.booleans()))
    for _ in range(draw(st.integers(0, 3))):
        m.symlinks.add(name=name(), target=draw(st.one_of(valid_targets, st.text(max_size=5))))
    return m


@st.composite
def mutated_bytes(draw: st.DrawFn, data: bytes, keep: int = 0) -> bytes:
    """`data` with a few random edits: bit flips, cuts, insertions, deletions, overwrites; mostly
    after its first `keep` bytes (a NAR's magic: edits there only ever give "not a NAR")."""
    b = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "overwrite", "u64"]))
        low = 0 if draw(st.integers(0, 9)) == 0 else min(keep, len(b))
        pos = draw(st.integers(low, len(b)))
        if op == "flip" and pos < len(b):
            b[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del b[pos:]
        elif op == "insert":
            b[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del b[pos : pos + draw(st.integers(1, 16))]
        elif op == "overwrite":
            new = draw(st.binary(min_size=1, max_size=8))
            b[pos : pos + len(new)] = new
        elif op == "u64":  # a length prefix (NAR strings are 8-aligned) made small, odd or huge
            pos -= pos % 8
            value = draw(st.one_of(st.integers(0, 300), st.integers(0, 2**64 - 1), st.just(2**64 - 1)))
            b[pos : pos + 8] = value.to_bytes(8, "little")
    return bytes(b)


@scaled(300)
@given(proto_directories(), st.data())
def test_directory_from_wellformed_invalid_messages(m: castore_pb2.Directory, data: st.DataObject) -> None:
    raw = m.SerializeToString()
    _accepts_directory(raw)
    _accepts_directory(data.draw(mutated_bytes(raw)))
    try:
        d = wire.directory_from_proto(m)
    except ValidationError:
        return
    check_directory(d)


@scaled(200)
@given(graphs())
def test_valid_directories_roundtrip(g: list[Directory]) -> None:
    for d in g:
        d.validate()
        m = wire.directory_to_proto(d)
        assert m.SerializeToString(deterministic=True) == d.encoded
        assert wire.directory_from_proto(m) == d
        back = wire.directory_from_bytes(d.encoded)
        assert back == d and back.encoded == d.encoded
        assert d.digest == blake3.blake3(d.encoded).digest()
        for n in d.nodes():
            assert wire.node_from_proto(wire.node_to_proto(n)) == n


def store_path_names() -> st.SearchStrategy[str]:
    return st.one_of(
        st.text(SP_CHARS, min_size=1, max_size=20),
        st.text(max_size=12),
        st.text(SP_CHARS, min_size=1, max_size=8).map(lambda s: s + "\n"),
    )


def basenames() -> st.SearchStrategy[str]:
    return st.builds(lambda h, n: f"{nixbase32.encode(h)}-{n}", st.binary(min_size=20, max_size=20), store_path_names())


@st.composite
def proto_pathinfos(draw: st.DrawFn) -> pathinfo_pb2.PathInfo:
    """Well-typed PathInfo messages: any node (or none), references and narinfo, often valid."""
    m = pathinfo_pb2.PathInfo()
    kind = draw(st.sampled_from(["directory", "file", "symlink", None]))
    name = draw(st.one_of(basenames(), st.text(max_size=40)))
    digest = draw(st.one_of(st.binary(min_size=32, max_size=32), st.binary(max_size=40)))
    if kind == "directory":
        m.node.directory.CopyFrom(castore_pb2.DirectoryNode(name=name, digest=digest, size=draw(u32)))
    elif kind == "file":
        m.node.file.CopyFrom(
            castore_pb2.FileNode(name=name, digest=digest, size=draw(u32), executable=draw(st.booleans()))
        )
    elif kind == "symlink":
        m.node.symlink.CopyFrom(
            castore_pb2.SymlinkNode(name=name, target=draw(st.one_of(valid_targets, st.text(max_size=3))))
        )
    refs = draw(st.lists(basenames(), max_size=3))
    m.references.extend(
        nixbase32.decode(r[:32], 20) if draw(st.booleans()) else draw(st.binary(max_size=24)) for r in refs
    )
    if draw(st.booleans()):
        m.narinfo.nar_size = draw(u32)
        m.narinfo.nar_sha256 = draw(st.one_of(st.binary(min_size=32, max_size=32), st.binary(max_size=40)))
        for _ in range(draw(st.integers(0, 2))):
            m.narinfo.signatures.add(name=draw(st.text(max_size=10)), data=draw(st.binary(max_size=70)))
        names = refs if draw(st.booleans()) else draw(st.lists(st.one_of(basenames(), st.text(max_size=5)), max_size=3))
        m.narinfo.reference_names.extend(names)
    return m


def _accepts_pathinfo(raw: bytes) -> None:
    try:
        p = wire.pathinfo_from_bytes(raw)
    except ValidationError:
        return
    sp = p.validate()
    assert re.fullmatch(r"[A-Za-z0-9+\-_?=.]{1,211}", sp.name), sp.name
    assert sp.basename.encode() == p.node.name  # type: ignore[union-attr]
    assert wire.pathinfo_from_bytes(wire.pathinfo_to_bytes(p)) == p
    assert wire.pathinfo_from_proto(wire.pathinfo_to_proto(p)) == p


@scaled(300)
@given(proto_pathinfos(), st.data())
def test_pathinfo_from_messages(m: pathinfo_pb2.PathInfo, data: st.DataObject) -> None:
    raw = m.SerializeToString()
    _accepts_pathinfo(raw)
    _accepts_pathinfo(data.draw(mutated_bytes(raw)))


@scaled(300)
@given(st.binary(max_size=300))
def test_pathinfo_from_arbitrary_bytes(raw: bytes) -> None:
    _accepts_pathinfo(raw)


@scaled(200)
@given(st.binary(min_size=20, max_size=20), st.text(SP_CHARS, min_size=1, max_size=211), st.data())
def test_valid_pathinfo_roundtrip(h: bytes, name: str, data: st.DataObject) -> None:
    node = data.draw(
        st.one_of(
            st.builds(FileNode, st.just(b""), digests, u32, st.booleans()),
            st.builds(DirectoryNode, st.just(b""), digests, u32),
            st.builds(SymlinkNode, st.just(b""), valid_targets.map(str.encode)),
        )
    )
    refs = data.draw(
        st.lists(st.tuples(st.binary(min_size=20, max_size=20), st.text(SP_CHARS, min_size=1, max_size=8)))
    )
    sigs = data.draw(st.lists(st.builds(Signature, st.text(max_size=10), st.binary(max_size=64)), max_size=2))
    info = PathInfo(
        node.renamed(StorePath(h, name).basename.encode()),
        tuple(r for r, _ in refs),
        NarInfo(
            data.draw(u32),
            data.draw(st.binary(min_size=32, max_size=32)),
            tuple(sigs),
            tuple(StorePath(r, n).basename for r, n in refs),
        ),
    )
    assert info.validate() == StorePath(h, name)
    assert wire.pathinfo_from_bytes(wire.pathinfo_to_bytes(info)) == info


# --- Directory validation and graphs ---


@scaled(300)
@given(graphs())
def test_valid_graphs_are_accepted(g: list[Directory]) -> None:
    assert validate_graph(g, lambda _d: None)[-1] == g[-1]
    svc = MemoryDirectoryService()
    assert svc.put_graph(g) == g[-1].digest
    assert {d.digest for d in svc.get_recursive(g[-1].digest)} == {d.digest for d in g}


@scaled(400)
@given(mutated_graphs())
def test_mutated_graphs_are_rejected(case: tuple[str, list[Directory]]) -> None:
    kind, g = case
    with pytest.raises(ValidationError):
        validate_graph(g, lambda _d: None)
    svc = MemoryDirectoryService()
    with pytest.raises(ValidationError):
        svc.put_graph(g)
    assert list(svc.iter_digests()) == []
    if kind in ("name", "target", "unsorted", "duplicate"):
        assert any(_invalid(d) for d in g), kind  # the Directory itself is invalid


def _invalid(d: Directory) -> bool:
    try:
        d.validate()
    except ValidationError:
        return True
    return False


@scaled(300)
@given(st.lists(st.tuples(any_names, st.sampled_from(["d", "f", "s"]), any_names), max_size=6))
def test_directory_validate_is_exactly_the_rules(entries: list[tuple[bytes, str, bytes]]) -> None:
    """`Directory.validate` accepts exactly what the independent statement of the rules accepts."""
    lists: dict[str, list[Node]] = {"d": [], "f": [], "s": []}
    for name, kind, target in entries:
        if kind == "d":
            lists[kind].append(DirectoryNode(name, B3Digest(bytes(32)), 1))
        elif kind == "f":
            lists[kind].append(FileNode(name, B3Digest(bytes(32)), 0))
        else:
            lists[kind].append(SymlinkNode(name, target))
    d = Directory(tuple(lists["d"]), tuple(lists["f"]), tuple(lists["s"]))  # type: ignore[arg-type]
    try:
        check_directory(d)
        ok = True
    except (AssertionError, UnicodeDecodeError):
        ok = False
    assert _invalid(d) != ok


# --- the NAR reader ---


def s(b: bytes) -> bytes:
    return len(b).to_bytes(8, "little") + b + b"\0" * (-len(b) % 8)


@st.composite
def trees(draw: st.DrawFn, depth: int = 0, loose: bool = False) -> tuple[Any, ...]:
    """A random tree as nested tuples: ("file", data, executable), ("link", target) or
    ("dir", [(name, tree), ...]) with entries sorted and names and targets valid; `loose`:
    names and targets also invalid, entries in any order, names possibly repeated."""
    kind = draw(st.sampled_from(["file", "link", "dir"] if depth < 4 else ["file", "link"]))
    if kind == "file":
        return ("file", draw(st.binary(max_size=40)), draw(st.booleans()))
    if kind == "link":
        if loose and draw(st.integers(0, 9)) == 0:
            return ("link", draw(st.one_of(st.sampled_from(BAD_TARGETS), st.binary(max_size=6))))
        return ("link", draw(valid_targets).encode())
    if not loose:
        names = sorted(draw(st.lists(valid_names, max_size=4, unique=True)))
    else:
        names = draw(st.lists(valid_names, max_size=4, unique=True))
        if draw(st.booleans()):
            names.sort()
        if names and draw(st.integers(0, 4)) == 0:
            names.insert(draw(st.integers(0, len(names))), draw(st.sampled_from(names)))  # a name twice
        if draw(st.integers(0, 9)) == 0:
            names.insert(draw(st.integers(0, len(names))), draw(any_names))
    return ("dir", [(n, draw(trees(depth + 1, loose))) for n in names])


def is_valid(tree: tuple[Any, ...]) -> bool:
    """Whether a (loose) tree is one castore can hold: the rules, stated independently."""
    stack = [tree]
    while stack:
        t = stack.pop()
        if t[0] == "link":
            target = t[1]
            if not target or b"\0" in target or len(target) > MAX_TARGET_LEN:
                return False
        elif t[0] == "dir":
            names = [n for n, _ in t[1]]
            if names != sorted(set(names)):
                return False
            for n, sub in t[1]:
                if not n or n in (b".", b"..") or b"/" in n or b"\0" in n or len(n) > MAX_NAME_LEN:
                    return False
                stack.append(sub)
    return True


def to_nar(tree: tuple[Any, ...]) -> bytes:
    """The NAR of a tree, entries in the tree's order (so a loose tree gives an invalid NAR)."""
    out = [nar.MAGIC]
    stack: list[Any] = [tree]
    while stack:
        t = stack.pop()
        if isinstance(t, bytes):
            out.append(t)
        elif t[0] == "file":
            out += [nar.regular_header(t[2], len(t[1])), t[1], nar.regular_trailer(len(t[1]))]
        elif t[0] == "link":
            out.append(nar.symlink(t[1]))
        else:
            out.append(nar.DIRECTORY_OPEN)
            todo: list[Any] = []
            for name, sub in t[1]:
                todo += [nar.entry_open(name), sub, nar.ENTRY_CLOSE]
            todo.append(nar.DIRECTORY_CLOSE)
            stack.extend(reversed(todo))
    return b"".join(out)


#: the kinds of rejection, for `--hypothesis-show-statistics` (what the fuzzers reach)
_WHY = (
    *("truncated", "trailing", "padding", "not a NAR", "expected", "order", "duplicate", "entry name", "target"),
    *("limit", "larger than", "empty string"),
)


def outcome(data: bytes, source: Any = None, **kw: Any) -> tuple[str, Any]:
    """Read `data` (or `source`) into a fresh memory store: ("ok", result) — then it renders back
    to exactly `data` — or ("rejected", message) — then no Directory was stored. Any other
    exception fails the test."""
    store = open_store("memory://")
    try:
        r = read_nar(store, data if source is None else source, **kw)
    except ValidationError as e:
        for dg in store.directories.iter_digests():  # only complete subgraphs (early flushes)
            d = store.directories.get(dg)
            assert d is not None and all(store.directories.has(c.digest) for c in d.directories)
        if kw.get("flush_entries") is None:
            assert list(store.directories.iter_digests()) == []
        event("NAR rejected: " + next((w for w in _WHY if w in str(e)), "other"))
        return "rejected", str(e)
    event("NAR accepted")
    assert r.nar_size == len(data) and r.nar_sha256 == hashlib.sha256(data).digest()
    assert b"".join(nar.render(r.node, store.blobs, store.directories)) == data
    return "ok", r


def cut(data: bytes, sizes: list[int]) -> Iterator[bytes]:
    i = 0
    for n in sizes:
        yield data[i : i + n]  # empty pieces too: they are not the end
        i += n
    if i < len(data):
        yield data[i:]


@scaled(300)
@given(trees())
def test_nar_valid_trees_roundtrip(tree: tuple[Any, ...]) -> None:
    data = to_nar(tree)
    kind, _ = outcome(data)
    assert kind == "ok"


@scaled(600)
@given(trees(loose=True))
def test_nar_accepts_exactly_the_valid_trees(tree: tuple[Any, ...]) -> None:
    """Trees with unsorted, repeated or invalid names and invalid targets: the NAR is accepted
    exactly when the tree is valid (an independent statement of the rules)."""
    kind, _ = outcome(to_nar(tree))
    assert (kind == "ok") == is_valid(tree)


@scaled(1200)
@given(trees(), st.data())
def test_nar_mutations(tree: tuple[Any, ...], data: st.DataObject) -> None:
    good = to_nar(tree)
    bad = data.draw(mutated_bytes(good, keep=len(nar.MAGIC)))
    got = outcome(bad)  # accepted only if it renders back to exactly `bad` (checked there)
    # the outcome does not depend on how the stream is cut (nor on a file-like source)
    sizes = data.draw(st.lists(st.integers(0, 24), max_size=20))
    assert outcome(bad, cut(bad, sizes)) == got
    assert outcome(bad, io.BytesIO(bad)) == got


@scaled(400)
@given(st.binary(max_size=400))
def test_nar_random_bytes(raw: bytes) -> None:
    outcome(raw)
    outcome(nar.MAGIC + raw)


def strings(data: bytes) -> list[bytes]:
    """A valid NAR as what it is made of: the magic, then a sequence of NAR strings (tokens,
    names, targets and file contents alike), each returned with its length and padding."""
    out, i = [], 0
    while i < len(data):
        n = int.from_bytes(data[i : i + 8], "little")
        end = i + 8 + n + (-n % 8)
        out.append(data[i:end])
        i = end
    return out


@st.composite
def token_mutations(draw: st.DrawFn, data: bytes) -> bytes:
    """A valid NAR edited at the level of its strings: one deleted, duplicated, swapped with its
    neighbour, replaced by a grammar token or another of its strings, or a token inserted.
    Structured damage anywhere in the tree, deep inside the grammar."""
    toks = strings(data)
    for _ in range(draw(st.integers(1, 2))):
        i = draw(st.integers(1, len(toks) - 1)) if len(toks) > 1 else 1
        op = draw(st.sampled_from(["delete", "duplicate", "swap", "replace", "insert"]))
        if op == "delete" and i < len(toks):
            del toks[i]
        elif op == "duplicate" and i < len(toks):
            toks.insert(i, toks[i])
        elif op == "swap" and i + 1 < len(toks):
            toks[i], toks[i + 1] = toks[i + 1], toks[i]
        elif op == "replace" and i < len(toks):
            toks[i] = draw(st.one_of(st.sampled_from(TOKENS), st.sampled_from(toks)))
        else:
            toks.insert(i, draw(st.sampled_from(TOKENS)))
    return b"".join(toks)


TOKENS = [
    s(t)
    for t in (
        b"(",
        b")",
        b"type",
        b"regular",
        b"executable",
        b"",
        b"contents",
        b"symlink",
        b"target",
        b"directory",
        b"entry",
        b"name",
        b"node",
        b"a",
        b"b",
        b"x",
    )
]


@scaled(600)
@given(st.lists(st.one_of(st.sampled_from(TOKENS), st.binary(max_size=12).map(s)), max_size=40))
def test_nar_token_soup(tokens: list[bytes]) -> None:
    """Sequences of well-formed strings (mostly grammar tokens): only grammatical ones pass."""
    outcome(nar.MAGIC + b"".join(tokens))


@scaled(1000)
@given(trees(), st.data())
def test_nar_token_mutations(tree: tuple[Any, ...], data: st.DataObject) -> None:
    good = to_nar(tree)
    assert b"".join(strings(good)) == good
    bad = data.draw(token_mutations(good))
    assert outcome(bad, cut(bad, data.draw(st.lists(st.integers(0, 24), max_size=20)))) == outcome(bad)


@scaled(400)
@given(trees(), st.data())
def test_nar_streamed_files_and_early_flushes(tree: tuple[Any, ...], data: st.DataObject) -> None:
    """The big-file path (blob writer fed in pieces) and early Directory puts, made reachable by
    small limits: the same outcome as with the defaults."""
    good = to_nar(tree)
    bad = data.draw(st.one_of(st.just(good), mutated_bytes(good, keep=len(nar.MAGIC)), token_mutations(good)))
    plain = outcome(bad)
    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(nar_reader, "SMALL_FILE", data.draw(st.integers(0, 16))))
        stack.enter_context(mock.patch.object(nar_reader, "PIECE", data.draw(st.integers(1, 9))))
        stack.enter_context(mock.patch.object(nar_reader, "SETTLE_BYTES", data.draw(st.integers(1, 64))))
        assert outcome(bad, flush_entries=data.draw(st.integers(1, 8))) == plain


# --- store paths and nixbase32 ---


@scaled(500)
@given(st.binary(max_size=64))
def test_nixbase32_roundtrip(b: bytes) -> None:
    text = nixbase32.encode(b)
    assert len(text) == nixbase32.encoded_len(len(b))
    assert set(text) <= set(nixbase32.ALPHABET)
    assert nixbase32.decode(text, len(b)) == b
    assert nixbase32.decode(text) == b


@scaled(500)
@given(st.one_of(st.text(max_size=60), st.text(nixbase32.ALPHABET, max_size=60)), st.none() | st.integers(0, 40))
def test_nixbase32_decode_arbitrary(text: str, length: int | None) -> None:
    try:
        b = nixbase32.decode(text, length)
    except ValidationError:
        return
    assert nixbase32.encode(b) == text  # only the canonical form is accepted
    if length is not None:
        assert len(b) == length


@scaled(300)
@given(st.binary(min_size=20, max_size=20), st.text(SP_CHARS, min_size=1, max_size=211))
def test_store_path_roundtrip(h: bytes, name: str) -> None:
    sp = StorePath(h, name)
    assert StorePath.parse(sp.absolute) == sp
    assert StorePath.parse(sp.absolute + "/") == sp
    assert StorePath.parse(sp.basename) == sp
    assert StorePath.parse_basename(sp.basename.encode()) == sp


def _arbitrary_store_paths() -> st.SearchStrategy[str]:
    return st.one_of(
        st.text(max_size=80),
        basenames(),
        basenames().map(lambda b: "/nix/store/" + b),
        st.builds(lambda b, t: "/nix/store/" + b + t, basenames(), st.text(max_size=4)),
        st.builds(lambda b, i, c: b[:i] + c + b[i + 1 :], basenames(), st.integers(0, 40), st.characters()),
    )


@scaled(500)
@given(_arbitrary_store_paths())
@example("/nix/store/00000000000000000000000000000000-x\n")  # `$` in a regex: a name ending in a newline
def test_store_path_parse_arbitrary(text: str) -> None:
    try:
        sp = StorePath.parse(text)
    except ValidationError:
        return
    assert re.fullmatch(r"[A-Za-z0-9+\-_?=.]{1,211}", sp.name), sp.name
    assert len(sp.digest) == 20
    assert text.rstrip("/") in (sp.absolute, sp.basename)
    assert StorePath.parse(sp.absolute) == sp
    raw = text.encode("utf-8", "surrogatepass")
    if "/" not in text:
        assert StorePath.parse_basename(raw) == sp


@scaled(300)
@given(st.one_of(st.binary(max_size=80), basenames().map(str.encode)))
def test_store_path_parse_basename_bytes(raw: bytes) -> None:
    try:
        sp = StorePath.parse_basename(raw)
    except ValidationError:
        return
    assert sp.basename.encode() == raw


@scaled(300)
@given(st.binary(min_size=32, max_size=32), store_path_names())
def test_store_path_from_nar_sha256(h: bytes, name: str) -> None:
    try:
        sp = StorePath.from_nar_sha256(h, name)
    except ValidationError:
        assert not re.fullmatch(r"[A-Za-z0-9+\-_?=.]{1,211}", name)
        return
    assert re.fullmatch(r"[A-Za-z0-9+\-_?=.]{1,211}", name)
    assert StorePath.parse(sp.absolute) == sp


@scaled(300)
@given(
    st.one_of(
        st.text(max_size=70),
        st.builds(lambda d, a, b: a + d.hex() + b, digests, st.sampled_from(["", " "]), st.sampled_from(["", "\n"])),
        digests.map(lambda d: d.b3_base64()),
    )
)
@example("0" * 64 + "\n")
def test_digest_parse_arbitrary(text: str) -> None:
    try:
        d = B3Digest.parse(text)
    except ValidationError:
        return
    assert len(d) == 32
    assert B3Digest.parse(d.hex()) == d == B3Digest.parse(d.b3_base64())
    try:
        h = B3Digest.from_hex(text)
    except ValidationError:
        return
    assert h.hex() == text.lower() and h == d
