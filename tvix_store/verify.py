"""`verify_objects(objects)`: an fsck of a store's object layer — every object re-hashed and
parsed, every reference checked.

Checks: chunks hash to their names and are not empty; chunk lists parse and list present
chunks of the listed sizes (with `full`, the chunks also hash to the blob); Directories hash
to their names, parse, and reference present Directories; PathInfos parse, validate and are
filed under their own hash. One line per problem, naming the object. Temp files are not
objects and are ignored. Read-only: it repairs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tvix_store.core import nixbase32
from tvix_store.core.chunks import decode_chunk_list
from tvix_store.core.digest import B3Digest, check_digest, new_hasher
from tvix_store.core.errors import IntegrityError, ValidationError
from tvix_store.objects import ObjectStore
from tvix_store.protocol import wire


@dataclass
class VerifyReport:
    """What `verify_objects` checked and the problems it found (one line each)."""

    chunks: int = 0
    blobs: int = 0
    directories: int = 0
    pathinfos: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _name(key: str) -> str:
    return key.split("/", 1)[1]


def verify_objects(objects: ObjectStore, full: bool = True, complete: bool = True) -> VerifyReport:
    """Check every visible object (see the module docstring). `complete` False: a cache, which
    holds parts of closures, so a missing chunk or child Directory is not a problem (a present
    one must still be right)."""
    rep = VerifyReport()
    chunk_sizes: dict[bytes, int] = {}
    for o in objects.list("chunks/"):
        rep.chunks += 1
        name = _name(o.key)
        try:
            d = B3Digest.from_hex(name)
            data = objects.get(o.key)
            if data is None:
                continue
            check_digest("chunk", d, data)
            if not data:
                rep.problems.append(f"chunk {name} is empty")
            chunk_sizes[d] = len(data)
        except (IntegrityError, ValidationError) as e:
            rep.problems.append(str(e))
    for o in objects.list("blobs/"):
        rep.blobs += 1
        name = _name(o.key)
        try:
            d = B3Digest.from_hex(name)
            raw = objects.get(o.key)
            if raw is None:
                continue
            entries = decode_chunk_list(raw, name)
            h = new_hasher(large=True)
            for c in entries:
                have = chunk_sizes.get(c.digest)
                if have is None:
                    if complete:
                        rep.problems.append(f"blob {name}: chunk {c.digest.hex()} is missing")
                    break
                if have != c.size:
                    rep.problems.append(f"blob {name}: chunk {c.digest.hex()} has {have} bytes, its list says {c.size}")
                    break
                if full:
                    h.update(objects.get(f"chunks/{c.digest.hex()}") or b"")
            else:
                if full and h.digest() != d:
                    rep.problems.append(f"blob {name}: its chunks hash to {h.digest().hex()}")
        except (IntegrityError, ValidationError) as e:
            rep.problems.append(str(e))
    dir_names = {_name(o.key) for o in objects.list("directories/")}
    for name in dir_names:
        rep.directories += 1
        try:
            d = B3Digest.from_hex(name)
            raw = objects.get(f"directories/{name}")
            if raw is None:
                continue
            check_digest("directory", d, raw)
            directory = wire.directory_from_bytes(raw)
            for child in directory.directories:
                if complete and child.digest.hex() not in dir_names:
                    rep.problems.append(f"directory {name}: child {child.digest.hex()} is missing")
        except (IntegrityError, ValidationError) as e:
            rep.problems.append(f"directory {name}: {e}")
    for o in objects.list("pathinfos/"):
        rep.pathinfos += 1
        name = _name(o.key)
        try:
            raw = objects.get(o.key)
            if raw is None:
                continue
            info = wire.pathinfo_from_bytes(raw)
            if nixbase32.encode(info.store_path.digest) != name:
                rep.problems.append(f"path info {name} is filed under the wrong name ({info.store_path})")
        except ValidationError as e:
            rep.problems.append(f"path info {name}: {e}")
    return rep
