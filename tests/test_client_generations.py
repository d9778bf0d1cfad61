"""Our gRPC client and every protocol generation: negotiation, forcing, listing, a mount.

- Server doubles: our own servicers behind `StoreServer(generations=…)`, in a process of their
  own on loopback, serving only G1, only G2 or only G3 routes (what an old tvix-store, a 2024
  tvix or a snix daemon answers; anything else is UNIMPLEMENTED). Against each, the client
  (no `?protocol=`) settles on that generation and every service call works: a client that
  used another generation would get UNIMPLEMENTED.
- The full daemon with the client forced to each generation (`?protocol=g1|g2|g3`).
- `path list` over gRPC: works where the server has List, a clear error where not.
- A real FUSE mount of the G3-only double: `store/` lists the path (List) and files read back.

Expected values: blake3 (the `blake3` package) and `nix-store --dump`, never this project's code.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import blake3
import grpc
import pytest
from conftest import Daemon, cli
from fixtures import materialize, nix_nar_hash, random_bytes
from mountutil import MountProc, requires_fuse, wait_until

from tvix_store.compose import open_store
from tvix_store.core.castore import Directory, DirectoryNode, FileNode, SymlinkNode
from tvix_store.core.digest import B3Digest
from tvix_store.core.errors import PreconditionError, UnsupportedError, ValidationError
from tvix_store.core.pathinfo import NarInfo, PathInfo, StorePath
from tvix_store.store import Store

_DOUBLE = r"""
import signal, sys, threading
from tvix_store.compose import open_store
from tvix_store.serve.grpc import StoreServer

store = open_store(sys.argv[1])
server = StoreServer(store, generations=tuple(sys.argv[2].split(",")))
address = server.bind("127.0.0.1:0")
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
server.start()
print("listening on", address, flush=True)
stop.wait()
server.stop(5)
store.close()
"""


class Double:
    """A server process serving only some generations' routes over a local store."""

    def __init__(self, store_dir: Path, generations: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _DOUBLE, f"local://{store_dir}", generations],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()  # blocks until ready or the process ended
        assert line.startswith("listening on "), f"server double did not start ({self.proc.wait()})"
        self.address = line.split()[-1]
        self.url = f"grpc+http://{self.address}"

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


@pytest.fixture
def double(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Double]:
    d = Double(tmp_path / "double-store", request.param)
    try:
        yield d
    finally:
        assert d.stop() == 0


def _negotiated(store: Store) -> dict[str, str | None]:
    """The generation the client settled on for each service (its channel's state)."""
    return store.blobs._r.negotiation.known()  # type: ignore[attr-defined]


def exercise(store: Store, tmp_path: Path, listing: bool, snix_only: bool = False) -> StorePath:
    """Every service method through the client, checked against blake3 and nix-store --dump."""
    small, big = b"#!/bin/sh\necho hi\n", random_bytes(1_500_000, seed=7)
    d_small, d_big = store.blobs.put(small), store.blobs.put(big)
    assert (bytes(d_small), bytes(d_big)) == (blake3.blake3(small).digest(), blake3.blake3(big).digest())
    chunks = store.blobs.chunks(d_big)
    assert chunks is not None and len(chunks) > 1 and sum(c.size for c in chunks) == len(big)
    assert b"".join(store.blobs.read_chunk(c.digest) or b"" for c in chunks) == big
    assert store.blobs.has_many([d_small, B3Digest(bytes(32))]) == [True, False]
    assert dict(store.blobs.read_many([d_small])) == {d_small: small}
    leaf = Directory(files=(FileNode(b"run.sh", d_small, len(small), True),), symlinks=(SymlinkNode(b"l", b"run.sh"),))
    root = Directory(directories=(leaf.as_node(b"bin"),), files=(FileNode(b"data", d_big, len(big)),))
    assert store.directories.put_graph([leaf, root]) == root.digest
    assert store.directories.get(root.digest) == root
    assert list(store.directories.get_recursive(root.digest)) == [root, leaf]
    assert list(store.directories.get_recursive(B3Digest(bytes(32)))) == []
    size, sha = store.pathinfos.calculate_nar(root.as_node(b"x"))
    blobs = {bytes(d_small): small, bytes(d_big): big}
    dirs = {bytes(x.digest): x for x in (leaf, root)}
    assert (size, sha) == nix_nar_hash(materialize(root.as_node(b"x"), tmp_path, blobs, dirs))
    sp = StorePath.from_nar_sha256(sha, "tree")
    info = PathInfo(root.as_node(sp.basename.encode()), narinfo=NarInfo(size, sha))
    assert store.pathinfos.put(info) == info
    assert store.pathinfos.get(sp.digest) == info
    if listing:
        assert info in list(store.pathinfos.iter_all())
    else:
        with pytest.raises(UnsupportedError, match="cannot list path infos"):
            list(store.pathinfos.iter_all())
    bare = PathInfo(root.as_node(StorePath.from_nar_sha256(sha, "bare").basename.encode()))
    if snix_only:  # snix.store.v1 requires a narinfo (and no other path is there, or allowed)
        with pytest.raises(ValidationError, match="narinfo"):
            store.pathinfos.put(bare)
    else:
        assert store.pathinfos.put(bare) == bare
    return sp


