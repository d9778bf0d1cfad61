"""The committed generated modules of every generation match protos/ (G1: protos/*.proto, G2:
protos/g2, G3: protos/g3), and their schemas match PROTOCOL.md (G1) and PROTOCOL-V2.md (G2, G3)."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tvix_store.protocol.g1 import castore_pb2, pathinfo_pb2, rpc_blobstore_pb2, rpc_directory_pb2, rpc_pathinfo_pb2
from tvix_store.protocol.g2 import castore_pb2 as c2
from tvix_store.protocol.g2 import pathinfo_pb2 as p2
from tvix_store.protocol.g2 import rpc_blobstore_pb2 as b2
from tvix_store.protocol.g2 import rpc_directory_pb2 as d2
from tvix_store.protocol.g2 import rpc_pathinfo_pb2 as r2
from tvix_store.protocol.g3 import castore_pb2 as c3
from tvix_store.protocol.g3 import pathinfo_pb2 as p3
from tvix_store.protocol.g3 import rpc_blobstore_pb2 as b3
from tvix_store.protocol.g3 import rpc_directory_pb2 as d3
from tvix_store.protocol.g3 import rpc_pathinfo_pb2 as r3

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gen")
    subprocess.run(
        [str(REPO / "scripts" / "gen-protos"), str(out)], check=True, env={**os.environ, "PYTHON": sys.executable}
    )
    return out


@pytest.mark.parametrize("gen", ["g1", "g2", "g3"])
def test_generated_modules_are_fresh(generated: Path, gen: str) -> None:
    out = generated / gen
    committed = REPO / "tvix_store" / "protocol" / gen
    generated = sorted(p.name for p in out.iterdir())
    assert generated == sorted(
        p.name for p in committed.iterdir() if p.name.endswith((".py", ".pyi")) and "_pb2" in p.name
    )
    _, mismatch, errors = filecmp.cmpfiles(out, committed, generated, shallow=False)
    assert not mismatch and not errors, f"stale generated modules (run scripts/gen-protos): {mismatch + errors}"


def _fields(msg: type) -> dict[str, tuple[int, str, bool]]:
    d = msg.DESCRIPTOR  # type: ignore[attr-defined]
    out = {}
    for f in d.fields:
        t = f.message_type.full_name if f.message_type else f.type
        out[f.name] = (f.number, t, f.is_repeated)
    return out


def test_schema_matches_protocol_md() -> None:
    T = rpc_blobstore_pb2.BlobMeta.DESCRIPTOR.fields[0].__class__  # FieldDescriptor
    B, S, U32, BOOL = T.TYPE_BYTES, T.TYPE_STRING, T.TYPE_UINT32, T.TYPE_BOOL
    p = "tvix.store.v1."
    assert castore_pb2.DESCRIPTOR.package == "tvix.store.v1"
    assert _fields(castore_pb2.Directory) == {
        "directories": (1, p + "DirectoryNode", True),
        "files": (2, p + "FileNode", True),
        "symlinks": (3, p + "SymlinkNode", True),
    }
    assert _fields(castore_pb2.DirectoryNode) == {
        "name": (1, S, False),
        "digest": (2, B, False),
        "size": (3, U32, False),
    }
    assert _fields(castore_pb2.FileNode) == {
        "name": (1, S, False),
        "digest": (2, B, False),
        "size": (3, U32, False),
        "executable": (4, BOOL, False),
    }
    assert _fields(castore_pb2.SymlinkNode) == {"name": (1, S, False), "target": (2, S, False)}
    assert _fields(pathinfo_pb2.PathInfo) == {
        "node": (1, p + "Node", False),
        "references": (2, B, True),
        "narinfo": (3, p + "NARInfo", False),
    }
    assert _fields(pathinfo_pb2.Node) == {
        "directory": (1, p + "DirectoryNode", False),
        "file": (2, p + "FileNode", False),
        "symlink": (3, p + "SymlinkNode", False),
    }
    assert [o.name for o in pathinfo_pb2.Node.DESCRIPTOR.oneofs] == ["node"]
    assert _fields(pathinfo_pb2.NARInfo) == {
        "nar_size": (1, U32, False),
        "nar_sha256": (2, B, False),
        "signatures": (3, p + "NARInfo.Signature", True),
        "reference_names": (4, S, True),
    }
    assert _fields(pathinfo_pb2.NARInfo.Signature) == {"name": (1, S, False), "data": (2, B, False)}
    assert _fields(rpc_blobstore_pb2.StatBlobRequest) == {
        "digest": (1, B, False),
        "include_chunks": (2, BOOL, False),
        "include_bao": (3, BOOL, False),
    }
    assert _fields(rpc_blobstore_pb2.BlobMeta) == {
        "chunks": (1, p + "BlobMeta.ChunkMeta", True),
        "inline_bao": (2, B, False),
    }
    assert _fields(rpc_blobstore_pb2.BlobMeta.ChunkMeta) == {"digest": (1, B, False), "size": (2, U32, False)}
    assert _fields(rpc_blobstore_pb2.ReadBlobRequest) == {"digest": (1, B, False)}
    assert _fields(rpc_blobstore_pb2.BlobChunk) == {"data": (1, B, False)}
    assert _fields(rpc_blobstore_pb2.PutBlobResponse) == {"digest": (1, B, False)}
    assert _fields(rpc_directory_pb2.GetDirectoryRequest) == {"digest": (1, B, False), "recursive": (2, BOOL, False)}
    assert [o.name for o in rpc_directory_pb2.GetDirectoryRequest.DESCRIPTOR.oneofs] == ["by_what"]
    assert _fields(rpc_directory_pb2.PutDirectoryResponse) == {"root_digest": (1, B, False)}
    assert _fields(rpc_pathinfo_pb2.GetPathInfoRequest) == {"by_output_hash": (1, B, False)}
    assert [o.name for o in rpc_pathinfo_pb2.GetPathInfoRequest.DESCRIPTOR.oneofs] == ["by_what"]
    assert _fields(rpc_pathinfo_pb2.CalculateNARResponse) == {"nar_size": (1, U32, False), "nar_sha256": (2, B, False)}


def test_service_method_names() -> None:
    def methods(mod: object, name: str) -> dict[str, tuple[str, str, bool, bool]]:
        svc = mod.DESCRIPTOR.services_by_name[name]  # type: ignore[attr-defined]
        return {
            m.name: (m.input_type.full_name, m.output_type.full_name, m.client_streaming, m.server_streaming)
            for m in svc.methods
        }

    p = "tvix.store.v1."
    assert methods(rpc_blobstore_pb2, "BlobService") == {
        "Stat": (p + "StatBlobRequest", p + "BlobMeta", False, False),
        "Read": (p + "ReadBlobRequest", p + "BlobChunk", False, True),
        "Put": (p + "BlobChunk", p + "PutBlobResponse", True, False),
    }
    assert methods(rpc_directory_pb2, "DirectoryService") == {
        "Get": (p + "GetDirectoryRequest", p + "Directory", False, True),
        "Put": (p + "Directory", p + "PutDirectoryResponse", True, False),
    }
    assert methods(rpc_pathinfo_pb2, "PathInfoService") == {
        "Get": (p + "GetPathInfoRequest", p + "PathInfo", False, False),
        "Put": (p + "PathInfo", p + "PathInfo", False, False),
        "CalculateNAR": (p + "Node", p + "CalculateNARResponse", False, False),
    }


def _types(prefix: str, kind: str) -> dict[str, str]:
    return {
        k: f"{prefix}{k.replace('Node', kind)}"
        for k in ("Directory", "DirectoryNode", "FileNode", "SymlinkNode", "Node")
    }


@pytest.mark.parametrize(
    ("c", "p", "b", "d", "r", "castore", "store", "kind", "oneof"),
    [
        (c2, p2, b2, d2, r2, "tvix.castore.v1", "tvix.store.v1", "Node", "node"),
        (c3, p3, b3, d3, r3, "snix.castore.v1", "snix.store.v1", "Entry", "entry"),
    ],
    ids=["g2", "g3"],
)
def test_g2_g3_schema_matches_protocol_v2_md(
    c: object, p: object, b: object, d: object, r: object, castore: str, store: str, kind: str, oneof: str
) -> None:
    """The field tables of PROTOCOL-V2.md §1 and the method table of §2, written out here."""
    T = rpc_blobstore_pb2.BlobMeta.DESCRIPTOR.fields[0].__class__
    B, S, U64, BOOL, ENUM = T.TYPE_BYTES, T.TYPE_STRING, T.TYPE_UINT64, T.TYPE_BOOL, T.TYPE_ENUM
    cp, sp = castore + ".", store + "."
    n = _types(cp, kind)
    assert c.DESCRIPTOR.package == castore and p.DESCRIPTOR.package == store  # type: ignore[attr-defined]
    assert _fields(c.Directory) == {
        "directories": (1, n["DirectoryNode"], True),
        "files": (2, n["FileNode"], True),
        "symlinks": (3, n["SymlinkNode"], True),
    }
    assert _fields(getattr(c, "Directory" + kind)) == {
        "name": (1, B, False),
        "digest": (2, B, False),
        "size": (3, U64, False),
    }
    assert _fields(getattr(c, "File" + kind)) == {
        "name": (1, B, False),
        "digest": (2, B, False),
        "size": (3, U64, False),
        "executable": (4, BOOL, False),
    }
    assert _fields(getattr(c, "Symlink" + kind)) == {"name": (1, B, False), "target": (2, B, False)}
    root = getattr(c, kind)
    assert _fields(root) == {
        "directory": (1, n["DirectoryNode"], False),
        "file": (2, n["FileNode"], False),
        "symlink": (3, n["SymlinkNode"], False),
    }
    assert [o.name for o in root.DESCRIPTOR.oneofs] == [oneof]
    assert _fields(p.PathInfo) == {  # type: ignore[attr-defined]
        oneof: (1, n["Node"], False),
        "references": (2, B, True),
        "narinfo": (3, sp + "NARInfo", False),
    }
    assert _fields(p.StorePath) == {"name": (1, S, False), "digest": (2, B, False)}  # type: ignore[attr-defined]
    assert _fields(p.NARInfo) == {  # type: ignore[attr-defined]
        "nar_size": (1, U64, False),
        "nar_sha256": (2, B, False),
        "signatures": (3, sp + "NARInfo.Signature", True),
        "reference_names": (4, S, True),
        "deriver": (5, sp + "StorePath", False),
        "ca": (6, sp + "NARInfo.CA", False),
    }
    assert _fields(p.NARInfo.CA) == {"type": (1, ENUM, False), "digest": (2, B, False)}  # type: ignore[attr-defined]
    hashes = p.NARInfo.CA.DESCRIPTOR.enum_types_by_name["Hash"]  # type: ignore[attr-defined]
    assert [(v.name, v.number) for v in hashes.values] == [
        ("NAR_SHA256", 0),
        ("NAR_SHA1", 1),
        ("NAR_SHA512", 2),
        ("NAR_MD5", 3),
        ("TEXT_SHA256", 4),
        ("FLAT_SHA1", 5),
        ("FLAT_MD5", 6),
        ("FLAT_SHA256", 7),
        ("FLAT_SHA512", 8),
    ]
    assert _fields(b.StatBlobRequest) == {  # type: ignore[attr-defined]
        "digest": (1, B, False),
        "send_chunks": (2, BOOL, False),
        "send_bao": (3, BOOL, False),
    }
    assert _fields(b.StatBlobResponse) == {  # type: ignore[attr-defined]
        "chunks": (2, cp + "StatBlobResponse.ChunkMeta", True),
        "bao": (3, B, False),
    }
    assert _fields(b.StatBlobResponse.ChunkMeta) == {"digest": (1, B, False), "size": (2, U64, False)}  # type: ignore[attr-defined]
    assert _fields(d.GetDirectoryRequest) == {"digest": (1, B, False), "recursive": (2, BOOL, False)}  # type: ignore[attr-defined]
    assert _fields(r.ListPathInfoRequest) == {}  # type: ignore[attr-defined]
    assert _fields(r.CalculateNARResponse) == {"nar_size": (1, U64, False), "nar_sha256": (2, B, False)}  # type: ignore[attr-defined]

    def methods(mod: object, name: str) -> dict[str, tuple[str, str, str, bool, bool]]:
        svc = mod.DESCRIPTOR.services_by_name[name]  # type: ignore[attr-defined]
        return {
            m.name: (
                svc.full_name,
                m.input_type.full_name,
                m.output_type.full_name,
                m.client_streaming,
                m.server_streaming,
            )
            for m in svc.methods
        }

    assert methods(b, "BlobService") == {
        "Stat": (cp + "BlobService", cp + "StatBlobRequest", cp + "StatBlobResponse", False, False),
        "Read": (cp + "BlobService", cp + "ReadBlobRequest", cp + "BlobChunk", False, True),
        "Put": (cp + "BlobService", cp + "BlobChunk", cp + "PutBlobResponse", True, False),
    }
    assert methods(d, "DirectoryService") == {
        "Get": (cp + "DirectoryService", cp + "GetDirectoryRequest", cp + "Directory", False, True),
        "Put": (cp + "DirectoryService", cp + "Directory", cp + "PutDirectoryResponse", True, False),
    }
    assert methods(r, "PathInfoService") == {
        "Get": (sp + "PathInfoService", sp + "GetPathInfoRequest", sp + "PathInfo", False, False),
        "Put": (sp + "PathInfoService", sp + "PathInfo", sp + "PathInfo", False, False),
        "CalculateNAR": (sp + "PathInfoService", n["Node"], sp + "CalculateNARResponse", False, False),
        "List": (sp + "PathInfoService", sp + "ListPathInfoRequest", sp + "PathInfo", False, True),
    }
