"""Validated domain types for Nix store paths: `StorePath`, `NarInfo`, `PathInfo`.

Knows the store path basename rule (`<32 nixbase32 chars>-<name>`, name of
`[A-Za-z0-9+\\-_?=.]`, 1–211 chars), the `nix-store --add` store path computation for
imported trees, and PathInfo's validation rules of PROTOCOL.md. No I/O, no protobuf.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from tvix_store.core import nixbase32
from tvix_store.core.castore import DirectoryNode, FileNode, Node, SymlinkNode
from tvix_store.core.errors import ValidationError

STORE_DIR = "/nix/store"
HASH_LEN = 20
_NAME_RE = re.compile(r"^[A-Za-z0-9+\-_?=.]{1,211}\Z")  # \Z: `$` would allow a trailing newline


@dataclass(frozen=True, slots=True)
class StorePath:
    """A Nix store path: a 20-byte hash and a name."""

    digest: bytes
    name: str

    @classmethod
    def parse_basename(cls, basename: str | bytes) -> StorePath:
        if isinstance(basename, bytes):
            try:
                basename = basename.decode("ascii")
            except UnicodeDecodeError:
                raise ValidationError(f"invalid store path basename {basename!r}: not ASCII") from None
        if len(basename) < 34 or basename[32] != "-":
            raise ValidationError(f"invalid store path basename {basename!r}: expected <32 nixbase32 chars>-<name>")
        name = basename[33:]
        if not _NAME_RE.match(name):
            raise ValidationError(f"invalid store path name {name!r}: expected 1–211 chars of [A-Za-z0-9+-_?=.]")
        try:
            digest = nixbase32.decode(basename[:32], HASH_LEN)
        except ValidationError as e:
            raise ValidationError(f"invalid store path basename {basename!r}: {e}") from None
        return cls(digest, name)

    @classmethod
    def parse(cls, text: str) -> StorePath:
        """Parse `/nix/store/<hash>-<name>` (trailing path components are rejected) or a bare basename."""
        t = text.rstrip("/")
        if t.startswith(STORE_DIR + "/"):
            t = t[len(STORE_DIR) + 1 :]
        if "/" in t:
            raise ValidationError(f"not a store path: {text!r}")
        return cls.parse_basename(t)

    @classmethod
    def from_nar_sha256(cls, nar_sha256: bytes, name: str) -> StorePath:
        """The store path `nix-store --add` gives a tree whose NAR has this sha256."""
        if not _NAME_RE.match(name):
            raise ValidationError(f"invalid store path name {name!r}: expected 1–211 chars of [A-Za-z0-9+-_?=.]")
        fingerprint = f"source:sha256:{nar_sha256.hex()}:{STORE_DIR}:{name}"
        h = hashlib.sha256(fingerprint.encode()).digest()
        out = bytearray(HASH_LEN)
        for i, b in enumerate(h):
            out[i % HASH_LEN] ^= b
        return cls(bytes(out), name)

    @property
    def basename(self) -> str:
        return f"{nixbase32.encode(self.digest)}-{self.name}"

    @property
    def absolute(self) -> str:
        return f"{STORE_DIR}/{self.basename}"

    def __str__(self) -> str:
        return self.absolute


@dataclass(frozen=True, slots=True)
class Signature:
    name: str
    data: bytes


@dataclass(frozen=True, slots=True)
class NarInfo:
    """Nix metadata of a store path: NAR size and sha256, signatures, reference names."""

    nar_size: int
    nar_sha256: bytes
    signatures: tuple[Signature, ...] = ()
    reference_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class PathInfo:
    """A store path's root node (named by the store path basename) plus references and narinfo."""

    node: Node | None
    references: tuple[bytes, ...] = ()
    narinfo: NarInfo | None = field(default=None)

    def validate(self) -> StorePath:
        """Raise ValidationError for any rule of PROTOCOL.md; return the store path."""
        if self.node is None:
            raise ValidationError("path info has no root node")
        if not isinstance(self.node, (DirectoryNode, FileNode, SymlinkNode)):
            raise ValidationError("path info root node has an unknown type")
        try:
            store_path = StorePath.parse_basename(self.node.name)
        except ValidationError as e:
            raise ValidationError(f"root node name is not a store path basename: {e}") from None
        self.node.validate()
        for i, ref in enumerate(self.references):
            if len(ref) != HASH_LEN:
                raise ValidationError(f"reference {i} has length {len(ref)}, expected {HASH_LEN}")
        if self.narinfo is not None:
            ni = self.narinfo
            if len(ni.nar_sha256) != 32:
                raise ValidationError(f"narinfo nar_sha256 has length {len(ni.nar_sha256)}, expected 32")
            if len(ni.reference_names) != len(self.references):
                raise ValidationError(
                    f"{len(ni.reference_names)} reference_names for {len(self.references)} references"
                )
            for i, (rn, ref) in enumerate(zip(ni.reference_names, self.references, strict=True)):
                try:
                    sp = StorePath.parse_basename(rn)
                except ValidationError as e:
                    raise ValidationError(f"reference_names[{i}]: {e}") from None
                if sp.digest != ref:
                    raise ValidationError(f"reference_names[{i}] {rn!r} does not match references[{i}]")
        return store_path

    @property
    def store_path(self) -> StorePath:
        assert self.node is not None
        return StorePath.parse_basename(self.node.name)