@pytest.mark.nix
@pytest.mark.parametrize(
    ("double", "expected"),
    [("g1", ("g1", "g1", "g2")), ("g2", ("g2", "g2", "g2")), ("g3", ("g3", "g3", "g3"))],
    indirect=["double"],
    ids=["g1-only", "g2-only", "g3-only"],
)
def test_client_settles_on_the_generation_served(double: Double, expected: tuple[str, ...], tmp_path: Path) -> None:
    """Against a server of one generation, the client (no ?protocol=) finds it per service and
    every call works. A 2022 PathInfoService is spoken with G2's messages on the shared path
    (the same bytes); it has no List."""
    with open_store(double.url, timeout=10) as store:
        exercise(store, tmp_path, listing=expected[0] != "g1", snix_only=expected[0] == "g3")
        assert tuple(_negotiated(store)[s] for s in ("blob", "directory", "pathinfo")) == expected


@pytest.mark.nix
@pytest.mark.parametrize("generation", ["g1", "g2", "g3"])
def test_client_forced_to_each_generation(generation: str, tmp_path: Path) -> None:
    """`?protocol=` against the daemon that serves all three: that generation, for every service."""
    d = Daemon(f"local://{tmp_path / 'store'}")
    try:
        with open_store(f"{d.url}?protocol={generation}", timeout=10) as store:
            exercise(store, tmp_path, listing=generation != "g1", snix_only=generation == "g3")
            assert set(_negotiated(store).values()) == {generation}
        with open_store(d.url, timeout=10) as store:  # unforced: the newest, G3
            assert store.blobs.has(B3Digest(blake3.blake3(b"#!/bin/sh\necho hi\n").digest()))
            assert store.pathinfos.get(bytes(20)) is None
            assert list(store.directories.get_recursive(B3Digest(bytes(32)))) == []
            assert _negotiated(store) == {"blob": "g3", "directory": "g3", "pathinfo": "g3"}
    finally:
        assert d.stop() == 0


@pytest.mark.parametrize("double", ["g3"], indirect=True)
def test_forcing_a_generation_the_server_lacks_is_a_clear_error(double: Double) -> None:
    with open_store(f"{double.url}?protocol=g1", timeout=10) as store:
        with pytest.raises(UnsupportedError, match="does not implement"):
            store.blobs.has(B3Digest(bytes(32)))
    p = cli("blob", "stat", "--store", f"{double.url}?protocol=g5", "0" * 64, check=False)
    assert p.returncode != 0 and b"protocol=g1|g2|g3" in p.stderr


