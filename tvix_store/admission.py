"""Admission of writes from clients the store does not trust (the gRPC servicers use it).

The services validate each message by itself (names, order, digests, sizes of child
Directories). This module adds the checks that need the rest of the store, so that no client
can leave it inconsistent or change what a store path means:

- `check_files(d)`: every FileNode of a Directory refers to a blob the store has
  (PreconditionError otherwise: blobs are uploaded before the Directories that name them),
  with exactly the size the node declares (ValidationError otherwise).
- `put_pathinfo(info)`: a PathInfo is stored only when its node's closure is complete in the
  store (every Directory and blob present; PreconditionError naming the first missing one)
  and, when it carries a narinfo, its NarSize/NarHash equal those of the NAR the store renders
  from the node (ValidationError otherwise). The NAR is computed by the store, once per root
  (an LRU by node, emptied whenever a gc has swept since: `epoch`, as the closure it vouches
  for may be gone). A store path that exists already is never replaced: a PathInfo for it that
  differs in anything but signatures is refused (ConflictError → ALREADY_EXISTS); an identical
  one is accepted and its new signatures are added to the stored ones. Puts of one store
  path are serialised within this process.

Not here: validation of single messages (`tvix_store.core`), authentication (none: who can
reach the port can write, see docs/security.md), limits on streams (`tvix_store.serve.limits`).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace

from tvix_store.core.castore import Directory, DirectoryNode, FileNode, Node, SymlinkNode
from tvix_store.core.digest import B3Digest
from tvix_store.core.errors import (
    ConflictError,
    IntegrityError,
    NotFoundError,
    PreconditionError,
    ValidationError,
)
from tvix_store.core.pathinfo import PathInfo
from tvix_store.store import Store

log = logging.getLogger(__name__)

#: NAR (size, sha256) results kept, by node
NAR_CACHE_ENTRIES = 65536
#: stripes of the per-store-path lock
_STRIPES = 64

NarKey = tuple[str, bytes, bool]


def _nar_key(node: Node) -> NarKey | None:
    """What a node's NAR depends on (not its name); None for a symlink (cheap to render)."""
    if isinstance(node, DirectoryNode):
        return ("d", bytes(node.digest), False)
    if isinstance(node, FileNode):
        return ("f", bytes(node.digest), node.executable)
    return None


def _show(name: bytes) -> str:
    return name.decode("utf-8", "backslashreplace")


