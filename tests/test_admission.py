"""Write integrity of a real daemon against a hostile client speaking the raw protocol.

A store path that exists is never replaced (ALREADY_EXISTS) and keeps rendering its own NAR,
byte for byte what `nix-store --dump` gives for the tree it was imported from; identical re-puts
are fine and merge signatures. A PathInfo is stored only when the store has its closure
(FAILED_PRECONDITION otherwise) and its NarSize/NarHash are those of the NAR the store renders
(INVALID_ARGUMENT otherwise). A Directory Put stream is held in bounded memory (the daemon's
peak RSS grows by a fraction of the stream) and within the configured limits
(RESOURCE_EXHAUSTED beyond them, nothing stored).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import blake3
import grpc
import pytest
from conftest import Daemon, cli
from fixtures import make_tree, nix_dump, nix_nar_hash

from tvix_store.core import nixbase32
from tvix_store.core.pathinfo import StorePath
from tvix_store.protocol.g1 import castore_pb2 as c
from tvix_store.protocol.g1 import pathinfo_pb2 as p
from tvix_store.protocol.g1 import rpc_blobstore_pb2 as rb
from tvix_store.protocol.g1 import rpc_blobstore_pb2_grpc as rbg
from tvix_store.protocol.g1 import rpc_directory_pb2 as rd
from tvix_store.protocol.g1 import rpc_directory_pb2_grpc as rdg
from tvix_store.protocol.g1 import rpc_pathinfo_pb2 as rp
from tvix_store.protocol.g1 import rpc_pathinfo_pb2_grpc as rpg

T = 30.0


class Client:
    """Raw stubs: what any client of the port can send."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20)])
        self.blobs = rbg.BlobServiceStub(self.channel)
        self.dirs = rdg.DirectoryServiceStub(self.channel)
        self.infos = rpg.PathInfoServiceStub(self.channel)

    def get(self, store_path: str, timeout: float = T) -> p.PathInfo:
        h = StorePath.parse(store_path).digest
        return self.infos.Get(rp.GetPathInfoRequest(by_output_hash=h), timeout=timeout)

    def get_dir(self, digest: bytes, timeout: float = T) -> list[c.Directory]:
        return list(self.dirs.Get(rd.GetDirectoryRequest(digest=digest), timeout=timeout))


def refused(code: grpc.StatusCode, fn, *args, words: tuple[str, ...] = ()) -> str:  # noqa: ANN001
    with pytest.raises(grpc.RpcError) as ei:
        fn(*args, timeout=T)
    assert ei.value.code() == code, ei.value.details()
    details = ei.value.details() or ""
    for w in words:
        assert w in details, details
    return details


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, Client, Path, str, Path, str]]:
    """A daemon with two trees imported through it: (daemon, client, tree A, its store path, B, its)."""
    tmp = tmp_path_factory.mktemp("admission")
    d = Daemon(f"local://{tmp / 'store'}")
    a = make_tree(tmp / "a", seed=1)
    b = make_tree(tmp / "b", seed=2)
    sp_a = cli("import", "--store", d.url, str(a)).stdout.decode().strip()
    sp_b = cli("import", "--store", d.url, str(b)).stdout.decode().strip()
    client = Client(d.address)
    try:
        yield d, client, a, sp_a, b, sp_b
    finally:
        client.channel.close()
        assert d.stop() == 0


def renamed(node: p.Node, name: str) -> p.Node:
    out = p.Node()
    out.CopyFrom(node)
    getattr(out, out.WhichOneof("node")).name = name.encode()
    return out


