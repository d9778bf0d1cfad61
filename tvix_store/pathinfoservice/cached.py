"""`CachedPathInfoService(near, far)`: PathInfos fetched once are kept in the cache directory.

Policy:
- Local first: `get` answers from the cache directory when it can (the file is decoded and
  validated again; a corrupt one is discarded and fetched again).
- Only verified data enters the cache: a PathInfo from the remote must validate and its root
  node's name must be the store path whose hash was asked for; otherwise IntegrityError,
  logged, nothing cached. (Its NAR hash and signatures are not checked here.)
- No negative cache; the remote is never written by reads; `put` writes through and caches
  what the remote returned. `calculate_nar` always asks the remote.
- Every remote call goes through the shared `CircuitBreaker`.

Not here: chunk data, Directories, the layout (`tvix_store.cachedir`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TypeVar

from google.protobuf.message import DecodeError

from tvix_store.breaker import CircuitBreaker, guarded_call
from tvix_store.cachedir import CacheDir, CacheStats
from tvix_store.castore import Node
from tvix_store.errors import IntegrityError, StoreError, ValidationError
from tvix_store.pathinfo import PathInfo
from tvix_store.pathinfoservice import PathInfoService, check_output_hash
from tvix_store.proto import pathinfo_pb2
from tvix_store.wire import pathinfo_from_proto, pathinfo_to_proto

log = logging.getLogger("tvix_store.cache")

T = TypeVar("T")


class CachedPathInfoService(PathInfoService):
    def __init__(
        self, near: CacheDir, far: PathInfoService, *, breaker: CircuitBreaker, stats: CacheStats | None = None
    ) -> None:
        self._near = near
        self._far = far
        self._breaker = breaker
        self.stats = stats or CacheStats()

    def _remote(self, fn: Callable[..., T], *args: object) -> T:
        """Call the remote through the breaker (see `tvix_store.breaker.guarded_call`)."""
        return guarded_call(self._breaker, self.stats, "path info", fn, *args)

    def _cached(self, output_hash: bytes) -> PathInfo | None:
        name = output_hash.hex()
        raw = self._near.get("pathinfos", name)
        if raw is None:
            return None
        try:
            info = pathinfo_from_proto(pathinfo_pb2.PathInfo.FromString(raw))
            if info.store_path.digest != output_hash:
                raise ValidationError(f"root node is {info.store_path.basename}")
        except (DecodeError, ValidationError) as e:
            log.error("cached path info %s is corrupt, discarded: %s", name, e)
            self.stats.add("cache_corrupt")
            self._near.discard("pathinfos", name)
            return None
        self.stats.add("meta_hits")
        return info

    def _insert(self, info: PathInfo) -> None:
        self._near.put("pathinfos", info.store_path.digest.hex(), pathinfo_to_proto(info).SerializeToString())

    def get(self, output_hash: bytes) -> PathInfo | None:
        check_output_hash(output_hash)
        info = self._cached(output_hash)
        if info is not None:
            return info
        info = self._remote(self._far.get, output_hash)
        if info is None:
            return None
        try:
            sp = info.validate()
            if sp.digest != output_hash:
                raise ValidationError(f"its root node is {sp.basename}")
        except ValidationError as e:
            self.stats.add("verify_failures")
            log.error("remote sent a wrong path info for %s: %s", output_hash.hex(), e)
            raise IntegrityError(f"remote sent a wrong path info for {output_hash.hex()}: {e}") from None
        self.stats.add("meta_fetched")
        self._insert(info)
        return info

    def put(self, info: PathInfo) -> PathInfo:
        info.validate()
        stored = self._remote(self._far.put, info)
        try:
            if stored.validate().digest == info.store_path.digest:
                self._insert(stored)
        except ValidationError as e:
            log.warning("remote returned an invalid path info for a put (not cached): %s", e)
        return stored

    def calculate_nar(self, node: Node) -> tuple[int, bytes]:
        return self._remote(self._far.calculate_nar, node)

    def iter_all(self) -> Iterator[PathInfo]:
        """The cached PathInfos, then whatever else the remote lists (nothing if it is down)."""
        out: list[PathInfo] = []
        for name in self._near.names("pathinfos"):
            try:
                h = bytes.fromhex(name)
                info = self._cached(h) if len(h) == 20 else None
            except ValueError:
                continue
            if info is not None:
                out.append(info)
        seen = {i.store_path.digest for i in out}
        if not self._breaker.is_down:
            try:
                out.extend(i for i in self._far.iter_all() if i.node is not None and i.store_path.digest not in seen)
            except StoreError as e:
                log.debug("remote listing of path infos failed: %s", e)
        return iter(out)
