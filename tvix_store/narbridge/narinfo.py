"""The text formats of a Nix HTTP binary cache: narinfo (parse and render), the signature
fingerprint, `nix-cache-info`, and the names in URLs (`<hash>.narinfo`, `nar/<hash>.nar.xz`,
`nar/tvix-castore/<node>?narsize=N`).

Pure functions over validated values (`tvix_store.core`); no I/O, no HTTP. Parsing is strict
where a value ends up in the store (store paths, hashes, sizes, signatures, CA) and lenient
where Nix sends fields that describe only its own upload (URL, Compression, FileHash,
FileSize, System: read and ignored). Every problem is a ValidationError naming the line.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from tvix_store.core import nixbase32
from tvix_store.core.castore import MAX_U64, Node
from tvix_store.core.errors import ValidationError
from tvix_store.core.pathinfo import HASH_LEN, STORE_DIR, Signature, StorePath
from tvix_store.protocol import wire

#: MIME types of the answers
NARINFO_TYPE = "text/x-nix-narinfo"
CACHE_INFO_TYPE = "text/x-nix-cache-info"
NAR_TYPE = "application/x-nix-nar"

#: URL prefixes of NARs rendered from a castore node (tvix's, and snix's: both accepted)
NAR_PREFIXES = ("tvix-castore", "snix-castore")
#: the one written into narinfos (clients cache these URLs: never change it)
NAR_PREFIX = "tvix-castore"

#: compressions of uploaded NARs: file name suffix → name (as Nix's `compression=` spells it)
SUFFIXES = {"": "none", ".xz": "xz", ".zst": "zstd", ".bz2": "bzip2"}

_NARINFO_NAME = re.compile(r"([0-9a-df-np-sv-z]{32})\.narinfo\Z")
_LS_NAME = re.compile(r"([0-9a-df-np-sv-z]{32})\.ls\Z")
_NAR_NAME = re.compile(r"([0-9a-df-np-sv-z]{52})\.nar(\.xz|\.zst|\.bz2)?\Z")
_CA = re.compile(r"(text|fixed):[A-Za-z0-9:+/=_.-]{1,1000}\Z")
_KEY_NAME = re.compile(r"[^\s:]{1,256}\Z")
#: the longest node encoding accepted in a URL (a node is < 300 bytes: name empty, 32-byte
#: digest, or a symlink target of at most 4095 bytes)
MAX_NODE_BYTES = 4200


def path_hash_of(name: str, pattern: re.Pattern[str] = _NARINFO_NAME) -> bytes | None:
    """The 20-byte store path hash of `<32 nixbase32>.narinfo`, or None if `name` is not that."""
    m = pattern.match(name)
    if m is None:
        return None
    try:
        return nixbase32.decode(m.group(1), HASH_LEN)
    except ValidationError:
        return None


def listing_hash_of(name: str) -> bytes | None:
    """The store path hash of `<32 nixbase32>.ls`, or None."""
    return path_hash_of(name, _LS_NAME)


def nar_file_of(name: str) -> tuple[bytes, str] | None:
    """(sha256, compression) of an uploaded NAR's file name `<52 nixbase32>.nar[.xz|.zst|.bz2]`."""
    m = _NAR_NAME.match(name)
    if m is None:
        return None
    try:
        return nixbase32.decode(m.group(1), 32), SUFFIXES[m.group(2) or ""]
    except ValidationError:
        return None


# --- the NAR URL of a castore node --------------------------------------------------------


def nar_url(node: Node, nar_size: int) -> str:
    """`nar/tvix-castore/<base64url of the unnamed Node>?narsize=N` (relative to the cache root)."""
    raw = wire.node_to_bytes(node.renamed(b""))
    return f"nar/{NAR_PREFIX}/{base64.urlsafe_b64encode(raw).rstrip(b'=').decode()}?narsize={nar_size}"


def node_of_url(text: str) -> Node | None:
    """The node a NAR URL's `<node>` part encodes, or None when it is not one (undecodable, a
    named node, an invalid digest or target): such a URL names nothing (404)."""
    if not text or len(text) > MAX_NODE_BYTES * 4 // 3 + 4 or "=" in text:
        return None
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
        node = wire.node_from_bytes(raw)
    except (binascii.Error, ValueError):  # ValidationError is a ValueError
        return None
    if node.name:
        return None
    try:
        node.renamed(b"x").validate()
    except ValidationError:
        return None
    return node


# --- narinfo --------------------------------------------------------------------------------


@dataclass(frozen=True)
class NarInfoText:
    """What a narinfo says about a store path (the fields this bridge keeps)."""

    store_path: StorePath
    nar_sha256: bytes
    nar_size: int
    references: tuple[str, ...] = ()  # basenames, sorted, unique
    deriver: str | None = None  # basename of the .drv
    signatures: tuple[Signature, ...] = ()
    ca: str | None = None
    url: str | None = None


def fingerprint(store_path: StorePath, nar_sha256: bytes, nar_size: int, references: tuple[str, ...]) -> bytes:
    """What Nix signs: `1;<store path>;sha256:<nixbase32>;<nar size>;<sorted full reference paths>`."""
    refs = ",".join(sorted(f"{STORE_DIR}/{r}" for r in references))
    return f"1;{store_path.absolute};sha256:{nixbase32.encode(nar_sha256)};{nar_size};{refs}".encode()


