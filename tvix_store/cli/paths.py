"""`tvix-store path list|info|rm`: the store paths of a store, one described, some removed.

- `path list [--json]`: every store path, sorted, one a line; `--json`: one JSON object a line
  (`path`, `narSize`, `narHash` as Nix writes it, `sha256:<nixbase32>`, `references` as full
  store paths). Needs a store that can enumerate its path infos (`capabilities.can_list`):
  over gRPC that is List, which 2024 and 2025 servers have; a 2022 (`tvix.store.v1`) server has
  no listing call, so against one it is an error.
- `path info [--json] STORE_PATH`: root node, NAR size and hash, references, signatures.
- `path rm STORE_PATH…`: removes the PathInfos only (all named paths must exist, else nothing
  is removed); their data goes with the next `gc`. No protocol generation has a delete call, so over
  gRPC it is an error.

Only argument handling and output; the store does the work.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from typing import Any

from tvix_store.cli import StoreNotFound, UsageError, open_store_from_args
from tvix_store.core import nixbase32
from tvix_store.core.castore import DirectoryNode, FileNode, Node, SymlinkNode
from tvix_store.core.errors import IntegrityError, StoreError, ValidationError
from tvix_store.core.pathinfo import STORE_DIR, PathInfo, StorePath


def _parse(text: str) -> StorePath:
    try:
        return StorePath.parse(text)
    except ValidationError as e:
        raise UsageError(str(e)) from None


def nar_hash(info: PathInfo) -> str | None:
    """Nix's form of the NAR hash (`sha256:<nixbase32>`), None without a narinfo."""
    return None if info.narinfo is None else "sha256:" + nixbase32.encode(info.narinfo.nar_sha256)


def references(info: PathInfo) -> list[str]:
    """The references as full store paths (their names come from the narinfo); a reference
    without a name is shown as its hash alone."""
    names = info.narinfo.reference_names if info.narinfo is not None else ()
    if len(names) == len(info.references):
        return [f"{STORE_DIR}/{n}" for n in names]
    return [f"{STORE_DIR}/{nixbase32.encode(r)}" for r in info.references]


def signatures(info: PathInfo) -> list[str]:
    """As Nix writes them: `NAME:BASE64`."""
    sigs = info.narinfo.signatures if info.narinfo is not None else ()
    return [f"{s.name}:{base64.b64encode(s.data).decode()}" for s in sigs]


def _node_json(node: Node | None) -> dict[str, Any] | None:
    if isinstance(node, DirectoryNode):
        return {"type": "directory", "digest": node.digest.hex(), "size": node.size}
    if isinstance(node, FileNode):
        return {"type": "file", "digest": node.digest.hex(), "size": node.size, "executable": node.executable}
    if isinstance(node, SymlinkNode):
        return {"type": "symlink", "target": node.target.decode("utf-8", "backslashreplace")}
    return None


def _node_text(node: Node | None) -> str:
    if isinstance(node, DirectoryNode):
        return f"directory {node.digest.hex()} (size {node.size})"
    if isinstance(node, FileNode):
        x = ", executable" if node.executable else ""
        return f"file {node.digest.hex()} ({node.size} bytes{x})"
    if isinstance(node, SymlinkNode):
        return f"symlink -> {node.target.decode('utf-8', 'backslashreplace')}"
    return "(none)"


def list_paths(args: argparse.Namespace) -> int:
    with open_store_from_args(args) as store:
        if not store.pathinfos.capabilities.can_list:
            raise StoreError(
                f"cannot list the store paths of {store.url}: it has no way to enumerate its path infos; "
                "run it where the store is (--store local:///…)"
            )
        infos = sorted(store.pathinfos.iter_all(), key=lambda i: i.store_path.absolute)
    out = sys.stdout
    for info in infos:
        if args.json:
            size = info.narinfo.nar_size if info.narinfo is not None else None
            obj = {"path": info.store_path.absolute, "narSize": size, "narHash": nar_hash(info)}
            obj["references"] = references(info)
            out.write(json.dumps(obj) + "\n")
        else:
            out.write(info.store_path.absolute + "\n")
    out.flush()
    return 0


def _get(store: Any, sp: StorePath) -> PathInfo:
    info = store.pathinfos.get(sp.digest)
    if info is None or info.node is None or info.node.name.decode("ascii", "replace") != sp.basename:
        raise StoreNotFound(f"store path {sp} not found")
    return info


def info(args: argparse.Namespace) -> int:
    sp = _parse(args.store_path)
    with open_store_from_args(args) as store:
        pi = _get(store, sp)
    size = pi.narinfo.nar_size if pi.narinfo is not None else None
    if args.json:
        obj = {
            "path": sp.absolute,
            "root": _node_json(pi.node),
            "narSize": size,
            "narHash": nar_hash(pi),
            "references": references(pi),
            "signatures": signatures(pi),
        }
        print(json.dumps(obj), flush=True)
        return 0
    lines = [f"store path: {sp.absolute}", f"root: {_node_text(pi.node)}"]
    lines.append(f"nar size: {size if size is not None else 'unknown'}")
    lines.append(f"nar hash: {nar_hash(pi) or 'unknown'}")
    lines += [f"reference: {r}" for r in references(pi)] or ["references: none"]
    lines += [f"signature: {s}" for s in signatures(pi)] or ["signatures: none"]
    print("\n".join(lines), flush=True)
    return 0


def rm(args: argparse.Namespace) -> int:
    paths = list(dict.fromkeys(_parse(t) for t in args.store_paths))
    with open_store_from_args(args) as store:
        if store.pathinfos.capabilities.is_remote:
            raise StoreError(
                f"cannot remove store paths from {store.url}: the protocol (tvix.store.v1) has no call "
                "that deletes a path info; run it where the store is (--store local:///…)"
            )
        missing = []
        for sp in paths:
            try:
                _get(store, sp)
            except StoreNotFound:
                missing.append(sp.absolute)
            except IntegrityError:
                pass  # a damaged path info: removing it is what one wants
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise StoreNotFound(f"store path not found (nothing removed): {', '.join(missing[:3])}{more}")
        for sp in paths:
            store.pathinfos.delete(sp.digest)
    return 0
