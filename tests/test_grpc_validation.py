"""Every rule of PROTOCOL.md "Validation", over the raw generated stubs against a real daemon.

Each rejected request must give INVALID_ARGUMENT (or NOT_FOUND where the protocol says
so) with a message naming what is wrong; a rejected Directory Put stream stores nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import blake3
import grpc
import pytest
from conftest import Daemon

from tvix_store.core import nixbase32
from tvix_store.protocol.g1 import (
    castore_pb2 as c,
)
from tvix_store.protocol.g1 import (
    pathinfo_pb2 as p,
)
from tvix_store.protocol.g1 import (
    rpc_blobstore_pb2 as rb,
)
from tvix_store.protocol.g1 import (
    rpc_blobstore_pb2_grpc as rbg,
)
from tvix_store.protocol.g1 import (
    rpc_directory_pb2 as rd,
)
from tvix_store.protocol.g1 import (
    rpc_directory_pb2_grpc as rdg,
)
from tvix_store.protocol.g1 import (
    rpc_pathinfo_pb2 as rp,
)
from tvix_store.protocol.g1 import (
    rpc_pathinfo_pb2_grpc as rpg,
)

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
T = 10.0


class Stubs:
    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target)
        self.blobs = rbg.BlobServiceStub(self.channel)
        self.dirs = rdg.DirectoryServiceStub(self.channel)
        self.infos = rpg.PathInfoServiceStub(self.channel)


@pytest.fixture(scope="module")
def stubs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stubs]:
    tmp = tmp_path_factory.mktemp("validation")
    d = Daemon(f"local://{tmp / 'store'}")
    s = Stubs(d.address)
    # Directories name blobs the store has (tests/test_admission.py): HELLO first
    assert s.blobs.Put(iter([rb.BlobChunk(data=HELLO)]), timeout=T).digest == HELLO_D
    try:
        yield s
    finally:
        s.channel.close()
        d.stop()


def b3(data: bytes) -> bytes:
    return blake3.blake3(data).digest()


def ddigest(d: c.Directory) -> bytes:
    return b3(d.SerializeToString(deterministic=True))


def fails(code: grpc.StatusCode, fn, *args, words: tuple[str, ...] = (), **kw) -> str:  # noqa: ANN001
    with pytest.raises(grpc.RpcError) as ei:
        r = fn(*args, timeout=T, **kw)
        if hasattr(r, "__iter__") and not isinstance(r, (bytes, str)):
            list(r)
    err = ei.value
    assert err.code() == code, err.details()
    details = err.details() or ""
    for w in words:
        assert w.lower() in details.lower(), f"{w!r} not in {details!r}"
    return details


HELLO = b"Hello World!"
HELLO_D = b3(HELLO)


def fnode(name: str, digest: bytes = HELLO_D, size: int = 12) -> c.FileNode:
    return c.FileNode(name=name, digest=digest, size=size)


def put_dirs(stubs: Stubs, *dirs: c.Directory, timeout: float = T) -> rd.PutDirectoryResponse:
    return stubs.dirs.Put(iter(dirs), timeout=timeout)


def store_path_name(name: str, seed: bytes = b"x") -> str:
    return nixbase32.encode(hashlib.sha256(seed).digest()[:20]) + "-" + name


# --- digests of the wrong length ---------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 31, 33, 64])
def test_blob_digest_length(stubs: Stubs, n: int) -> None:
    fails(INVALID, stubs.blobs.Stat, rb.StatBlobRequest(digest=b"\1" * n), words=("digest", "32"))
    fails(INVALID, stubs.blobs.Read, rb.ReadBlobRequest(digest=b"\1" * n), words=("digest", "32"))


@pytest.mark.parametrize("n", [0, 20, 33])
def test_directory_get_digest_length(stubs: Stubs, n: int) -> None:
    fails(INVALID, stubs.dirs.Get, rd.GetDirectoryRequest(digest=b"\1" * n), words=("digest", "32"))


def test_directory_entry_digest_lengths(stubs: Stubs) -> None:
    fails(INVALID, put_dirs, stubs, c.Directory(files=[fnode("f", b"\1" * 31)]), words=("digest", "'f'"))
    bad_dir = c.Directory(directories=[c.DirectoryNode(name="d", digest=b"\1" * 5, size=0)])
    fails(INVALID, put_dirs, stubs, bad_dir, words=("digest", "'d'"))


def test_pathinfo_digest_lengths(stubs: Stubs) -> None:
    info = p.PathInfo(node=p.Node(file=fnode(store_path_name("f"), b"\1" * 3)))
    fails(INVALID, stubs.infos.Put, info, words=("digest",))
    fails(INVALID, stubs.infos.CalculateNAR, p.Node(file=fnode("f", b"")), words=("digest",))
    dn = c.DirectoryNode(name="d", digest=b"\1" * 40, size=0)
    fails(INVALID, stubs.infos.CalculateNAR, p.Node(directory=dn), words=("digest",))


@pytest.mark.parametrize("n", [0, 19, 21, 32])
def test_output_hash_length(stubs: Stubs, n: int) -> None:
    fails(INVALID, stubs.infos.Get, rp.GetPathInfoRequest(by_output_hash=b"\1" * n), words=("hash", "20"))


@pytest.mark.parametrize("n", [0, 19, 32])
def test_reference_length(stubs: Stubs, n: int) -> None:
    info = p.PathInfo(node=p.Node(symlink=c.SymlinkNode(name=store_path_name("l"), target="t")), references=[b"r" * n])
    fails(INVALID, stubs.infos.Put, info, words=("reference", "20"))


# --- Directory names, order, uniqueness, symlink targets --------------------------------

BAD_NAMES = [("", "empty"), (".", "."), ("..", ".."), ("a/b", "/"), ("a\0b", "nul"), ("x" * 256, "255")]


@pytest.mark.parametrize(("name", "word"), BAD_NAMES)
@pytest.mark.parametrize("kind", ["directories", "files", "symlinks"])
def test_bad_names(stubs: Stubs, kind: str, name: str, word: str) -> None:
    if kind == "files":
        d = c.Directory(files=[fnode(name)])
    elif kind == "symlinks":
        d = c.Directory(symlinks=[c.SymlinkNode(name=name, target="t")])
    else:
        empty = ddigest(c.Directory())
        put_dirs(stubs, c.Directory())
        d = c.Directory(directories=[c.DirectoryNode(name=name, digest=empty, size=0)])
    fails(INVALID, put_dirs, stubs, d, words=("name", word))


def test_name_of_255_bytes_is_fine(stubs: Stubs) -> None:
    d = c.Directory(files=[fnode("é" * 127 + "x")])  # 255 bytes of UTF-8
    assert put_dirs(stubs, d).root_digest == ddigest(d)


@pytest.mark.parametrize("kind", ["directories", "files", "symlinks"])
@pytest.mark.parametrize("names", [["b", "a"], ["a", "a"], ["a", "c", "b"], ["B", "a", "A"]])
def test_lists_not_strictly_ascending(stubs: Stubs, kind: str, names: list[str]) -> None:
    empty = ddigest(c.Directory())
    put_dirs(stubs, c.Directory())
    if kind == "files":
        d = c.Directory(files=[fnode(n) for n in names])
    elif kind == "symlinks":
        d = c.Directory(symlinks=[c.SymlinkNode(name=n, target="t") for n in names])
    else:
        d = c.Directory(directories=[c.DirectoryNode(name=n, digest=empty, size=0) for n in names])
    fails(INVALID, put_dirs, stubs, d, words=(kind,))


def test_bytewise_order(stubs: Stubs) -> None:
    # bytewise: "B" (0x42) < "a" (0x61) < "é" (0xc3 0xa9)
    d = c.Directory(files=[fnode("B"), fnode("a"), fnode("é")])
    assert put_dirs(stubs, d).root_digest == ddigest(d)


@pytest.mark.parametrize("pair", [("files", "symlinks"), ("directories", "files"), ("directories", "symlinks")])
def test_name_used_twice_across_lists(stubs: Stubs, pair: tuple[str, str]) -> None:
    empty = ddigest(c.Directory())
    put_dirs(stubs, c.Directory())
    kw: dict[str, list] = {
        "directories": [c.DirectoryNode(name="same", digest=empty, size=0)],
        "files": [fnode("same")],
        "symlinks": [c.SymlinkNode(name="same", target="t")],
    }
    d = c.Directory(**{k: kw[k] for k in pair})
    fails(INVALID, put_dirs, stubs, d, words=("duplicate", "same"))


@pytest.mark.parametrize(("target", "word"), [("", "empty"), ("a\0b", "nul"), ("x" * 4096, "4095")])
def test_bad_symlink_target(stubs: Stubs, target: str, word: str) -> None:
    fails(INVALID, put_dirs, stubs, c.Directory(symlinks=[c.SymlinkNode(name="l", target=target)]), words=(word,))


def test_symlink_target_of_4095_bytes_is_fine(stubs: Stubs) -> None:
    d = c.Directory(symlinks=[c.SymlinkNode(name="l", target="y" * 4095)])
    assert put_dirs(stubs, d).root_digest == ddigest(d)


def test_directory_node_size_disagrees(stubs: Stubs) -> None:
    leaf = c.Directory(files=[fnode("a"), fnode("b")])  # size 2
    for wrong in (0, 1, 3):
        parent = c.Directory(directories=[c.DirectoryNode(name="sub", digest=ddigest(leaf), size=wrong)])
        # referenced Directory sent in the same stream
        fails(INVALID, put_dirs, stubs, leaf, parent, words=("size",))
    put_dirs(stubs, leaf)
    parent = c.Directory(directories=[c.DirectoryNode(name="sub", digest=ddigest(leaf), size=5)])
    # referenced Directory already stored
    fails(INVALID, put_dirs, stubs, parent, words=("size", "sub"))
    ok = c.Directory(directories=[c.DirectoryNode(name="sub", digest=ddigest(leaf), size=2)])
    assert put_dirs(stubs, ok).root_digest == ddigest(ok)


# --- Directory Put streams ------------------------------------------------------------------


def get_dir(stubs: Stubs, digest: bytes, timeout: float = T) -> list[c.Directory]:
    return list(stubs.dirs.Get(rd.GetDirectoryRequest(digest=digest), timeout=timeout))


def test_reference_to_unknown_directory(stubs: Stubs) -> None:
    unknown = b3(b"no such directory")
    d = c.Directory(directories=[c.DirectoryNode(name="ghost", digest=unknown, size=0)])
    fails(INVALID, put_dirs, stubs, d, words=("unknown", unknown.hex()))
    fails(NOT_FOUND, get_dir, stubs, ddigest(d))


def test_empty_stream(stubs: Stubs) -> None:
    fails(INVALID, put_dirs, stubs, words=("no directories",))


def test_more_than_one_root_stores_nothing(stubs: Stubs) -> None:
    a = c.Directory(files=[fnode("only-in-rejected-stream-a")])
    b = c.Directory(files=[fnode("only-in-rejected-stream-b")])
    fails(INVALID, put_dirs, stubs, a, b, words=("root",))
    fails(NOT_FOUND, get_dir, stubs, ddigest(a))
    fails(NOT_FOUND, get_dir, stubs, ddigest(b))


def test_rejected_stream_stores_nothing(stubs: Stubs) -> None:
    leaf = c.Directory(files=[fnode("leaf-of-rejected-stream")])
    mid = c.Directory(directories=[c.DirectoryNode(name="leaf", digest=ddigest(leaf), size=1)])
    bad = c.Directory(
        directories=[c.DirectoryNode(name="mid", digest=ddigest(mid), size=2)], files=[fnode("x/y")]
    )  # invalid name, last in the stream
    fails(INVALID, put_dirs, stubs, leaf, mid, bad, words=("name",))
    for d in (leaf, mid, bad):
        fails(NOT_FOUND, get_dir, stubs, ddigest(d))
    # the valid part alone is accepted, and readable
    assert put_dirs(stubs, leaf, mid).root_digest == ddigest(mid)
    assert get_dir(stubs, ddigest(mid)) == [mid]


def test_last_sent_must_be_root(stubs: Stubs) -> None:
    leaf = c.Directory(files=[fnode("leaf-sent-after-its-parent")])
    parent = c.Directory(directories=[c.DirectoryNode(name="l", digest=ddigest(leaf), size=1)])
    # parent first: references something not sent yet nor stored
    fails(INVALID, put_dirs, stubs, parent, leaf, words=("unknown",))
    fails(NOT_FOUND, get_dir, stubs, ddigest(leaf))


def test_resending_is_harmless(stubs: Stubs) -> None:
    leaf = c.Directory(files=[fnode("resent")])
    parent = c.Directory(directories=[c.DirectoryNode(name="l", digest=ddigest(leaf), size=1)])
    assert put_dirs(stubs, leaf, leaf, parent).root_digest == ddigest(parent)


# --- PathInfo -----------------------------------------------------------------------------


def test_pathinfo_without_node(stubs: Stubs) -> None:
    fails(INVALID, stubs.infos.Put, p.PathInfo(), words=("node",))
    fails(INVALID, stubs.infos.Put, p.PathInfo(node=p.Node()), words=("node",))


@pytest.mark.parametrize(
    "name",
    [
        "hello",
        "0" * 32,
        "0" * 32 + "-",
        "0" * 31 + "-hello",
        "e" * 32 + "-hello",  # 'e' is not in the nixbase32 alphabet
        "0" * 32 + "_hello",
        "0" * 32 + "-hel lo",
        "0" * 32 + "-hel/lo",
        "0" * 32 + "-" + "a" * 212,
    ],
)
def test_root_node_name_not_store_path(stubs: Stubs, name: str) -> None:
    info = p.PathInfo(node=p.Node(symlink=c.SymlinkNode(name=name, target="t")))
    fails(INVALID, stubs.infos.Put, info, words=("store path",))


def test_root_node_name_edge_cases_ok(stubs: Stubs) -> None:
    for name in (store_path_name("a" * 211, b"long"), store_path_name("+-_?=.AZaz09", b"chars")):
        info = p.PathInfo(node=p.Node(symlink=c.SymlinkNode(name=name, target="t")))
        assert stubs.infos.Put(info, timeout=T) == info


def test_reference_names_not_matching(stubs: Stubs) -> None:
    ref = store_path_name("dep", b"dep")
    ref_hash = nixbase32.decode(ref[:32], 20)
    node = p.Node(symlink=c.SymlinkNode(name=store_path_name("main", b"main"), target="t"))
    sha = hashlib.sha256(b"nar").digest()
    cases = [
        ([ref_hash], []),  # count differs
        ([], [ref]),
        ([ref_hash], [store_path_name("dep", b"other")]),  # hash differs
        ([ref_hash], ["not-a-store-path"]),
    ]
    for refs, names in cases:
        info = p.PathInfo(
            node=node, references=refs, narinfo=p.NARInfo(nar_size=1, nar_sha256=sha, reference_names=names)
        )
        fails(INVALID, stubs.infos.Put, info, words=("reference",))
    nar = stubs.infos.CalculateNAR(node, timeout=T)
    ok = p.PathInfo(
        node=node,
        references=[ref_hash],
        narinfo=p.NARInfo(nar_size=nar.nar_size, nar_sha256=nar.nar_sha256, reference_names=[ref]),
    )
    assert stubs.infos.Put(ok, timeout=T) == ok


@pytest.mark.parametrize("n", [0, 20, 31, 33])
def test_nar_sha256_length(stubs: Stubs, n: int) -> None:
    node = p.Node(symlink=c.SymlinkNode(name=store_path_name("n"), target="t"))
    info = p.PathInfo(node=node, narinfo=p.NARInfo(nar_size=1, nar_sha256=b"\1" * n))
    fails(INVALID, stubs.infos.Put, info, words=("nar_sha256",))


def test_pathinfo_root_node_validated(stubs: Stubs) -> None:
    node = p.Node(symlink=c.SymlinkNode(name=store_path_name("s"), target=""))
    fails(INVALID, stubs.infos.Put, p.PathInfo(node=node), words=("target",))


# --- CalculateNAR, by_what, absent -------------------------------------------------------


def test_calculate_nar_missing_blob(stubs: Stubs) -> None:
    missing = b3(b"this blob was never uploaded")
    fails(NOT_FOUND, stubs.infos.CalculateNAR, p.Node(file=fnode("f", missing, 28)), words=(missing.hex(),))


def test_calculate_nar_missing_directory(stubs: Stubs) -> None:
    missing = b3(b"this directory was never uploaded")
    dn = c.DirectoryNode(name="d", digest=missing, size=1)
    fails(NOT_FOUND, stubs.infos.CalculateNAR, p.Node(directory=dn), words=(missing.hex(),))


def test_directory_naming_an_absent_blob_is_refused(stubs: Stubs) -> None:
    """Blobs go before the Directories that name them: a Directory naming a blob the store lacks
    is FAILED_PRECONDITION (naming the blob), one naming a blob with a wrong size INVALID_ARGUMENT;
    neither is stored (so CalculateNAR never meets a hole below a stored Directory)."""
    missing = b3(b"blob below a stored directory")
    d = c.Directory(files=[fnode("f", missing, 29)])
    fails(grpc.StatusCode.FAILED_PRECONDITION, put_dirs, stubs, d, words=(missing.hex(), "does not have"))
    wrong = c.Directory(files=[fnode("f", HELLO_D, 13)])
    fails(INVALID, put_dirs, stubs, wrong, words=(HELLO_D.hex(), "size 13", "12 bytes"))
    for x in (d, wrong):
        fails(NOT_FOUND, get_dir, stubs, ddigest(x))


def test_requests_without_by_what(stubs: Stubs) -> None:
    fails(INVALID, stubs.infos.Get, rp.GetPathInfoRequest(), words=("by_what",))
    fails(INVALID, stubs.dirs.Get, rd.GetDirectoryRequest(), words=("by_what",))
    fails(INVALID, stubs.dirs.Get, rd.GetDirectoryRequest(recursive=True), words=("by_what",))


def test_absent_is_not_found(stubs: Stubs) -> None:
    absent = b3(b"absent")
    fails(NOT_FOUND, stubs.blobs.Stat, rb.StatBlobRequest(digest=absent))
    fails(NOT_FOUND, stubs.blobs.Read, rb.ReadBlobRequest(digest=absent))
    fails(NOT_FOUND, stubs.dirs.Get, rd.GetDirectoryRequest(digest=absent))
    fails(NOT_FOUND, stubs.dirs.Get, rd.GetDirectoryRequest(digest=absent, recursive=True))
    fails(NOT_FOUND, stubs.infos.Get, rp.GetPathInfoRequest(by_output_hash=b"\7" * 20))