def test_an_existing_store_path_is_never_replaced(served: tuple[Daemon, Client, Path, str, Path, str]) -> None:
    d, client, a, sp_a, b, sp_b = served
    info_a, info_b = client.get(sp_a), client.get(sp_b)
    # B's content (with B's correct NAR hash and size) under A's name
    hostile = p.PathInfo()
    hostile.CopyFrom(info_b)
    hostile.node.CopyFrom(renamed(info_b.node, Path(sp_a).name))
    refused(grpc.StatusCode.ALREADY_EXISTS, client.infos.Put, hostile, words=(sp_a, "never replaced"))
    # same node, other metadata (a reference added) is a change too
    meta = p.PathInfo()
    meta.CopyFrom(info_a)
    meta.references.append(StorePath.parse(sp_b).digest)
    meta.narinfo.reference_names.append(Path(sp_b).name)
    refused(grpc.StatusCode.ALREADY_EXISTS, client.infos.Put, meta, words=(sp_a,))
    assert client.get(sp_a) == info_a
    assert cli("nar", "--store", d.url, sp_a).stdout == nix_dump(a)


def test_identical_reput_is_fine_and_merges_signatures(served: tuple[Daemon, Client, Path, str, Path, str]) -> None:
    _, client, _, _, _, sp_b = served
    info = client.get(sp_b)
    signed = p.PathInfo()
    signed.CopyFrom(info)
    signed.narinfo.signatures.add(name="cache.example.org-1", data=b"\x01" * 64)
    got = client.infos.Put(signed, timeout=T)
    assert [s.name for s in got.narinfo.signatures] == ["cache.example.org-1"]
    again = p.PathInfo()
    again.CopyFrom(info)
    again.narinfo.signatures.add(name="other.example.org-1", data=b"\x02" * 64)
    client.infos.Put(again, timeout=T)
    assert [s.name for s in client.get(sp_b).narinfo.signatures] == ["cache.example.org-1", "other.example.org-1"]
    assert client.infos.Put(info, timeout=T).narinfo.signatures == client.get(sp_b).narinfo.signatures


def fresh_name(seed: str, name: str = "hostile") -> str:
    h = random.Random(seed).randbytes(20)
    return f"/nix/store/{nixbase32.encode(h)}-{name}"


def test_nar_hash_and_size_must_match_the_node(served: tuple[Daemon, Client, Path, str, Path, str]) -> None:
    _, client, a, sp_a, _, _ = served
    info_a = client.get(sp_a)
    size, sha = nix_nar_hash(a)
    assert (info_a.narinfo.nar_size, info_a.narinfo.nar_sha256) == (size, sha)
    for field, value, word in (("nar_sha256", bytes(32), "NarHash"), ("nar_size", size + 8, "NarSize")):
        name = fresh_name(field)
        bad = p.PathInfo()
        bad.CopyFrom(info_a)
        bad.node.CopyFrom(renamed(info_a.node, Path(name).name))
        setattr(bad.narinfo, field, value)
        refused(
            grpc.StatusCode.INVALID_ARGUMENT,
            client.infos.Put,
            bad,
            words=(word, sha.hex() if field == "nar_sha256" else str(size)),
        )
        refused(grpc.StatusCode.NOT_FOUND, client.get, name)
    # the same content under another name, with the right hash: accepted (the NAR is the node's)
    ok = p.PathInfo()
    ok.CopyFrom(info_a)
    ok.node.CopyFrom(renamed(info_a.node, Path(fresh_name("ok")).name))
    assert client.infos.Put(ok, timeout=T) == ok


def test_an_incomplete_closure_is_refused(served: tuple[Daemon, Client, Path, str, Path, str]) -> None:
    _, client, _, _, _, _ = served
    missing_dir = bytes(range(32))
    nar = p.NARInfo(nar_size=8, nar_sha256=bytes(32))
    cases = [
        (p.Node(directory=c.DirectoryNode(name=b"", digest=missing_dir, size=3)), missing_dir.hex()),
        (p.Node(file=c.FileNode(name=b"", digest=missing_dir, size=5)), missing_dir.hex()),
    ]
    for i, (node, word) in enumerate(cases):
        name = fresh_name(f"incomplete{i}")
        info = p.PathInfo(node=renamed(node, Path(name).name), narinfo=nar)
        refused(grpc.StatusCode.FAILED_PRECONDITION, client.infos.Put, info, words=(word,))
        refused(grpc.StatusCode.NOT_FOUND, client.get, name)
    # a root file whose size disagrees with its blob
    data = b"twelve bytes"
    digest = client.blobs.Put(iter([rb.BlobChunk(data=data)]), timeout=T).digest
    name = fresh_name("wrong size")
    info = p.PathInfo(node=p.Node(file=c.FileNode(name=Path(name).name.encode(), digest=digest, size=13)), narinfo=nar)
    refused(grpc.StatusCode.INVALID_ARGUMENT, client.infos.Put, info, words=("13", "12"))
    refused(grpc.StatusCode.NOT_FOUND, client.get, name)


