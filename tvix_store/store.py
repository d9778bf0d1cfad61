"""`Store`: the three services of one store together, with their shared counters.

A Store is what `tvix_store.compose.open_store` returns and what the servicers, the importer,
NAR rendering and the mount take. It only holds and closes; it decides nothing (the services
declare what they are: `capabilities`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tvix_store.blobservice import BlobService
from tvix_store.directoryservice import DirectoryService
from tvix_store.pathinfoservice import PathInfoService
from tvix_store.util.counters import Counters


@dataclass
class Store:
    """One store: its blob, directory and path info services."""

    blobs: BlobService
    directories: DirectoryService
    pathinfos: PathInfoService
    #: how the store was named (for messages and logs)
    url: str = ""
    #: status counters of every part that keeps any (cache, remote, bounded objects); the
    #: mount shows them as `user.tvix.stats.*` xattrs and logs them on SIGUSR1
    counters: Counters = field(default_factory=Counters)

    @property
    def is_remote(self) -> bool:
        """Whether any of the services reaches over a network."""
        return any(s.capabilities.is_remote for s in (self.blobs, self.directories, self.pathinfos))

    def close(self) -> None:
        for svc in (self.pathinfos, self.directories, self.blobs):
            svc.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
