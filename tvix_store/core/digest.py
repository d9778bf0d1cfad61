"""`B3Digest`: a BLAKE3-256 digest, always exactly 32 bytes, its text forms, and the one
BLAKE3 helper of the project (`blake3_of`, `B3Digest.of`, `check_digest`).

The canonical text form is lowercase hex (what `b3sum` prints). `B3Digest.parse`
also accepts the CLI input forms of CLI.md: `b3:` + base64, and plain base64
(standard or URL-safe, padding optional). Streams are hashed with `blake3.blake3`
incrementally where they are read; whole buffers go through `blake3_of`.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re

import blake3

from tvix_store.core.errors import IntegrityError, ValidationError

log = logging.getLogger("tvix_store")

DIGEST_LEN = 32
#: buffers from this size on are hashed with several threads
_MT_THRESHOLD = 1 << 20


Hasher = blake3.blake3


def new_hasher(large: bool = False) -> Hasher:
    """An incremental BLAKE3 hasher (`large`: the input will be big, hash with several threads)."""
    return blake3.blake3(max_threads=blake3.blake3.AUTO) if large else blake3.blake3()


def blake3_of(data: bytes | bytearray | memoryview) -> bytes:
    """The BLAKE3-256 of a whole buffer (multithreaded for large inputs; releases the GIL)."""
    if len(data) >= _MT_THRESHOLD:
        return blake3.blake3(data, max_threads=blake3.blake3.AUTO).digest()
    return blake3.blake3(data).digest()


_HEX_RE = re.compile(r"^[0-9a-fA-F]{64}\Z")  # \Z: `$` would allow a trailing newline


class B3Digest(bytes):
    """A 32-byte BLAKE3 digest. Construction checks the length; hex is its text form."""

    __slots__ = ()

    def __new__(cls, value: bytes | bytearray | memoryview) -> B3Digest:
        if isinstance(value, B3Digest):
            return value
        b = bytes(value)
        if len(b) != DIGEST_LEN:
            raise ValidationError(f"invalid digest length: expected {DIGEST_LEN} bytes, got {len(b)}")
        return super().__new__(cls, b)

    @classmethod
    def of(cls, data: bytes | bytearray | memoryview) -> B3Digest:
        """The BLAKE3-256 digest of `data` (multithreaded for large inputs)."""
        return cls(blake3_of(data))

    @classmethod
    def from_hex(cls, text: str) -> B3Digest:
        if not _HEX_RE.match(text):
            raise ValidationError(f"not a 64-character hex digest: {text!r}")
        return cls(bytes.fromhex(text))

    @classmethod
    def parse(cls, text: str) -> B3Digest:
        """Parse any accepted text form: hex, `b3:`+base64, or base64 (std/url-safe, padding optional)."""
        t = text.strip()
        if _HEX_RE.match(t):
            return cls(bytes.fromhex(t))
        b64 = t[3:] if t.startswith("b3:") else t
        if b64 and re.fullmatch(r"[A-Za-z0-9+/\-_]+={0,2}", b64):
            b64 = b64.rstrip("=")
            b64 += "=" * (-len(b64) % 4)
            try:
                raw = base64.b64decode(b64.replace("-", "+").replace("_", "/"), validate=True)
            except (binascii.Error, ValueError):
                raw = b""
            if len(raw) == DIGEST_LEN:
                return cls(raw)
        raise ValidationError(f"invalid digest {text!r}: expected 64 hex characters or base64 of 32 bytes")

    def b3_base64(self) -> str:
        """`b3:` + standard base64, the form tvix-store uses in xattrs."""
        return "b3:" + base64.b64encode(self).decode()

    def short(self) -> str:
        """Abbreviated form for messages: first and last 2 bytes in hex."""
        h = self.hex()
        return f"{h[:4]}…{h[-4:]}"

    def __str__(self) -> str:
        return self.hex()

    def __repr__(self) -> str:
        return f"B3Digest({self.hex()})"


EMPTY_DIGEST = B3Digest(blake3_of(b""))


def check_digest(what: str, digest: B3Digest, data: bytes | bytearray | memoryview) -> None:
    """Raise IntegrityError (and log it) unless `data` hashes to `digest`; `what` names it."""
    got = blake3_of(data)
    if got != digest:
        log.error("%s %s is corrupt: its %d bytes hash to %s", what, digest.hex(), len(data), got.hex())
        raise IntegrityError(f"{what} {digest.hex()} is corrupt: its {len(data)} bytes hash to {got.hex()}")
