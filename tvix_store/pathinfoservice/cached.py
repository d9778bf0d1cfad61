"""`CachedPathInfoService(near, far)`: PathInfos fetched from `far` once are kept in `near`.

Policy (docs/cache.md):
- Local first: `get` answers from `near` when it can (`near` validates what it reads; an entry
  that fails is discarded and fetched again).
- Only verified data enters `near`: a PathInfo from `far` must validate and its root node's
  name must be the store path whose hash was asked for; otherwise IntegrityError, logged,
  nothing kept. (Its NAR hash and signatures are not checked here.)
- No negative cache; `far` is never written by reads; `put` writes through and keeps what
  `far` returned. `calculate_nar` always asks `far`.

Not here: chunk data, Directories, the bound (the object layer).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from tvix_store.blobservice.cached import far_call
from tvix_store.core.capabilities import Capabilities
from tvix_store.core.castore import Node
from tvix_store.core.errors import IntegrityError, StoreError, ValidationError
from tvix_store.core.pathinfo import PathInfo
from tvix_store.pathinfoservice import PathInfoService, check_output_hash
from tvix_store.util.counters import Counters

log = logging.getLogger("tvix_store.cache")


class CachedPathInfoService(PathInfoService):
    def __init__(self, near: PathInfoService, far: PathInfoService, *, counters: Counters | None = None) -> None:
        self.near = near
        self.far = far
        self.capabilities = Capabilities(is_remote=far.capabilities.is_remote, can_list=far.capabilities.can_list)
        self.counters = counters if counters is not None else Counters()
        self.counters.declare(("meta_hits", "meta_fetched", "cache_corrupt", "verify_failures"))

    def _cached(self, output_hash: bytes) -> PathInfo | None:
        try:
            info = self.near.get(output_hash)
        except IntegrityError as e:
            log.error("cached path info %s is corrupt, discarded: %s", output_hash.hex(), e)
            self.counters.add("cache_corrupt")
            self.near.delete(output_hash)
            return None
        if info is not None:
            self.counters.add("meta_hits")
        return info

    def _keep(self, info: PathInfo) -> None:
        try:
            self.near.keep(info)
        except (StoreError, OSError) as e:
            log.warning("cannot cache path info %s: %s", info.store_path, e)

    def get(self, output_hash: bytes) -> PathInfo | None:
        check_output_hash(output_hash)
        info = self._cached(output_hash)
        if info is not None:
            return info
        info = far_call(self.counters, "path info", self.far.get, output_hash)
        if info is None:
            return None
        try:
            sp = info.validate()
            if sp.digest != output_hash:
                raise ValidationError(f"its root node is {sp.basename}")
        except ValidationError as e:
            self.counters.add("verify_failures")
            log.error("remote sent a wrong path info for %s: %s", output_hash.hex(), e)
            raise IntegrityError(f"remote sent a wrong path info for {output_hash.hex()}: {e}") from None
        self.counters.add("meta_fetched")
        self._keep(info)
        return info

    def put(self, info: PathInfo) -> PathInfo:
        info.validate()
        stored = far_call(self.counters, "path info", self.far.put, info)
        try:
            if stored.validate().digest == info.store_path.digest:
                self._keep(stored)
        except ValidationError as e:
            log.warning("remote returned an invalid path info for a put (not cached): %s", e)
        return stored

    def calculate_nar(self, node: Node) -> tuple[int, bytes]:
        return far_call(self.counters, "NAR", self.far.calculate_nar, node)

    def available(self) -> bool:
        return self.far.available()

    def iter_all(self) -> Iterator[PathInfo]:
        """What `near` holds, then whatever else `far` lists (nothing while it is down)."""
        out = list(self.near.iter_all())
        seen = {i.store_path.digest for i in out}
        if self.far.available():
            try:
                out.extend(i for i in self.far.iter_all() if i.node is not None and i.store_path.digest not in seen)
            except StoreError as e:
                log.debug("remote listing of path infos failed: %s", e)
        return iter(out)

    def close(self) -> None:
        self.near.close()
        self.far.close()
