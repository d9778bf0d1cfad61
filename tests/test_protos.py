"""The committed generated modules match protos/*.proto, and the schema matches PROTOCOL.md."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from pathlib import Path

from tvix_store.protocol.g1 import castore_pb2, pathinfo_pb2, rpc_blobstore_pb2, rpc_directory_pb2, rpc_pathinfo_pb2

REPO = Path(__file__).resolve().parent.parent


def test_generated_modules_are_fresh(tmp_path: Path) -> None:
    out = tmp_path / "gen"
    subprocess.run(
        [str(REPO / "scripts" / "gen-protos"), str(out)], check=True, env={**os.environ, "PYTHON": sys.executable}
    )
    committed = REPO / "tvix_store" / "protocol" / "g1"
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
