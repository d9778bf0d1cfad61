"""Nix's base32: alphabet `0123456789abcdfghijklmnpqrsvwxyz`, least significant 5-bit group first.

A 20-byte store path hash is 32 characters, a sha256 is 52. Only the codec; store
paths are in `tvix_store.core.pathinfo`.
"""

from __future__ import annotations

from tvix_store.core.errors import ValidationError

ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"
_INDEX = {c: i for i, c in enumerate(ALPHABET)}


def encoded_len(n: int) -> int:
    return (n * 8 - 1) // 5 + 1 if n else 0


def encode(data: bytes) -> str:
    n = encoded_len(len(data))
    value = int.from_bytes(data, "little")
    return "".join(ALPHABET[(value >> (5 * i)) & 31] for i in range(n - 1, -1, -1))


def decode(text: str, length: int | None = None) -> bytes:
    """Decode; `length` (bytes) defaults to the largest that fits; extra bits must be zero."""
    if length is None:
        length = len(text) * 5 // 8
    if encoded_len(length) != len(text):
        raise ValidationError(f"invalid nixbase32 length {len(text)} for {length} bytes: {text!r}")
    value = 0
    for i, c in enumerate(reversed(text)):
        d = _INDEX.get(c)
        if d is None:
            raise ValidationError(f"invalid nixbase32 character {c!r} in {text!r}")
        value |= d << (5 * i)
    if value >> (8 * length):
        raise ValidationError(f"invalid nixbase32 {text!r}: non-zero padding bits")
    return value.to_bytes(length, "little")