@pytest.mark.parametrize("double", ["g1"], indirect=True)
def test_path_list_over_grpc(double: Double, tmp_path: Path) -> None:
    """`path list` of a remote: the paths where the server has List (the daemon), one error line
    naming the reason where it has not (a 2022 server)."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_bytes(b"listed\n")
    d = Daemon(f"local://{tmp_path / 'store'}")
    try:
        sp = cli("import", "--store", d.url, str(tree)).stdout.decode().strip()
        assert cli("path", "list", "--store", d.url).stdout.decode().split() == [sp]
    finally:
        assert d.stop() == 0
    p = cli("path", "list", "--store", double.url, check=False)
    assert p.returncode == 1
    assert b"cannot list path infos" in p.stderr


@pytest.mark.mount
@requires_fuse
@pytest.mark.parametrize("double", ["g3"], indirect=True)
def test_mount_of_a_g3_only_server(double: Double, tmp_path: Path) -> None:
    """Our mount over a server that speaks only snix.castore.v1/snix.store.v1: `store/` is
    listed (List), and a file reads back its bytes."""
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    data = random_bytes(700_000, seed=3)
    (tree / "sub" / "big").write_bytes(data)
    (tree / "hello").write_bytes(b"hello\n")
    Path(os.fsdecode(os.fsencode(tree) + b"/caf\xe9")).write_bytes(b"latin-1 name\n")  # not UTF-8
    sp = cli("import", "--store", double.url, str(tree)).stdout.decode().strip()
    basename = sp.rsplit("/", 1)[1]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    m = MountProc(mnt, double.url, "--timeout", "10")
    try:
        store_dir = mnt / "store"
        wait_until(lambda: os.listdir(store_dir) == [basename], 30, "store/ to list the imported path")
        assert (store_dir / basename / "hello").read_bytes() == b"hello\n"
        assert sorted(os.listdir(os.fsencode(store_dir / basename))) == [b"caf\xe9", b"hello", b"sub"]
        assert Path(os.fsdecode(os.fsencode(store_dir / basename) + b"/caf\xe9")).read_bytes() == b"latin-1 name\n"
        got = (store_dir / basename / "sub" / "big").read_bytes()
        assert blake3.blake3(got).digest() == blake3.blake3(data).digest()
    finally:
        m.cleanup()


def test_names_that_are_not_utf8_over_the_generations(tmp_path: Path) -> None:
    """A name that is not UTF-8 travels as bytes in G2 and G3; a G1 peer is refused it
    (FAILED_PRECONDITION, naming the reason), on the server's G1 path and in our client forced
    to G1, instead of getting bytes it cannot parse."""
    tree = tmp_path / "tree"
    tree.mkdir()
    Path(os.fsdecode(os.fsencode(tree) + b"/caf\xe9")).write_bytes(b"x")
    d = Daemon(f"local://{tmp_path / 'store'}")
    try:
        sp = cli("import", "--store", d.url, str(tree)).stdout.decode().strip()
        with open_store(d.url, timeout=10) as store:
            info = store.pathinfos.get(StorePath.parse_basename(sp.rsplit("/", 1)[1].encode()).digest)
            assert info is not None and isinstance(info.node, DirectoryNode)
            root = info.node.digest
        for generation in ("g2", "g3"):
            with open_store(f"{d.url}?protocol={generation}", timeout=10) as store:
                got = store.directories.get(root)
                assert got is not None and [f.name for f in got.files] == [b"caf\xe9"]
        with open_store(f"{d.url}?protocol=g1", timeout=10) as store:
            with pytest.raises(PreconditionError, match="is not UTF-8: tvix.store.v1 \\(2022\\) cannot carry it"):
                store.directories.get(root)
        with grpc.insecure_channel(d.address) as ch:  # the same request as bytes, no generated code
            get1 = ch.unary_stream("/tvix.store.v1.DirectoryService/Get")
            with pytest.raises(grpc.RpcError) as e:
                list(get1(b"\x0a\x20" + bytes(root), timeout=10))
            assert e.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    finally:
        assert d.stop() == 0