def render(info: NarInfoText, url: str) -> str:
    """The narinfo served: fields in Nix's order, `Compression: none`, FileSize = NarSize."""
    lines = [
        f"StorePath: {info.store_path.absolute}",
        f"URL: {url}",
        "Compression: none",
        f"FileSize: {info.nar_size}",
        f"NarHash: sha256:{nixbase32.encode(info.nar_sha256)}",
        f"NarSize: {info.nar_size}",
        "References: " + " ".join(sorted(info.references)),
    ]
    if info.deriver:
        lines.append(f"Deriver: {info.deriver}")
    lines += [f"Sig: {s.name}:{base64.b64encode(s.data).decode()}" for s in info.signatures]
    if info.ca:
        lines.append(f"CA: {info.ca}")
    return "\n".join(lines) + "\n"


def parse_hash(text: str, what: str = "NarHash") -> bytes:
    """A sha256 as Nix writes it (`sha256:` + nixbase32 or hex) or as SRI (`sha256-` + base64)."""
    if text.startswith("sha256:"):
        h = text[len("sha256:") :]
        if len(h) == 52:
            return nixbase32.decode(h, 32)
        if len(h) == 64 and re.fullmatch(r"[0-9a-f]{64}", h):
            return bytes.fromhex(h)
    elif text.startswith("sha256-"):
        try:
            raw = base64.b64decode(text[len("sha256-") :], validate=True)
        except binascii.Error:
            raw = b""
        if len(raw) == 32:
            return raw
    raise ValidationError(f"{what} {text[:80]!r} is not a sha256 (expected sha256:<52 nixbase32 characters>)")


def parse_signature(text: str) -> Signature:
    name, sep, data = text.partition(":")
    try:
        raw = base64.b64decode(data, validate=True) if sep else b""
    except binascii.Error:
        raw = b""
    if not _KEY_NAME.match(name) or len(raw) != 64:
        raise ValidationError(f"Sig {text[:80]!r} is not <key name>:<base64 of a 64-byte ed25519 signature>")
    return Signature(name, raw)


def _basename(text: str, what: str) -> str:
    try:
        return StorePath.parse_basename(text).basename
    except ValidationError as e:
        raise ValidationError(f"{what}: {e}") from None


_SINGLE = ("StorePath", "URL", "Compression", "FileHash", "FileSize", "NarHash", "NarSize", "References", "Deriver",
           "System", "CA")  # fmt: skip


def parse(body: bytes) -> NarInfoText:
    """Parse an uploaded narinfo (strict; see the module docstring). ValidationError names the line."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ValidationError("the narinfo is not UTF-8 text") from None
    fields: dict[str, str] = {}
    sigs: list[Signature] = []
    for i, line in enumerate(text.split("\n"), 1):
        if not line:
            continue
        key, sep, value = line.partition(": ")
        if not sep:
            if line.endswith(":"):  # `References:` of an empty list, trailing space trimmed
                key, value = line[:-1], ""
            else:
                raise ValidationError(f"narinfo line {i} is not 'Key: value': {line[:80]!r}")
        if key == "Sig":
            sigs.append(parse_signature(value))
        elif key in _SINGLE:
            if key in fields:
                raise ValidationError(f"narinfo line {i}: {key} given twice")
            fields[key] = value
        # other keys: ignored, as Nix does
    for required in ("StorePath", "NarHash", "NarSize"):
        if required not in fields:
            raise ValidationError(f"the narinfo has no {required}")
    sp_text = fields["StorePath"]
    if not sp_text.startswith(STORE_DIR + "/"):
        raise ValidationError(f"StorePath {sp_text[:120]!r} is not in {STORE_DIR}")
    try:
        store_path = StorePath.parse_basename(sp_text[len(STORE_DIR) + 1 :])
    except ValidationError as e:
        raise ValidationError(f"StorePath: {e}") from None
    size_text = fields["NarSize"]
    if not size_text.isdigit() or len(size_text) > 20:
        raise ValidationError(f"NarSize {size_text[:40]!r} is not a number")
    nar_size = int(size_text)
    if not 0 < nar_size <= MAX_U64:
        raise ValidationError(f"NarSize {nar_size} is out of range (1 to 2^64 - 1: nar_size is uint64)")
    refs = sorted({_basename(r, "References") for r in fields.get("References", "").split()})
    deriver = fields.get("Deriver")
    if deriver == "unknown-deriver" or deriver == "":
        deriver = None
    elif deriver is not None:
        deriver = _basename(deriver, "Deriver")
    ca = fields.get("CA") or None
    if ca is not None and not _CA.match(ca):
        raise ValidationError(f"CA {ca[:80]!r} is not a content address (text:… or fixed:…)")
    return NarInfoText(
        store_path=store_path,
        nar_sha256=parse_hash(fields["NarHash"]),
        nar_size=nar_size,
        references=tuple(refs),
        deriver=deriver,
        signatures=tuple(dict.fromkeys(sigs)),
        ca=ca,
        url=fields.get("URL"),
    )


def cache_info(priority: int) -> str:
    return f"StoreDir: {STORE_DIR}\nWantMassQuery: 1\nPriority: {priority}\n"
