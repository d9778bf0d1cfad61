"""`Store` (the three services together) and `open_store(url)`, which builds any backend.

URLs (CLI.md): `local:///abs/path`, `memory://`, `grpc+http://HOST:PORT`,
`grpc+unix:///abs/path.sock`; none → the default local store directory. A remote
store may be put behind a persistent cache (`cache_dir`). This module only wires;
the backends live in the service packages.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from tvix_store.blobservice import BlobService
from tvix_store.directoryservice import DirectoryService
from tvix_store.errors import ValidationError
from tvix_store.pathinfoservice import PathInfoService


@dataclass
class Store:
    """One store: its blob, directory and path info services."""

    blobs: BlobService
    directories: DirectoryService
    pathinfos: PathInfoService
    url: str = ""
    #: Status counters (chunks/bytes fetched, cache hits...) of backends that keep them;
    #: the mount shows them as `user.tvix.*` xattrs on its root and logs them on SIGUSR1.
    counters: Callable[[], dict[str, int]] | None = None

    def close(self) -> None:
        for svc in (self.pathinfos, self.directories, self.blobs):
            svc.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def default_store_dir() -> Path:
    """`$TVIX_STORE_DIR`, else `$XDG_DATA_HOME/tvix-store`, else `~/.local/share/tvix-store`."""
    if d := os.environ.get("TVIX_STORE_DIR"):
        return Path(d)
    if x := os.environ.get("XDG_DATA_HOME"):
        return Path(x) / "tvix-store"
    return Path.home() / ".local" / "share" / "tvix-store"


def memory_store() -> Store:
    from tvix_store.blobservice.memory import MemoryBlobService
    from tvix_store.directoryservice.memory import MemoryDirectoryService
    from tvix_store.pathinfoservice.memory import MemoryPathInfoService

    blobs = MemoryBlobService()
    dirs = MemoryDirectoryService()
    return Store(blobs, dirs, MemoryPathInfoService(blobs, dirs), "memory://")


def open_store(
    url: str | None = None,
    *,
    cache_dir: str | Path | None = None,
    cache_size: int | None = None,
    timeout: float = 10.0,
) -> Store:
    """Build the store a URL names (see module docstring). Raises ValidationError for a bad URL."""
    if not url:
        url = f"local://{default_store_dir().absolute()}"
    u = urlparse(url)
    if cache_dir is not None and not u.scheme.startswith("grpc+"):
        raise ValidationError(f"--cache-dir only applies to a grpc+… store, not {url!r}")
    if u.scheme == "memory":
        return memory_store()
    if u.scheme == "local":
        if u.netloc or not u.path.startswith("/"):
            raise ValidationError(f"invalid store URL {url!r}: expected local:///absolute/path")
        from tvix_store.local import open_local_store

        return open_local_store(Path(u.path), url)
    if u.scheme in ("grpc+http", "grpc+unix"):
        from tvix_store.grpc.client import open_grpc_store

        if u.scheme == "grpc+http":
            try:
                port = u.port
            except ValueError:
                port = None
            if not u.hostname or not port or u.path not in ("", "/"):
                raise ValidationError(f"invalid store URL {url!r}: expected grpc+http://HOST:PORT")
            target = f"{u.hostname}:{port}" if ":" not in u.hostname else f"[{u.hostname}]:{port}"
        else:
            if u.netloc or not u.path.startswith("/"):
                raise ValidationError(f"invalid store URL {url!r}: expected grpc+unix:///absolute/path.sock")
            target = f"unix:{u.path}"
        store = open_grpc_store(target, url, timeout=timeout)
        if cache_dir is not None:
            from tvix_store.cached import open_cached_store

            store = open_cached_store(store, Path(cache_dir), cache_size, timeout=timeout)
        return store
    raise ValidationError(
        f"unsupported store URL {url!r}: expected local:///path, memory://, grpc+http://HOST:PORT or grpc+unix:///path"
    )
