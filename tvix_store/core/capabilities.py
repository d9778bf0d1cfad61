"""What a backend declares about itself, so behaviour depends on declarations, not on names.

Every service (`BlobService`, `DirectoryService`, `PathInfoService`) and every object store
carries a `Capabilities` value; code that must behave differently for a remote, a listing-
less or a non-verifying backend asks it, never the URL or the Python module of the backend.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Capabilities:
    """Declared properties of a backend (defaults: a local, listable, verifying store)."""

    #: calls cross a network: worth batching, prefetching and keeping in flight; kernel
    #: read-ahead over it becomes wire bytes
    is_remote: bool = False
    #: `iter_digests`/`iter_all` enumerate everything the backend holds, cheaply
    can_list: bool = True
    #: bytes (and Directories, PathInfos) handed out were verified against their digest by
    #: this backend, so a caller need not hash them again
    verifies_reads: bool = True
    #: takes chunks and chunk lists fetched elsewhere (`put_chunk`, `put_chunk_list`): can be
    #: the near side of a cache
    accepts_chunks: bool = False


LOCAL = Capabilities()
REMOTE = Capabilities(is_remote=True, can_list=False)
