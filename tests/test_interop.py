"""Interoperability: a gRPC client generated independently from tvix-store's own .proto files
(tests/data/tvix-protos, laid out as tvix had them: tvix/store/protos/*.proto) drives the
daemon through every method. Expected values come from b3sum, `nix-store --dump` and
blake3 over the independently generated messages, never from this project's code.

The generated modules define the same message names as `tvix_store.protocol.g1`, so they run
in a separate interpreter (one protobuf descriptor pool each).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, Daemon

PROTOS = REPO / "tests" / "data" / "tvix-protos"
FILES = ["castore", "pathinfo", "rpc_blobstore", "rpc_directory", "rpc_pathinfo"]

_CLIENT = r"""
import json, sys
import blake3, grpc
from tvix.store.protos import castore_pb2 as c, pathinfo_pb2 as p
from tvix.store.protos import rpc_blobstore_pb2 as rb, rpc_blobstore_pb2_grpc as rbg
from tvix.store.protos import rpc_directory_pb2 as rd, rpc_directory_pb2_grpc as rdg
from tvix.store.protos import rpc_pathinfo_pb2 as rp, rpc_pathinfo_pb2_grpc as rpg

target, spec = sys.argv[1], json.load(open(sys.argv[2]))
T = 30
out = {}
ch = grpc.insecure_channel(target)
blobs, dirs, infos = rbg.BlobServiceStub(ch), rdg.DirectoryServiceStub(ch), rpg.PathInfoServiceStub(ch)

# blobs: Put, Stat (with and without chunks), Read
digests = {}
for name, hexdata in spec["files"].items():
    data = bytes.fromhex(hexdata)
    pieces = [data[i:i + 65536] for i in range(0, len(data), 65536)] or [b""]
    digests[name] = blobs.Put(iter(rb.BlobChunk(data=x) for x in pieces), timeout=T).digest
    meta = blobs.Stat(rb.StatBlobRequest(digest=digests[name], include_chunks=True), timeout=T)
    assert sum(m.size for m in meta.chunks) == len(data), name
    for m in meta.chunks:
        got = b"".join(x.data for x in blobs.Read(rb.ReadBlobRequest(digest=m.digest), timeout=T))
        assert blake3.blake3(got).digest() == m.digest
    assert blobs.Stat(rb.StatBlobRequest(digest=digests[name]), timeout=T) == rb.BlobMeta()
    got = b"".join(x.data for x in blobs.Read(rb.ReadBlobRequest(digest=digests[name]), timeout=T))
    assert got == data, name
out["blob_digests"] = {k: v.hex() for k, v in digests.items()}
try:
    blobs.Stat(rb.StatBlobRequest(digest=b"\0" * 32), timeout=T)
    raise AssertionError("Stat of an absent blob succeeded")
except grpc.RpcError as e:
    out["absent_stat"] = e.code().name

def fnode(name, exe=False):
    return c.FileNode(name=name, digest=digests[name], size=len(bytes.fromhex(spec["files"][name])), executable=exe)

def dig(d):
    return blake3.blake3(d.SerializeToString(deterministic=True)).digest()

# directories: Put a graph leaves first, Get it back plain and recursive
sub = c.Directory(files=[fnode("x")])
root = c.Directory(
    directories=[c.DirectoryNode(name="sub", digest=dig(sub), size=1)],
    files=[fnode("a.txt"), fnode("run.sh", True)],
    symlinks=[c.SymlinkNode(name="link", target="a.txt")],
)
resp = dirs.Put(iter([sub, root]), timeout=T)
out["root_digest"] = resp.root_digest.hex()
out["root_digest_expected"] = dig(root).hex()
got = list(dirs.Get(rd.GetDirectoryRequest(root_digest=dig(root)), timeout=T))
assert got == [root], got
got = list(dirs.Get(rd.GetDirectoryRequest(root_digest=dig(root), recursive=True), timeout=T))
assert got == [root, sub], got

# path infos: CalculateNAR, Put, Get
node = p.Node(directory=c.DirectoryNode(name=spec["basename"], digest=dig(root), size=5))
nar = infos.CalculateNAR(node, timeout=T)
out["nar_size"], out["nar_sha256"] = nar.nar_size, nar.nar_sha256.hex()
fnar = infos.CalculateNAR(p.Node(file=fnode("run.sh", True)), timeout=T)
out["file_nar_size"], out["file_nar_sha256"] = fnar.nar_size, fnar.nar_sha256.hex()
snar = infos.CalculateNAR(p.Node(symlink=c.SymlinkNode(name="l", target="a.txt")), timeout=T)
out["symlink_nar_sha256"] = snar.nar_sha256.hex()
info = p.PathInfo(node=node, narinfo=p.NARInfo(nar_size=nar.nar_size, nar_sha256=nar.nar_sha256))
assert infos.Put(info, timeout=T) == info
got = infos.Get(rp.GetPathInfoRequest(by_output_hash=bytes.fromhex(spec["output_hash"])), timeout=T)
assert got == info, got
print(json.dumps(out))
"""


def _generate(dest: Path) -> None:
    files = [f"tvix/store/protos/{f}.proto" for f in FILES]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTOS}",
            f"--python_out={dest}",
            f"--grpc_python_out={dest}",
            *files,
        ],
        check=True,
        capture_output=True,
    )


def _nar_of(path: Path) -> tuple[int, str]:
    nar = subprocess.run(["nix-store", "--dump", str(path)], check=True, capture_output=True).stdout
    return len(nar), hashlib.sha256(nar).hexdigest()


def _b3sum(path: Path) -> str:
    return subprocess.run(["b3sum", "--no-names", str(path)], check=True, capture_output=True, text=True).stdout.strip()


@pytest.mark.nix
def test_independent_tvix_client(tmp_path: Path) -> None:
    gen = tmp_path / "gen"
    gen.mkdir()
    _generate(gen)
    assert (gen / "tvix" / "store" / "protos" / "rpc_blobstore_pb2_grpc.py").exists()

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
    spec = {"files": {k: v.hex() for k, v in files.items()}, "basename": basename, "output_hash": output_hash.hex()}

    d = Daemon(f"local://{tmp_path / 'store'}")
    try:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env["PYTHONPATH"] = str(gen)
        (tmp_path / "spec.json").write_text(json.dumps(spec))
        p = subprocess.run(
            [sys.executable, "-c", _CLIENT, d.address, str(tmp_path / "spec.json")],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=120,
        )
        assert p.returncode == 0, p.stderr[-4000:]
        out = json.loads(p.stdout.strip().splitlines()[-1])
    finally:
        assert d.stop() == 0

    assert out["blob_digests"] == {
        "a.txt": _b3sum(tree / "a.txt"),
        "run.sh": _b3sum(tree / "run.sh"),
        "x": _b3sum(tree / "sub" / "x"),
    }
    assert out["absent_stat"] == "NOT_FOUND"
    assert out["root_digest"] == out["root_digest_expected"]
    assert (out["nar_size"], out["nar_sha256"]) == _nar_of(tree)
    assert (out["file_nar_size"], out["file_nar_sha256"]) == _nar_of(tree / "run.sh")
    assert out["symlink_nar_sha256"] == _nar_of(tree / "link")[1]
