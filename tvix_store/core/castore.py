"""Validated domain types of the content-addressed tree: nodes and `Directory`.

This module is the one place that knows PROTOCOL.md's rules for names, sort order,
symlink targets and `DirectoryNode.size`, and the one place that computes a
Directory's digest (BLAKE3 of its deterministic protobuf encoding, written out by
hand here so the domain does not depend on the generated protobuf modules; a test
checks it against the protobuf library's encoding).

It is not the wire format (`tvix_store.protocol.wire*` convert) and does no I/O.
Names and symlink targets are `bytes` as the filesystem gives them, any bytes but the few
the rules exclude (as in `tvix.castore.v1` and `snix.castore.v1`, where they are protobuf
bytes); sizes are uint64. The 2022 protocol's strings and uint32 sizes are its codec's
concern (`wire.G1` refuses what it cannot carry).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

from tvix_store.core.digest import B3Digest
from tvix_store.core.errors import ValidationError

MAX_NAME_LEN = 255
MAX_TARGET_LEN = 4095
#: the largest value a 2022 (`tvix.store.v1`) size field holds; the domain is not bound by it
MAX_U32 = 0xFFFFFFFF
#: the largest size (uint64 in `tvix.castore.v1` and `snix.castore.v1`)
MAX_U64 = (1 << 64) - 1


def _fmt(name: bytes) -> str:
    return name.decode("utf-8", "backslashreplace")


def validate_name(name: bytes, what: str = "name") -> None:
    """Check an entry name: not empty, not . or .., no / or NUL, ≤ 255 bytes (any other bytes)."""
    if not name:
        raise ValidationError(f"invalid {what}: empty")
    if name in (b".", b".."):
        raise ValidationError(f"invalid {what} {_fmt(name)!r}: . and .. are not allowed")
    if b"/" in name or b"\0" in name:
        raise ValidationError(f"invalid {what} {_fmt(name)!r}: contains '/' or NUL")
    if len(name) > MAX_NAME_LEN:
        raise ValidationError(f"invalid {what} {_fmt(name[:32])!r}…: longer than {MAX_NAME_LEN} bytes")


def validate_target(target: bytes, name: bytes) -> None:
    """Check a symlink target: not empty, no NUL, ≤ 4095 bytes (any other bytes)."""
    if not target:
        raise ValidationError(f"symlink {_fmt(name)!r}: empty target")
    if b"\0" in target:
        raise ValidationError(f"symlink {_fmt(name)!r}: target contains NUL")
    if len(target) > MAX_TARGET_LEN:
        raise ValidationError(f"symlink {_fmt(name)!r}: target longer than {MAX_TARGET_LEN} bytes")


def _check_u64(value: int, what: str) -> None:
    if not 0 <= value <= MAX_U64:
        raise ValidationError(f"{what} {value} does not fit in uint64")


@dataclass(frozen=True, slots=True)
class DirectoryNode:
    """A reference to a Directory by digest; `size` is its recursive entry count."""

    name: bytes
    digest: B3Digest
    size: int

    def validate(self) -> None:
        validate_name(self.name)
        _check_u64(self.size, f"directory {_fmt(self.name)!r}: size")

    def renamed(self, name: bytes) -> DirectoryNode:
        return DirectoryNode(name, self.digest, self.size)


@dataclass(frozen=True, slots=True)
class FileNode:
    """A regular file: its content blob's digest, size, and executable bit."""

    name: bytes
    digest: B3Digest
    size: int
    executable: bool = False

    def validate(self) -> None:
        validate_name(self.name)
        _check_u64(self.size, f"file {_fmt(self.name)!r}: size")

    def renamed(self, name: bytes) -> FileNode:
        return FileNode(name, self.digest, self.size, self.executable)


@dataclass(frozen=True, slots=True)
class SymlinkNode:
    """A symbolic link and its target (may be absolute or dangling)."""

    name: bytes
    target: bytes

    def validate(self) -> None:
        validate_name(self.name)
        validate_target(self.target, self.name)

    def renamed(self, name: bytes) -> SymlinkNode:
        return SymlinkNode(name, self.target)


Node = DirectoryNode | FileNode | SymlinkNode


# --- deterministic protobuf encoding (proto3: fields in number order, defaults omitted) ---


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _len_field(num: int, data: bytes) -> bytes:
    if not data:
        return b""
    return _varint(num << 3 | 2) + _varint(len(data)) + data