# --- Directory Put: bounded memory, limits ----------------------------------------------------


def big_leaves(n: int, seed: int) -> list[c.Directory]:
    """`n` distinct Directories of about 8 MiB each (2,000 symlinks with 4,000-byte targets)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        out.append(
            c.Directory(
                symlinks=[
                    c.SymlinkNode(name=b"s%05d" % j, target=rng.randbytes(2000).hex().encode()) for j in range(2000)
                ]
            )
        )
    return out


def stream_of(leaves: list[c.Directory]) -> list[c.Directory]:
    """The leaves, then a root naming each: one valid graph."""
    root = c.Directory()
    for i, leaf in enumerate(leaves):
        digest = blake3.blake3(leaf.SerializeToString(deterministic=True)).digest()
        root.directories.add(name=b"d%03d" % i, digest=digest, size=len(leaf.symlinks))
    return [*leaves, root]


def vm_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.slow
def test_a_large_directory_stream_is_held_in_bounded_memory(tmp_path: Path) -> None:
    """Peak RSS (VmHWM) follows the size of one message, not of the stream: once the daemon has
    taken two streams of 8 MiB messages (its thread arenas warm), a stream of 48 of them (380 MiB)
    raises its peak by less than a quarter of that; held whole it would be several times it."""
    d = Daemon(f"local://{tmp_path / 'store'}")
    client = Client(d.address)
    try:
        start = vm_hwm(d.proc.pid)
        for n, seed in ((6, 1), (24, 2)):
            client.dirs.Put(iter(stream_of(big_leaves(n, seed))), timeout=120)
        before = vm_hwm(d.proc.pid)
        stream = stream_of(big_leaves(48, seed=3))
        total = sum(m.ByteSize() for m in stream)
        assert total > 360 << 20
        root = client.dirs.Put(iter(stream), timeout=300).root_digest
        after = vm_hwm(d.proc.pid)
        grown = after - before
        assert grown < total // 4, f"a {total >> 20} MiB stream raised the peak by {grown >> 20} MiB"
        assert after - start < 256 << 20, f"peak {after >> 20} MiB (started at {start >> 20} MiB)"
        got = list(client.dirs.Get(rd.GetDirectoryRequest(digest=root, recursive=True), timeout=120))
        assert len(got) == 49 and got[0] == stream[-1]
    finally:
        client.channel.close()
        assert d.stop() == 0


def test_directory_put_limits_are_resource_exhausted_and_store_nothing(tmp_path: Path) -> None:
    d = Daemon(
        f"local://{tmp_path / 'store'}",
        extra=("--max-directory-put-bytes", "20M", "--max-directory-put-count", "5"),
    )
    client = Client(d.address)
    try:
        leaves = big_leaves(3, seed=9)
        refused(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            client.dirs.Put,
            iter(stream_of(leaves)),
            words=("--max-directory-put-bytes",),
        )
        small = [c.Directory(symlinks=[c.SymlinkNode(name=b"s", target=b"%d" % i)]) for i in range(6)]
        refused(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            client.dirs.Put,
            iter(stream_of(small)),
            words=("5 directories", "--max-directory-put-count"),
        )
        for leaf in [*leaves, *small]:
            digest = blake3.blake3(leaf.SerializeToString(deterministic=True)).digest()
            refused(grpc.StatusCode.NOT_FOUND, client.get_dir, digest)
        assert client.dirs.Put(iter(stream_of(small[:4])), timeout=T).root_digest  # within the limits: fine
    finally:
        client.channel.close()
        assert d.stop() == 0
    assert not any("Traceback" in line for line in d.log)
