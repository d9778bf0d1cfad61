"""The `.ls` listing of a store path: the JSON Nix writes with `write-nar-listing=1`
(`{"version":1,"root":{…}}`, each regular file with its size, executable bit and `narOffset`,
the offset of its contents in the NAR), made from the Directories alone: no blob is read.

Offsets are counted with the NAR grammar pieces of `tvix_store.nar`, in the order `nar.render`
writes them, so they point into the NAR this bridge serves. Iterative (no recursion limit),
produced in pieces of `PIECE_PARTS` entries. JSON strings cannot carry bytes that are not
UTF-8: such names and targets are written with `\\xNN` escapes (what Python's
`backslashreplace` gives), a listing is never refused for them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from tvix_store import nar
from tvix_store.core.castore import DirectoryNode, FileNode, Node, SymlinkNode
from tvix_store.core.errors import NotFoundError
from tvix_store.directoryservice import DirectoryService

#: JSON parts joined into one piece (a few tens of KiB)
PIECE_PARTS = 1024


def _name(b: bytes) -> str:
    return json.dumps(b.decode("utf-8", "backslashreplace"), ensure_ascii=False)


def listing(node: Node, directories: DirectoryService) -> Iterator[bytes]:
    """The `.ls` JSON of `node`, in pieces. NotFoundError for a missing Directory."""
    out: list[str] = ['{"version":1,"root":']
    pos = len(nar.MAGIC)
    stack: list[tuple[Iterator[Node], bool]] = []  # open directories: entries left, first entry?
    pending: Node | None = node
    while True:
        if pending is not None:
            if isinstance(pending, DirectoryNode):
                d = directories.get(pending.digest)
                if d is None:
                    raise NotFoundError(f"directory {pending.digest.hex()} not found")
                out.append('{"type":"directory","entries":{')
                pos += len(nar.DIRECTORY_OPEN)
                stack.append((iter(d.nodes()), True))
            else:
                if isinstance(pending, FileNode):
                    header = nar.regular_header(pending.executable, pending.size)
                    exe = ',"executable":true' if pending.executable else ""
                    out.append(f'{{"type":"regular","size":{pending.size}{exe},"narOffset":{pos + len(header)}}}')
                    pos += len(header) + pending.size + len(nar.regular_trailer(pending.size))
                else:
                    assert isinstance(pending, SymlinkNode)
                    out.append(f'{{"type":"symlink","target":{_name(pending.target)}}}')
                    pos += len(nar.symlink(pending.target))
                if stack:
                    pos += len(nar.ENTRY_CLOSE)
            pending = None
            if len(out) >= PIECE_PARTS:
                yield "".join(out).encode()
                out = []
        if not stack:
            break
        entries, first = stack[-1]
        child = next(entries, None)
        if child is None:
            stack.pop()
            out.append("}}")
            pos += len(nar.DIRECTORY_CLOSE)
            if stack:
                pos += len(nar.ENTRY_CLOSE)
            continue
        if not first:
            out.append(",")
        stack[-1] = (entries, False)
        out.append(_name(child.name) + ":")
        pos += len(nar.entry_open(child.name))
        pending = child
    out.append("}")
    yield "".join(out).encode()
