"""What a network-facing server (the gRPC daemon, the nar-bridge) needs to decide who may do
what: the token file, the constant-time check of a presented token, TLS file loading, and the
"is this address reachable from the network" rule the CLI applies before listening.

Token file (`--auth-tokens FILE`): one token per line followed by its scope, `ro` (reads) or
`rw` (reads and writes), separated by white space; blank lines and lines starting with `#` are
ignored. Tokens are kept only as SHA-256 digests and compared with `hmac.compare_digest`
against every entry (no early exit), so neither the comparison nor the table leaks a token.
Errors in the file name the line number, never the token.

Not here: the protocol adapters (`tvix_store.serve.grpcauth` for gRPC metadata, the
`nar-bridge` middleware in `tvix_store.narbridge.app`), nor the listening sockets.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
import os
import socket
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path

from tvix_store.core.errors import ValidationError
from tvix_store.util.net import is_loopback

log = logging.getLogger("tvix_store.serve.security")


class Scope(enum.Enum):
    """What a token may do."""

    READ = "ro"
    WRITE = "rw"


def _h(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


@dataclass(frozen=True)
class Tokens:
    """The accepted tokens (as SHA-256 digests) and their scopes."""

    entries: tuple[tuple[bytes, Scope], ...]

    @classmethod
    def from_pairs(cls, pairs: list[tuple[str, Scope]]) -> Tokens:
        return cls(tuple((_h(t), s) for t, s in pairs))

    @classmethod
    def load(cls, path: str | Path) -> Tokens:
        """Parse a token file; ValidationError naming the file and line for anything malformed."""
        try:
            st = os.stat(path)
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValidationError(f"--auth-tokens {path}: {getattr(e, 'strerror', None) or e}") from None
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("token file %s is readable by other users (chmod 600 it)", path)
        pairs: list[tuple[str, Scope]] = []
        for n, line in enumerate(text.splitlines(), 1):
            s = line.strip()
            if not s or s.startswith("#"):
                continue
            parts = s.split()
            if len(parts) != 2 or parts[1] not in ("ro", "rw"):
                raise ValidationError(f"--auth-tokens {path}, line {n}: expected 'TOKEN ro' or 'TOKEN rw'")
            pairs.append((parts[0], Scope(parts[1])))
        if not pairs:
            raise ValidationError(f"--auth-tokens {path}: no tokens in the file")
        return cls.from_pairs(pairs)

    def scope_of(self, token: str | None) -> Scope | None:
        """The scope of `token`, or None if it is missing or not one of ours. Constant time in
        the token: every entry is compared, with `hmac.compare_digest`."""
        if token is None:
            return None
        h = _h(token)
        found: Scope | None = None
        for digest, scope in self.entries:
            if hmac.compare_digest(digest, h) and found is None:
                found = scope
        return found


def bearer_of(header: str | None) -> str | None:
    """The token of an `Authorization` value: `Bearer TOKEN`, or HTTP Basic with the token as
    the password (what Nix sends from a netrc file); None if absent or malformed."""
    if not header:
        return None
    kind, _, value = header.strip().partition(" ")
    value = value.strip()
    if kind.lower() == "bearer" and value:
        return value
    if kind.lower() == "basic" and value:
        import base64
        import binascii

        try:
            user_pass = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        _, sep, password = user_pass.partition(":")
        return password if sep and password else None
    return None


@dataclass(frozen=True)
class TlsFiles:
    """The PEM contents of a server's certificate chain, key and (for mutual TLS) client CA,
    and the files they came from (`ssl.SSLContext.load_cert_chain` wants paths)."""

    cert: bytes
    key: bytes
    client_ca: bytes | None = None
    cert_path: str = ""
    key_path: str = ""

    def ssl_context(self) -> ssl.SSLContext:
        """A server-side TLS context (TLS 1.2 at least; client certificates required with a CA)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.cert_path, self.key_path)
            if self.client_ca is not None:
                ctx.load_verify_locations(cadata=self.client_ca.decode("ascii", "replace"))
                ctx.verify_mode = ssl.CERT_REQUIRED
        except (OSError, ssl.SSLError) as e:
            raise ValidationError(f"--tls-cert/--tls-key/--tls-client-ca: {e}") from None
        return ctx

    @classmethod
    def load(cls, cert: str, key: str, client_ca: str | None = None) -> TlsFiles:
        def read(opt: str, path: str) -> bytes:
            try:
                data = Path(path).read_bytes()
            except OSError as e:
                raise ValidationError(f"{opt} {path}: {e.strerror or e}") from None
            if b"-----BEGIN " not in data:
                raise ValidationError(f"{opt} {path}: not a PEM file")
            return data

        return cls(
            read("--tls-cert", cert),
            read("--tls-key", key),
            read("--tls-client-ca", client_ca) if client_ca else None,
            cert_path=cert,
            key_path=key,
        )


def exposure_problem(host: str | None, *, tls: bool, auth: bool) -> str | None:
    """Why listening on `host` (None: a unix socket) is unsafe, or None if it is fine: a
    non-loopback address needs TLS (else tokens and data travel in clear) and authentication
    (tokens or client certificates; else anyone on the network can read and write)."""
    if host is None or is_loopback(host):
        return None
    try:
        socket.getaddrinfo(host.strip("[]"), None, type=socket.SOCK_STREAM)
    except OSError:
        return None  # no address at all: binding fails with its own error
    missing = []
    if not tls:
        missing.append("TLS (--tls-cert and --tls-key)")
    if not auth:
        missing.append("authentication (--auth-tokens FILE, or --tls-client-ca)")
    if not missing:
        return None
    return (
        f"refusing to listen on the network address {host} without {' and '.join(missing)}: anyone who "
        f"can reach it could read and write the store; give them, listen on 127.0.0.1 or a unix socket, "
        f"or pass --insecure"
    )
