"""Every protocol generation against one real daemon, driven by independent clients.

- Clients generated at test time from upstream's own .proto files (tests/data/tvix-2024-protos
  for G2, tests/data/snix-protos for G3, in upstream's layout; G1 is tests/test_interop.py) call
  every method: BlobService Stat/Read/Put, DirectoryService Get (plain and recursive)/Put,
  PathInfoService Get/Put/CalculateNAR/List, plus the status codes PROTOCOL-V2.md records for
  each generation. Each runs in an interpreter of its own (G1 and G2 both define
  `tvix.store.v1.PathInfo`: one descriptor pool cannot hold both).
- Expected values come from b3sum, `nix-store --dump` and blake3 over the independently
  generated messages, never from this project's code.
- Reflection (grpcurl, the real tool) lists every service of every generation, and the
  README's grpcurl examples run verbatim.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, Daemon

DATA = REPO / "tests" / "data"
GRPCURL = Path(sys.executable).parent / "grpcurl"

#: generation → (proto root, package prefix, node type suffix, root oneof / PathInfo field)
GENERATIONS = {
    "g2": (DATA / "tvix-2024-protos", "tvix", "Node", "node"),
    "g3": (DATA / "snix-protos", "snix", "Entry", "entry"),
}

_CLIENT = r"""
import importlib, json, sys
import blake3, grpc

target, spec = sys.argv[1], json.load(open(sys.argv[2]))
pkg, kind, oneof = spec["pkg"], spec["kind"], spec["oneof"]
m = lambda name: importlib.import_module(name)
c = m(f"{pkg}.castore.protos.castore_pb2")
rb, rbg = m(f"{pkg}.castore.protos.rpc_blobstore_pb2"), m(f"{pkg}.castore.protos.rpc_blobstore_pb2_grpc")
rd, rdg = m(f"{pkg}.castore.protos.rpc_directory_pb2"), m(f"{pkg}.castore.protos.rpc_directory_pb2_grpc")
p = m(f"{pkg}.store.protos.pathinfo_pb2")
rp, rpg = m(f"{pkg}.store.protos.rpc_pathinfo_pb2"), m(f"{pkg}.store.protos.rpc_pathinfo_pb2_grpc")
DirNode, FileNode, SymNode, Root = (getattr(c, n + kind) for n in ("Directory", "File", "Symlink", ""))

T = 30
out = {}
ch = grpc.insecure_channel(target)
blobs, dirs, infos = rbg.BlobServiceStub(ch), rdg.DirectoryServiceStub(ch), rpg.PathInfoServiceStub(ch)

def code(call):
    # [status name, details or the number of messages answered]
    try:
        r = call()
        n = len(list(r)) if hasattr(r, "__iter__") and not hasattr(r, "SerializeToString") else 1
        return ["OK", n]
    except grpc.RpcError as e:
        return [e.code().name, e.details()]

# blobs: Put, Stat (chunks in field 2, whatever send_chunks says), Read of the blob and its chunks
digests = {}
for name, hexdata in spec["files"].items():
    data = bytes.fromhex(hexdata)
    pieces = [data[i:i + 65536] for i in range(0, len(data), 65536)] or [b""]
    digests[name] = blobs.Put(iter(rb.BlobChunk(data=x) for x in pieces), timeout=T).digest
    for send in (True, False):
        meta = blobs.Stat(rb.StatBlobRequest(digest=digests[name], send_chunks=send), timeout=T)
        assert sum(x.size for x in meta.chunks) == len(data), (name, send, meta)
        assert meta.bao == b""
    for x in meta.chunks:
        got = b"".join(y.data for y in blobs.Read(rb.ReadBlobRequest(digest=x.digest), timeout=T))
        assert blake3.blake3(got).digest() == x.digest
    got = b"".join(x.data for x in blobs.Read(rb.ReadBlobRequest(digest=digests[name]), timeout=T))
    assert got == data, name
out["blob_digests"] = {k: v.hex() for k, v in digests.items()}
out["absent_stat"] = code(lambda: blobs.Stat(rb.StatBlobRequest(digest=b"\0" * 32), timeout=T))[0]
out["short_stat"] = code(lambda: blobs.Stat(rb.StatBlobRequest(digest=b"\0" * 31), timeout=T))[0]
out["absent_read"] = code(lambda: blobs.Read(rb.ReadBlobRequest(digest=b"\0" * 32), timeout=T))[0]

