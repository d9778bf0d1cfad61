"""Nix binary cache signing keys: load the files of `nix-store --generate-binary-cache-key`,
sign narinfo fingerprints, verify signatures.

A secret key file holds `NAME:base64(64 bytes)` (libsodium's ed25519 secret key: the 32-byte
seed followed by the public key), a public key file `NAME:base64(32 bytes)`. A signature is
ed25519 over the fingerprint (`narinfo.fingerprint`), shown as `Sig: NAME:base64(64 bytes)`.
The ed25519 arithmetic is `cryptography`'s (OpenSSL); this module only parses and wires.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tvix_store.core.errors import ValidationError
from tvix_store.core.pathinfo import Signature


def _split(text: str, size: int, what: str) -> tuple[str, bytes]:
    name, sep, data = text.strip().partition(":")
    try:
        raw = base64.b64decode(data, validate=True) if sep else b""
    except binascii.Error:
        raw = b""
    if not name or any(c.isspace() for c in name) or len(raw) != size:
        raise ValidationError(f"not a {what}: expected NAME:base64 of {size} bytes")
    return name, raw


@dataclass(frozen=True)
class SigningKey:
    """A named ed25519 secret key, as Nix writes it."""

    name: str
    _key: Ed25519PrivateKey

    @classmethod
    def parse(cls, text: str) -> SigningKey:
        name, raw = _split(text, 64, "Nix secret key (nix-store --generate-binary-cache-key NAME SECRET PUBLIC)")
        key = Ed25519PrivateKey.from_private_bytes(raw[:32])
        if key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw) != raw[32:]:
            raise ValidationError("not a valid Nix secret key: its public half does not match its seed")
        return cls(name, key)

    @classmethod
    def load(cls, path: str | Path) -> SigningKey:
        """Read a secret key file; ValidationError naming the file if it is not one (OSError if unreadable)."""
        text = Path(path).read_text(encoding="ascii", errors="replace")
        try:
            return cls.parse(text)
        except ValidationError as e:
            raise ValidationError(f"{path}: {e}") from None

    def sign(self, fingerprint: bytes) -> Signature:
        return Signature(self.name, self._key.sign(fingerprint))

    @property
    def public(self) -> str:
        """The public key as Nix writes it (`NAME:base64`), for `trusted-public-keys`."""
        raw = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return f"{self.name}:{base64.b64encode(raw).decode()}"


def verify(public_key: str, fingerprint: bytes, sig: Signature) -> bool:
    """Whether `sig` is a valid signature of `fingerprint` by the key `NAME:base64(32 bytes)`."""
    name, raw = _split(public_key, 32, "Nix public key")
    if sig.name != name:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(raw).verify(sig.data, fingerprint)
    except InvalidSignature:
        return False
    return True