def _message_field(num: int, data: bytes) -> bytes:
    """An element of a repeated message field: present even when empty."""
    return _varint(num << 3 | 2) + _varint(len(data)) + data


def _varint_field(num: int, value: int) -> bytes:
    if not value:
        return b""
    return _varint(num << 3) + _varint(value)


def encode_node(node: Node) -> bytes:
    """Deterministic protobuf encoding of a DirectoryNode, FileNode or SymlinkNode message."""
    if isinstance(node, SymlinkNode):
        return _len_field(1, node.name) + _len_field(2, node.target)
    out = _len_field(1, node.name) + _len_field(2, node.digest) + _varint_field(3, node.size)
    if isinstance(node, FileNode):
        out += _varint_field(4, int(node.executable))
    return out


@dataclass(frozen=True)
class Directory:
    """One directory's entries, split into three lists each sorted by name.

    `validate()` checks every rule of PROTOCOL.md that can be checked without the
    store (names, order, uniqueness, targets); the sizes of child DirectoryNodes are
    checked against the referenced Directories by whoever has them
    (`check_child_sizes`). `digest` and `size` are derived and cached.
    """

    directories: tuple[DirectoryNode, ...] = ()
    files: tuple[FileNode, ...] = ()
    symlinks: tuple[SymlinkNode, ...] = ()

    @classmethod
    def from_nodes(cls, nodes: Iterator[Node] | list[Node]) -> Directory:
        """Build a Directory from nodes in any order (sorted here)."""
        ds: list[DirectoryNode] = []
        fs: list[FileNode] = []
        ss: list[SymlinkNode] = []
        for n in nodes:
            if isinstance(n, DirectoryNode):
                ds.append(n)
            elif isinstance(n, FileNode):
                fs.append(n)
            else:
                ss.append(n)
        key = lambda n: n.name  # noqa: E731
        return cls(tuple(sorted(ds, key=key)), tuple(sorted(fs, key=key)), tuple(sorted(ss, key=key)))

    @cached_property
    def encoded(self) -> bytes:
        """The deterministic protobuf encoding; its BLAKE3 is the digest."""
        parts = [_message_field(1, encode_node(n)) for n in self.directories]
        parts += [_message_field(2, encode_node(n)) for n in self.files]
        parts += [_message_field(3, encode_node(n)) for n in self.symlinks]
        return b"".join(parts)

    @cached_property
    def digest(self) -> B3Digest:
        return B3Digest.of(self.encoded)

    @cached_property
    def size(self) -> int:
        """Recursive entry count: own entries plus the sizes of child directories."""
        return len(self.directories) + len(self.files) + len(self.symlinks) + sum(d.size for d in self.directories)

    def nodes(self) -> list[Node]:
        """All entries, merged in bytewise name order (the NAR and readdir order)."""
        out: list[Node] = [*self.directories, *self.files, *self.symlinks]
        out.sort(key=lambda n: n.name)
        return out

    def lookup(self, name: bytes) -> Node | None:
        for lst in (self.directories, self.files, self.symlinks):
            for n in lst:
                if n.name == name:
                    return n
        return None

    def as_node(self, name: bytes) -> DirectoryNode:
        """A DirectoryNode referencing this Directory under `name`."""
        return DirectoryNode(name, self.digest, self.size)

    def validate(self) -> None:
        """Raise ValidationError naming the first rule this Directory breaks."""
        seen: set[bytes] = set()
        for kind, lst in (("directories", self.directories), ("files", self.files), ("symlinks", self.symlinks)):
            prev: bytes | None = None
            for n in lst:
                n.validate()
                if prev is not None and n.name <= prev:
                    raise ValidationError(
                        f"{kind} not sorted strictly ascending by name: {_fmt(n.name)!r} after {_fmt(prev)!r}"
                    )
                prev = n.name
                if n.name in seen:
                    raise ValidationError(f"duplicate name {_fmt(n.name)!r}")
                seen.add(n.name)
        _check_u64(self.size, "directory size")

    def check_child_sizes(self, sizes: dict[B3Digest, int]) -> None:
        """Check each child DirectoryNode's size against the known size of its Directory."""
        for d in self.directories:
            known = sizes.get(d.digest)
            if known is not None and known != d.size:
                raise ValidationError(
                    f"directory {_fmt(d.name)!r} has size {d.size}, but directory {d.digest.hex()} has size {known}"
                )


EMPTY_DIRECTORY = Directory()