def fnode(name, exe=False):
    size = len(bytes.fromhex(spec["files"][name]))
    return FileNode(name=name.encode(), digest=digests[name], size=size, executable=exe)

def dig(d):
    return blake3.blake3(d.SerializeToString(deterministic=True)).digest()

# directories: Put a graph leaves first, Get it back plain and recursive
sub = c.Directory(files=[fnode("x")])
root = c.Directory(
    directories=[DirNode(name=b"sub", digest=dig(sub), size=1)],
    files=[fnode("a.txt"), fnode("run.sh", True)],
    symlinks=[SymNode(name=b"link", target=b"a.txt")],
)
resp = dirs.Put(iter([sub, root]), timeout=T)
out["root_digest"] = resp.root_digest.hex()
out["root_digest_expected"] = dig(root).hex()
assert list(dirs.Get(rd.GetDirectoryRequest(digest=dig(root)), timeout=T)) == [root]
assert list(dirs.Get(rd.GetDirectoryRequest(digest=dig(root), recursive=True), timeout=T)) == [root, sub]
assert list(dirs.Get(rd.GetDirectoryRequest(digest=dig(sub), recursive=True), timeout=T)) == [sub]
out["absent_get"] = code(lambda: dirs.Get(rd.GetDirectoryRequest(digest=b"\1" * 32), timeout=T))[0]
absent = rd.GetDirectoryRequest(digest=b"\1" * 32, recursive=True)
out["absent_get_recursive"] = code(lambda: dirs.Get(absent, timeout=T))
out["unset_get"] = code(lambda: dirs.Get(rd.GetDirectoryRequest(), timeout=T))[0]
bad = c.Directory(files=[fnode("x"), fnode("a.txt")])  # not sorted
out["unsorted_put"] = code(lambda: dirs.Put(iter([bad]), timeout=T))[0]

# path infos: CalculateNAR (anonymous root), Put, Get, List
anon = Root(directory=DirNode(name=b"", digest=dig(root), size=5))
nar = infos.CalculateNAR(anon, timeout=T)
out["nar_size"], out["nar_sha256"] = nar.nar_size, nar.nar_sha256.hex()
fn = fnode("run.sh", True)
fn.name = b""
fnar = infos.CalculateNAR(Root(file=fn), timeout=T)
out["file_nar_size"], out["file_nar_sha256"] = fnar.nar_size, fnar.nar_sha256.hex()
snar = infos.CalculateNAR(Root(symlink=SymNode(name=b"", target=b"a.txt")), timeout=T)
out["symlink_nar_sha256"] = snar.nar_sha256.hex()
named = Root(directory=DirNode(name=spec["basename"].encode(), digest=dig(root), size=5))
out["named_calculate_nar"] = code(lambda: infos.CalculateNAR(named, timeout=T))[0]
missing = Root(file=FileNode(name=b"", digest=b"\2" * 32, size=3))
out["missing_calculate_nar"] = code(lambda: infos.CalculateNAR(missing, timeout=T))[0]

info = p.PathInfo(narinfo=p.NARInfo(nar_size=nar.nar_size, nar_sha256=nar.nar_sha256))
getattr(info, oneof).CopyFrom(named)
assert infos.Put(info, timeout=T) == info
got = infos.Get(rp.GetPathInfoRequest(by_output_hash=bytes.fromhex(spec["output_hash"])), timeout=T)
assert got == info, got
listed = list(infos.List(rp.ListPathInfoRequest(), timeout=T))
assert info in listed
out["absent_pathinfo"] = code(lambda: infos.Get(rp.GetPathInfoRequest(by_output_hash=b"\3" * 20), timeout=T))
out["short_pathinfo"] = code(lambda: infos.Get(rp.GetPathInfoRequest(by_output_hash=b"\3" * 19), timeout=T))[0]
out["unset_pathinfo"] = code(lambda: infos.Get(rp.GetPathInfoRequest(), timeout=T))
no_narinfo = p.PathInfo()  # another store path of the same tree
getattr(no_narinfo, oneof).CopyFrom(named)
getattr(no_narinfo, oneof).directory.name = spec["basename2"].encode()
out["put_without_narinfo"] = code(lambda: infos.Put(no_narinfo, timeout=T))
listed = infos.List(rp.ListPathInfoRequest(), timeout=T)
out["listed"] = sorted(getattr(x, oneof).directory.name.decode() for x in listed)
print(json.dumps(out))
"""


def generate(protos: Path, dest: Path) -> None:
    """Python modules from upstream's .proto files, as upstream lays them out."""
    files = [str(p.relative_to(protos)) for p in sorted(protos.rglob("*.proto"))]
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{protos}", f"--python_out={dest}", f"--grpc_python_out={dest}"]
        + files,
        check=True,
        capture_output=True,
    )