class Admission:
    """The cross-object checks of writes into `store` (see the module docstring). Thread-safe."""

    def __init__(
        self, store: Store, nar_cache_entries: int = NAR_CACHE_ENTRIES, epoch: Callable[[], object] | None = None
    ) -> None:
        self.store = store
        self._nars: OrderedDict[NarKey, tuple[int, bytes]] = OrderedDict()
        self._nar_cap = nar_cache_entries
        #: which gc sweeps have run (`tvix_store.gc.sweep_epoch`): a cached NAR says the closure
        #: was complete, which a sweep since may have changed, so the cache lives one epoch
        self._epoch_of = epoch
        self._epoch: object = None
        self._nar_lock = threading.Lock()
        self._path_locks = [threading.Lock() for _ in range(_STRIPES)]

    # -- Directories -----------------------------------------------------------------------

    def blob_size(self, digest: B3Digest) -> int | None:
        """The size of a blob the store has, or None."""
        chunks = self.store.blobs.chunks(digest)
        return None if chunks is None else sum(c.size for c in chunks)

    def check_files(self, d: Directory, known: dict[B3Digest, int] | None = None) -> None:
        """Every file of `d` names a blob the store has, of the declared size. `known` caches
        sizes already looked up (by the caller, across the Directories of one stream)."""
        for f in d.files:
            size = known.get(f.digest) if known is not None else None
            if size is None:
                size = self.blob_size(f.digest)
                if size is None:
                    raise PreconditionError(
                        f"directory {d.digest.hex()}: file {_show(f.name)!r} refers to blob {f.digest.hex()}, "
                        "which the store does not have (upload blobs before the Directories naming them)"
                    )
                if known is not None:
                    known[f.digest] = size
            if size != f.size:
                raise ValidationError(
                    f"directory {d.digest.hex()}: file {_show(f.name)!r} has size {f.size}, "
                    f"but blob {f.digest.hex()} has {size} bytes"
                )

    # -- PathInfos -------------------------------------------------------------------------

    def nar_of(self, node: Node) -> tuple[int, bytes]:
        """(NAR size, NAR sha256) of `node` as this store renders it; PreconditionError if part
        of its closure is missing, ValidationError if a file's size disagrees with its blob."""
        key = _nar_key(node)
        if key is not None:
            with self._nar_lock:
                self._same_epoch()
                hit = self._nars.get(key)
                if hit is not None:
                    self._nars.move_to_end(key)
        else:
            hit = None
        if hit is not None and isinstance(node, FileNode):
            # the cached NAR is of the blob: the node must still declare its real size
            self._check_file_root(node)
        if hit is not None:
            return hit
        if isinstance(node, FileNode):
            self._check_file_root(node)
        try:
            got = self.store.pathinfos.calculate_nar(node)
        except NotFoundError as e:
            raise PreconditionError(f"the closure of {self._describe(node)} is incomplete in the store: {e}") from None
        except IntegrityError as e:
            raise ValidationError(f"{self._describe(node)}: {e}") from None
        if key is not None:
            with self._nar_lock:
                self._nars[key] = got
                while len(self._nars) > self._nar_cap:
                    self._nars.popitem(last=False)
        return got

    def known_nar(self, node: Node, size: int, sha256: bytes) -> None:
        """Remember the NAR of `node` as computed by this process from the very bytes it put into
        the store (nar-bridge's upload, `importer.nar.read_nar`), so `put_pathinfo` need not
        render it again."""
        key = _nar_key(node)
        if key is not None:
            with self._nar_lock:
                self._same_epoch()
                self._nars[key] = (size, sha256)
                while len(self._nars) > self._nar_cap:
                    self._nars.popitem(last=False)

    def _same_epoch(self) -> None:
        """Forget every cached NAR when a gc has swept since (`_nar_lock` held)."""
        if self._epoch_of is not None:
            now = self._epoch_of()
            if now != self._epoch:
                self._nars.clear()
                self._epoch = now

    def _check_file_root(self, node: FileNode) -> None:
        size = self.blob_size(node.digest)
        if size is None:
            raise PreconditionError(f"blob {node.digest.hex()} of the root file is not in the store")
        if size != node.size:
            raise ValidationError(f"the root file node has size {node.size}, but blob {node.digest.hex()} has {size}")

    @staticmethod
    def _describe(node: Node) -> str:
        if isinstance(node, DirectoryNode):
            return f"directory {node.digest.hex()}"
        if isinstance(node, FileNode):
            return f"file blob {node.digest.hex()}"
        assert isinstance(node, SymlinkNode)
        return "symlink"

    def put_pathinfo(self, info: PathInfo) -> PathInfo:
        """Check and store a PathInfo (see the module docstring); returns what is stored."""
        sp = info.validate()
        assert info.node is not None  # validate() requires it
        with self._path_locks[sp.digest[0] % _STRIPES]:
            try:
                existing = self.store.pathinfos.get(sp.digest)
            except IntegrityError as e:
                log.warning("replacing damaged path info of %s: %s", sp, e)
                existing = None
            if existing is not None:
                return self._reput(existing, info, str(sp))
            size, sha256 = self.nar_of(info.node)
            if info.narinfo is not None:
                if info.narinfo.nar_size != size:
                    raise ValidationError(
                        f"{sp}: NarSize {info.narinfo.nar_size} does not match the NAR of its node ({size} bytes)"
                    )
                if info.narinfo.nar_sha256 != sha256:
                    raise ValidationError(
                        f"{sp}: NarHash sha256:{info.narinfo.nar_sha256.hex()} does not match the NAR "
                        f"of its node (sha256:{sha256.hex()})"
                    )
            return self.store.pathinfos.put(info)

    def _reput(self, existing: PathInfo, info: PathInfo, name: str) -> PathInfo:
        """A Put for a store path the store has: identical but for signatures, or refused."""
        if existing.narinfo is None or info.narinfo is None:
            same = existing == info
            merged = existing
        else:
            same = replace(existing.narinfo, signatures=()) == replace(info.narinfo, signatures=()) and replace(
                existing, narinfo=None
            ) == replace(info, narinfo=None)
            sigs = list(existing.narinfo.signatures)
            sigs += [s for s in info.narinfo.signatures if s not in sigs]
            merged = replace(existing, narinfo=replace(existing.narinfo, signatures=tuple(sigs)))
        if not same:
            raise ConflictError(
                f"{name} exists already with other content or metadata, and a store path is never replaced"
            )
        if merged != existing:
            return self.store.pathinfos.put(merged)
        return existing
