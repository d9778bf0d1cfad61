"""`NarIndex`: what nar-bridge must remember between requests, kept in the store itself.

Two kinds of records:
- an uploaded NAR's root node and size, by the NAR's sha256 (what a later narinfo PUT names
  as NarHash) and, for a compressed upload, also by the sha256 of the file as sent (what Nix
  names the file and asks for with `HEAD nar/<hash>.nar.xz` before uploading);
- a store path's `Deriver` and `CA`, by store path hash (tvix.store.v1's PathInfo has no field
  for either, and a narinfo served should say what the uploaded one said).

Where they are kept (`open_index`), so that they survive a restart and every bridge over the
same store sees the same records (several bridges behind a load balancer):
- a store whose PathInfos live in an object layer (`local://`): objects of the kind
  `narbridge/` in that object layer (`nar-<nixbase32>`, `path-<nixbase32>`), next to the
  PathInfos they belong to; every process opening the directory shares them;
- a remote store (`grpc+…`), which has no object layer we can reach: each record is a small
  blob, named by a PathInfo of a reserved store path (`<hash>-nar-bridge-record`, the hash
  derived from the record's key), so any number of bridges in front of one daemon share them
  (they show up in that store's path listing);
- `memory://`: an in-memory object store, as short-lived as the store.

Records are small JSON texts. They are hints that are re-checked where it matters: a NAR's
root node is only used through `Admission.put_pathinfo`, which refuses a PathInfo whose closure
is not (or no longer, after a GC) complete or whose NarHash/NarSize do not match the node. A
record that cannot be read is treated as absent (and logged). GC does not read them: the data
of an upload whose narinfo never came is collected after the grace period, its record then
answers "upload again" (400 on the narinfo PUT, 404 on HEAD).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass

from tvix_store.core import nixbase32
from tvix_store.core.castore import FileNode, Node
from tvix_store.core.errors import ConflictError, StoreError, ValidationError
from tvix_store.core.pathinfo import HASH_LEN, PathInfo, StorePath
from tvix_store.objects import ObjectStore
from tvix_store.objects.memory import MemoryObjectStore
from tvix_store.protocol import wire
from tvix_store.store import Store

log = logging.getLogger(__name__)

KIND = "narbridge"
#: the name of the reserved store paths that hold records in a remote store
RECORD_PATH_NAME = "nar-bridge-record"
#: a record is a few hundred bytes; anything much larger is not one
MAX_RECORD = 64 << 10


@dataclass(frozen=True, slots=True)
class NarRecord:
    """An ingested NAR: its root node (unnamed), size and sha256."""

    node: Node
    nar_size: int
    nar_sha256: bytes


@dataclass(frozen=True, slots=True)
class PathExtra:
    """What a narinfo said that a PathInfo cannot hold."""

    deriver: str | None = None
    ca: str | None = None


class _Table(ABC):
    """Small named byte records."""

    where: str

    @abstractmethod
    def get(self, name: str) -> bytes | None: ...

    @abstractmethod
    def put(self, name: str, data: bytes) -> None: ...

    @abstractmethod
    def delete(self, name: str) -> None: ...


class _ObjectTable(_Table):
    def __init__(self, objects: ObjectStore, where: str) -> None:
        self.objects = objects
        self.where = where

    def get(self, name: str) -> bytes | None:
        return self.objects.get(f"{KIND}/{name}")

    def put(self, name: str, data: bytes) -> None:
        self.objects.put(f"{KIND}/{name}", data, replace=True)

    def delete(self, name: str) -> None:
        self.objects.delete(f"{KIND}/{name}")


class _PathInfoTable(_Table):
    """Records as blobs, each named by the PathInfo of a reserved store path (see the module docstring)."""

    where = "the remote store (as store paths named " + RECORD_PATH_NAME + ")"

    def __init__(self, store: Store) -> None:
        self.store = store

    @staticmethod
    def _path(name: str) -> StorePath:
        digest = hashlib.sha256(b"tvix-store nar-bridge record\0" + name.encode()).digest()[:HASH_LEN]
        return StorePath(digest, RECORD_PATH_NAME)

    def get(self, name: str) -> bytes | None:
        info = self.store.pathinfos.get(self._path(name).digest)
        if info is None or not isinstance(info.node, FileNode) or info.node.size > MAX_RECORD:
            return None
        chunks = self.store.blobs.chunks(info.node.digest)
        if chunks is None:
            return None
        parts = []
        for c in chunks:
            data = self.store.blobs.read_chunk(c.digest)
            if data is None:
                return None
            parts.append(data)
        return b"".join(parts)

    def put(self, name: str, data: bytes) -> None:
        sp = self._path(name)
        digest = self.store.blobs.put(data)
        info = PathInfo(FileNode(sp.basename.encode(), digest, len(data)))
        try:
            self.store.pathinfos.put(info)
        except ConflictError:  # another record under this name: records are never replaced there
            log.warning("nar-bridge record %s exists with other content in %s: kept", name, self.store.url)

    def delete(self, name: str) -> None:
        try:
            self.store.pathinfos.delete(self._path(name).digest)
        except StoreError as e:
            log.debug("cannot delete nar-bridge record %s: %s", name, e)


def _node_text(node: Node) -> str:
    return base64.urlsafe_b64encode(wire.node_to_bytes(node.renamed(b""))).decode()


class NarIndex:
    """The records of the module docstring over one table. Thread-safe (as its table)."""

    def __init__(self, table: _Table) -> None:
        self._table = table

    @property
    def where(self) -> str:
        return self._table.where

    def _load(self, name: str) -> dict[str, object] | None:
        try:
            raw = self._table.get(name)
        except StoreError as e:
            log.warning("nar-bridge record %s cannot be read: %s", name, e)
            return None
        if raw is None:
            return None
        try:
            value = json.loads(raw)
            if not isinstance(value, dict):
                raise ValueError("not an object")
            return value
        except ValueError as e:
            log.warning("nar-bridge record %s is damaged (%s): ignored", name, e)
            return None

    # -- NARs

    def nar(self, sha256: bytes) -> NarRecord | None:
        """The NAR record filed under this sha256 (a NAR's, or an uploaded file's), or None."""
        name = "nar-" + nixbase32.encode(sha256)
        value = self._load(name)
        if value is None:
            return None
        try:
            node = wire.node_from_bytes(base64.urlsafe_b64decode(str(value["node"])))
            if node.name:
                raise ValidationError("a named node")
            node.renamed(b"x").validate()
            size = value["nar_size"]
            if not isinstance(size, int) or size <= 0:
                raise ValidationError(f"nar_size {size!r}")
            return NarRecord(node, size, nixbase32.decode(str(value["nar_sha256"]), 32))
        except (KeyError, ValueError) as e:
            log.warning("nar-bridge record %s is damaged (%s): ignored", name, e)
            return None

    def put_nar(self, rec: NarRecord, *aliases: bytes) -> None:
        """File `rec` under its NAR sha256 and under each alias (an uploaded file's sha256)."""
        data = json.dumps(
            {"node": _node_text(rec.node), "nar_size": rec.nar_size, "nar_sha256": nixbase32.encode(rec.nar_sha256)},
            sort_keys=True,
        ).encode()
        for key in dict.fromkeys((rec.nar_sha256, *aliases)):
            self._table.put("nar-" + nixbase32.encode(key), data)

    def drop_nar(self, *keys: bytes) -> None:
        for key in keys:
            self._table.delete("nar-" + nixbase32.encode(key))

    # -- store paths

    def extra(self, path_hash: bytes) -> PathExtra | None:
        value = self._load("path-" + nixbase32.encode(path_hash))
        if value is None:
            return None
        deriver, ca = value.get("deriver"), value.get("ca")
        return PathExtra(
            deriver if isinstance(deriver, str) and deriver else None, ca if isinstance(ca, str) and ca else None
        )

    def drop_extra(self, path_hash: bytes) -> None:
        self._table.delete("path-" + nixbase32.encode(path_hash))

    def put_extra(self, path_hash: bytes, extra: PathExtra) -> None:
        data = json.dumps({"deriver": extra.deriver, "ca": extra.ca}, sort_keys=True).encode()
        self._table.put("path-" + nixbase32.encode(path_hash), data)


def open_index(store: Store) -> NarIndex:
    """The index of `store`, kept where the module docstring says."""
    objects = getattr(store.pathinfos, "objects", None)
    if isinstance(objects, ObjectStore) and objects.writable:
        return NarIndex(_ObjectTable(objects, f"the object layer of {store.url}"))
    if store.pathinfos.capabilities.is_remote:
        return NarIndex(_PathInfoTable(store))
    return NarIndex(_ObjectTable(MemoryObjectStore(), "memory (as the store)"))