def run_client(script: str, gen_dir: Path, args: list[str], cwd: Path) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(gen_dir)
    p = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120
    )
    assert p.returncode == 0, p.stderr[-4000:]
    out: dict[str, object] = json.loads(p.stdout.strip().splitlines()[-1])
    return out


def _nar_of(path: Path) -> tuple[int, str]:
    nar = subprocess.run(["nix-store", "--dump", str(path)], check=True, capture_output=True).stdout
    return len(nar), hashlib.sha256(nar).hexdigest()


def _b3sum(path: Path) -> str:
    return subprocess.run(["b3sum", "--no-names", str(path)], check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for gen, (protos, *_) in GENERATIONS.items():
        dest = tmp_path_factory.mktemp(f"gen-{gen}")
        generate(protos, dest)
        out[gen] = dest
    return out


@pytest.mark.nix
def test_upstream_clients_of_g2_and_g3(tmp_path: Path, generated: dict[str, Path]) -> None:
    """A G2 and then a G3 client, generated from tvix's and snix's own files, drive every
    method of one daemon; the second sees (and re-sends) what the first stored."""
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    files = {"a.txt": b"hello\n", "run.sh": b"#!/bin/sh\necho hi\n", "x": os.urandom(300_000)}
    (tree / "a.txt").write_bytes(files["a.txt"])
    (tree / "run.sh").write_bytes(files["run.sh"])
    (tree / "run.sh").chmod(0o755)
    (tree / "sub" / "x").write_bytes(files["x"])
    os.symlink("a.txt", tree / "link")
    output_hash = bytes(range(20))
    from tvix_store.core import nixbase32  # only to spell the store path name; the server parses it itself

    basename = nixbase32.encode(output_hash) + "-tree"
    basename2 = nixbase32.encode(bytes(range(1, 21))) + "-tree"
    expected_blobs = {
        "a.txt": _b3sum(tree / "a.txt"),
        "run.sh": _b3sum(tree / "run.sh"),
        "x": _b3sum(tree / "sub" / "x"),
    }

    d = Daemon(f"local://{tmp_path / 'store'}")
    outs = {}
    try:
        for gen, (_, pkg, kind, oneof) in GENERATIONS.items():
            spec = {
                "files": {k: v.hex() for k, v in files.items()},
                "basename": basename,
                "basename2": basename2,
                "output_hash": output_hash.hex(),
                "pkg": pkg,
                "kind": kind,
                "oneof": oneof,
            }
            (tmp_path / f"spec-{gen}.json").write_text(json.dumps(spec))
            outs[gen] = run_client(_CLIENT, generated[gen], [d.address, str(tmp_path / f"spec-{gen}.json")], tmp_path)
    finally:
        assert d.stop() == 0

    for gen, out in outs.items():
        assert out["blob_digests"] == expected_blobs, gen
        assert (out["absent_stat"], out["short_stat"], out["absent_read"]) == (
            "NOT_FOUND",
            "INVALID_ARGUMENT",
            "NOT_FOUND",
        )
        assert out["root_digest"] == out["root_digest_expected"], gen
        assert out["absent_get"] == "NOT_FOUND", gen
        # tvix and snix answer a recursive Get of a missing root with an empty stream
        assert out["absent_get_recursive"] == ["OK", 0], gen
        assert out["unset_get"] == "INVALID_ARGUMENT", gen
        assert out["unsorted_put"] == "INVALID_ARGUMENT", gen
        assert (out["nar_size"], out["nar_sha256"]) == _nar_of(tree), gen
        assert (out["file_nar_size"], out["file_nar_sha256"]) == _nar_of(tree / "run.sh"), gen
        assert out["symlink_nar_sha256"] == _nar_of(tree / "link")[1], gen
        assert out["absent_pathinfo"][0] == "NOT_FOUND", gen
        assert out["short_pathinfo"] == "INVALID_ARGUMENT", gen

    g2, g3 = outs["g2"], outs["g3"]
    # /tvix.store.v1.PathInfoService is shared with 2022 clients: their rules hold there
    assert g2["named_calculate_nar"] == "OK"
    assert g2["missing_calculate_nar"] == "NOT_FOUND"
    assert g2["unset_pathinfo"][0] == "INVALID_ARGUMENT"
    assert g2["put_without_narinfo"][0] == "OK"  # as 2022 clients may send it
    assert g2["listed"] == sorted([basename, basename2])
    # /snix.store.v1.PathInfoService answers as snix does (PROTOCOL-V2.md §4.2, §4.3)
    assert g3["named_calculate_nar"] == "INVALID_ARGUMENT"
    assert g3["missing_calculate_nar"] == "DATA_LOSS"
    assert g3["unset_pathinfo"] == ["UNIMPLEMENTED", "by_what needs to be specified"]
    assert g3["absent_pathinfo"] == ["NOT_FOUND", "PathInfo not found"]
    assert g3["put_without_narinfo"][0] == "INVALID_ARGUMENT"
    assert str(g3["put_without_narinfo"][1]).startswith("Invalid path info: ")
    assert g3["listed"] == sorted([basename, basename2])  # what the G2 client stored too


ALL_SERVICES = {
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "tvix.store.v1.BlobService",
    "tvix.store.v1.DirectoryService",
    "tvix.store.v1.PathInfoService",
    "tvix.castore.v1.BlobService",
    "tvix.castore.v1.DirectoryService",
    "snix.castore.v1.BlobService",
    "snix.castore.v1.DirectoryService",
    "snix.store.v1.PathInfoService",
}


def _grpcurl(*args: str) -> str:
    p = subprocess.run([str(GRPCURL), *args], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_reflection_lists_every_service(daemon: Daemon) -> None:
    """grpcurl (reflection v1alpha) lists every service of every generation, and describes each
    Stat with its own generation's response type."""
    assert set(_grpcurl("-plaintext", daemon.address, "list").split()) == ALL_SERVICES
    stats = {"tvix.store.v1": "BlobMeta", "tvix.castore.v1": "StatBlobResponse", "snix.castore.v1": "StatBlobResponse"}
    for p, response in stats.items():
        stat = f"rpc Stat ( .{p}.StatBlobRequest ) returns ( .{p}.{response} )"
        assert stat in _grpcurl("-plaintext", daemon.address, "describe", f"{p}.BlobService")
    # the PathInfoService G1 and G2 share is described with G2's (superset) messages, List included
    shared = _grpcurl("-plaintext", daemon.address, "describe", "tvix.store.v1.PathInfoService")
    assert "rpc List ( .tvix.store.v1.ListPathInfoRequest ) returns ( stream .tvix.store.v1.PathInfo )" in shared
    assert "rpc CalculateNAR ( .tvix.castore.v1.Node )" in shared


def _readme_grpcurl_commands() -> list[str]:
    """The grpcurl example block of the README (between its marker comments), joined lines."""
    text = (REPO / "README.md").read_text()
    block = text.split("<!-- grpcurl-examples -->")[1].split("<!-- /grpcurl-examples -->")[0]
    body = block.split("```sh")[1].split("```")[0]
    return [c for c in body.replace("\\\n", " ").splitlines() if c.strip() and not c.startswith("#")]


def test_readme_grpcurl_examples_run_verbatim(daemon: Daemon, tmp_path: Path) -> None:
    """Every command of the README's grpcurl block, run as written by a shell (only the README's
    `localhost:8000` replaced by the test daemon's address), answers what the README says."""
    cmds = _readme_grpcurl_commands()
    assert any("snix.castore.v1.BlobService/Stat" in c for c in cmds)
    assert any("tvix.store.v1.BlobService/Stat" in c for c in cmds)
    assert all("localhost:8000" in c for c in cmds)
    env = {**os.environ, "PATH": f"{GRPCURL.parent}:{os.environ['PATH']}"}
    outputs = []
    for c in cmds:
        run = c.replace("localhost:8000", daemon.address)
        p = subprocess.run(["bash", "-c", run], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
        outputs.append((c, p.returncode, p.stdout, p.stderr))
    for c, rc, _, err in outputs:
        assert rc == 0, f"{c}: {err}"
    hello = "6o8WPbOGgpJeRJHF5Y1Ls1Bu+MFOt4qG6QjFYkpnIA8="  # base64 of `printf hello | b3sum`
    assert set(outputs[0][2].split()) == ALL_SERVICES  # `list`
    by_method = {
        next(m for m in c.split() if "/" in m and "." in m): json.loads(out or "null")
        for c, _, out, _ in outputs
        if "/" in c
    }
    assert by_method["snix.castore.v1.BlobService/Put"] == {"digest": hello}
    assert by_method["snix.castore.v1.BlobService/Stat"] == {"chunks": [{"digest": hello, "size": "5"}]}
    assert by_method["tvix.store.v1.BlobService/Stat"] == {"chunks": [{"digest": hello, "size": 5}]}
    assert by_method["snix.store.v1.PathInfoService/List"] is None  # no path infos yet: an empty stream
    assert all(shlex.split(c)[0] == "grpcurl" for c in cmds)


def test_g1_refuses_what_it_cannot_carry() -> None:
    """A name or target that is not UTF-8 or a size of 4 GiB or more goes out to a G1 peer as
    UnrepresentableError (FAILED_PRECONDITION on the wire), never truncated; G2 and G3 carry it."""
    import grpc

    from tvix_store.core.castore import Directory, DirectoryNode, FileNode, SymlinkNode
    from tvix_store.core.chunks import ChunkMeta
    from tvix_store.core.digest import B3Digest
    from tvix_store.core.errors import UnrepresentableError
    from tvix_store.core.pathinfo import NarInfo, PathInfo
    from tvix_store.protocol.wire import G1
    from tvix_store.protocol.wire_g2 import G2
    from tvix_store.protocol.wire_g3 import G3
    from tvix_store.remote.status import status_for

    dg = B3Digest(bytes(32))
    big = FileNode(b"big", dg, 5 << 30)
    cases = [
        Directory((), (FileNode(b"caf\xe9", dg, 1),), ()),  # Latin-1, not UTF-8
        Directory((), (), (SymlinkNode(b"l", b"\xff"),)),
        Directory((), (big,), ()),
        Directory((DirectoryNode(b"d", dg, 1 << 32),), (), ()),
    ]
    for d in cases:
        with pytest.raises(UnrepresentableError, match="tvix.store.v1 \\(2022\\) cannot carry it"):
            G1.directory_to_proto(d)
        for c in (G2, G3):
            m = c.directory_to_proto(d)
            assert (list(m.files) + list(m.directories) + list(m.symlinks))[0].name == (
                d.files + d.directories + d.symlinks
            )[0].name
    assert G3.directory_to_proto(cases[2]).files[0].size == 5 << 30
    with pytest.raises(UnrepresentableError):
        G1.calculate_nar_response(1 << 32, bytes(32))
    assert G2.calculate_nar_response(1 << 32, bytes(32)).nar_size == 1 << 32
    with pytest.raises(UnrepresentableError):
        G1.stat_response([ChunkMeta(dg, 1 << 32)], True)
    info = PathInfo(big.renamed(b"00000000000000000000000000000000-big"), (), NarInfo(5 << 30, bytes(32)))
    with pytest.raises(UnrepresentableError):
        G1.pathinfo_to_proto(info)
    assert G2.pathinfo_to_proto(info).narinfo.nar_size == 5 << 30
    assert status_for(UnrepresentableError("x"))[0] is grpc.StatusCode.FAILED_PRECONDITION


def test_every_generations_writes_need_a_write_token() -> None:
    """The token check (`serve.grpcauth`) treats the Put of every generation as a write: a
    read-only token must not upload through a newer generation's path."""
    from tvix_store.serve.grpc import WRITE_METHODS

    expected = {
        f"/{p}.{s}/Put"
        for p, s in [
            ("tvix.store.v1", "BlobService"),
            ("tvix.store.v1", "DirectoryService"),
            ("tvix.store.v1", "PathInfoService"),
            ("tvix.castore.v1", "BlobService"),
            ("tvix.castore.v1", "DirectoryService"),
            ("snix.castore.v1", "BlobService"),
            ("snix.castore.v1", "DirectoryService"),
            ("snix.store.v1", "PathInfoService"),
        ]
    }
    assert set(WRITE_METHODS) == expected
