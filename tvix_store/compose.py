"""Store URLs → services: a registry of URL schemes, per-service overrides, and the cache.

`open_store(url, blob_url=…, directory_url=…, pathinfo_url=…, cache_dir=…)` builds a `Store`:
each service comes from its own URL when given (as tvix-store's `--blob-service-addr` etc.;
the CLI's `--blob-store`, `--directory-store`, `--pathinfo-store`), else from `url`, else from
the default embedded store. A URL used by several services is opened once (one store
directory, one gRPC channel). With `cache_dir`, every remote service is put behind its cache
combinator, all over one bounded object store in that directory.

Schemes (`SCHEMES`; a backend registers with `register`):

    memory://                    in-process, lost at exit
    local:///abs/path[?fsync=1]  the embedded store (`objects.packs`)
    grpc+http://HOST:PORT        a remote tvix-store or snix, any protocol generation (the newest
                                 it serves, detected per channel; `?protocol=g1|g2|g3` forces one)
    grpc+https://HOST:PORT[?ca=FILE][&cert=FILE&key=FILE][&token_file=FILE]
                                 the same over TLS (system roots unless `ca`; `cert`/`key`: a
                                 client certificate for mutual TLS)
    grpc+unix:///abs/path.sock   the same over a unix socket
    objectstore+s3://BUCKET[/PREFIX][?aws_endpoint_url=…&aws_allow_http=true]
    objectstore+file:///abs/path, objectstore+memory:///, objectstore+http(s)://HOST/PREFIX
                                 blobs and Directories in the tvix/snix bucket layout
                                 (`objects.buckets`; http(s) read-only); no path infos
    postgresql://USER@/DB?host=/socket/dir&port=5432, postgresql://USER:PW@HOST:PORT/DB
                                 Directories and path infos in PostgreSQL (`remote.postgres`);
                                 no blobs

A gRPC store sends a bearer token when one is given: `token_file=FILE` (its first line), else
`$TVIX_STORE_TOKEN`. Over plain `grpc+http` a token is sent only to a loopback address (never
in clear over a network). URLs are shown everywhere (logs, errors, `Store.url`) by `public_url`,
without the query options that name secrets.

This module only wires; the backends live in the service packages and the object layer.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlencode, urlparse, urlunparse

from tvix_store.blobservice import BlobService
from tvix_store.core.errors import ValidationError
from tvix_store.directoryservice import DirectoryService
from tvix_store.pathinfoservice import PathInfoService
from tvix_store.store import Store
from tvix_store.util.counters import Counters
from tvix_store.util.urls import redact

if TYPE_CHECKING:
    from tvix_store.remote.channel import ChannelSecurity

log = logging.getLogger("tvix_store")

#: `--cache-size` when not given: of a cache directory, of the in-memory cache of a mount
DEFAULT_CACHE_SIZE = 10 << 30
DEFAULT_MEMORY_CACHE_SIZE = 256 << 20
DEFAULT_TIMEOUT = 10.0


@dataclass
class Options:
    """What every opener may use besides the URL."""

    timeout: float = DEFAULT_TIMEOUT
    counters: Counters | None = None
    #: long-lived clients (a mount, a cache): remotes fail fast while known to be down
    fail_fast: bool = False


@dataclass
class Backend:
    """One opened URL: factories of the services it provides (called at most once each)."""

    blobs: Callable[[], BlobService]
    directories: Callable[[], DirectoryService]
    #: takes the store's (possibly overridden) blob and directory services, for NAR rendering
    pathinfos: Callable[[BlobService, DirectoryService], PathInfoService]
    #: releases what the opener opened (for when no service was made after all)
    close: Callable[[], None] = lambda: None


Opener = Callable[[str, Options], Backend]
SCHEMES: dict[str, Opener] = {}
#: how each scheme is spelled in messages
USAGE: dict[str, str] = {}


def register(scheme: str, opener: Opener, usage: str) -> None:
    """Make `scheme://…` URLs open with `opener`."""
    SCHEMES[scheme] = opener
    USAGE[scheme] = usage


def default_store_dir() -> Path:
    """`$TVIX_STORE_DIR`, else `$XDG_DATA_HOME/tvix-store`, else `~/.local/share/tvix-store`."""
    if d := os.environ.get("TVIX_STORE_DIR"):
        return Path(d)
    if x := os.environ.get("XDG_DATA_HOME"):
        return Path(x) / "tvix-store"
    return Path.home() / ".local" / "share" / "tvix-store"


def default_url() -> str:
    return f"local://{default_store_dir().absolute()}"


def _unsupported(url: str) -> ValidationError:
    return ValidationError(f"unsupported store URL {redact(url)!r}: expected {', '.join(USAGE.values())}")


def open_backend(url: str, opts: Options) -> Backend:
    """Open one URL (ValidationError for a malformed or unknown one)."""
    scheme = urlparse(url).scheme
    opener = SCHEMES.get(scheme)
    if opener is None:
        raise _unsupported(url)
    return opener(url, opts)


def open_store(
    url: str | None = None,
    *,
    blob_url: str | None = None,
    directory_url: str | None = None,
    pathinfo_url: str | None = None,
    cache_dir: str | Path | None = None,
    cache_size: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    fail_fast: bool | None = None,
    memory_cache: bool = False,
) -> Store:
    """Build the store the URLs name (see the module docstring). Raises ValidationError for a
    bad URL or option, StoreError if a backend cannot be opened (nothing is left open then).

    `fail_fast` (default: with a cache) puts a circuit breaker in front of every remote, for
    long-lived clients (`tvix_store.remote.channel`). `memory_cache`: without `cache_dir`, put
    the remote services behind the same cache in memory (`cache_size`, default
    DEFAULT_MEMORY_CACHE_SIZE), so a mount fetches each object once and ahead of its readers."""
    base = url or default_url()
    urls = {"blobs": blob_url or base, "directories": directory_url or base, "pathinfos": pathinfo_url or base}
    counters = Counters()
    opts = Options(
        timeout=timeout, counters=counters, fail_fast=cache_dir is not None if fail_fast is None else fail_fast
    )
    opened: dict[str, Backend] = {}
    made: list[BlobService | DirectoryService | PathInfoService] = []
    try:
        for u in dict.fromkeys(urls.values()):  # validate every URL before opening anything
            if urlparse(u).scheme not in SCHEMES:
                raise _unsupported(u)
        for u in dict.fromkeys(urls.values()):
            opened[u] = open_backend(u, opts)
        blobs = opened[urls["blobs"]].blobs()
        made.append(blobs)
        dirs = opened[urls["directories"]].directories()
        made.append(dirs)
        infos = opened[urls["pathinfos"]].pathinfos(blobs, dirs)
        made.append(infos)
        store = Store(blobs, dirs, infos, url=_describe(urls), counters=counters)
        if cache_dir is not None:
            store = with_cache(store, Path(cache_dir), cache_size, timeout=timeout)
        elif memory_cache and store.is_remote:
            store = with_cache(store, None, cache_size, timeout=timeout)
        return store
    except BaseException:
        for svc in reversed(made):
            svc.close()
        for backend in opened.values():
            backend.close()
        raise


#: query options of a store URL that name secrets: never shown
SECRET_OPTIONS = frozenset({"token_file", "token", "key"})


def public_url(url: str) -> str:
    """`url` as it may be logged: without the query options that name secrets."""
    u = urlparse(url)
    if not u.query:
        return url
    kept = [(k, v) for k, v in parse_qsl(u.query, keep_blank_values=True) if k not in SECRET_OPTIONS]
    return urlunparse(u._replace(query=urlencode(kept, safe="/")))


def _describe(urls: dict[str, str]) -> str:
    """How the store is named in logs and messages (secret options and passwords left out or redacted)."""
    distinct = list(dict.fromkeys(redact(public_url(u)) for u in urls.values()))
    if len(distinct) == 1:
        return distinct[0]
    return " ".join(f"{k}={redact(public_url(v))}" for k, v in urls.items())


# --- the persistent cache -------------------------------------------------------------------

_OLD_CACHE_VERSION = b"tvix-store-cache 1\n"


def _adopt_old_cache(root: Path) -> None:
    """A cache directory of the earlier layout (a `VERSION` file) is emptied: it is only a cache."""
    vf = root / "VERSION"
    try:
        if vf.read_bytes() != _OLD_CACHE_VERSION:
            return
    except OSError:
        return
    log.info("cache directory %s has the earlier cache layout: emptying it", root)
    for name in ("chunks", "blobs", "directories", "pathinfos", "tmp"):
        shutil.rmtree(root / name, ignore_errors=True)
    vf.unlink()


def with_cache(
    far: Store, cache_dir: Path | None, cache_size: int | None, *, timeout: float = DEFAULT_TIMEOUT
) -> Store:
    """`far`'s remote services behind cache combinators over one bounded object store in
    `cache_dir` (`cache_size` bytes, default DEFAULT_CACHE_SIZE), or in memory when `cache_dir`
    is None (default DEFAULT_MEMORY_CACHE_SIZE). ValidationError if no service is remote. The
    returned Store owns `far`."""
    from tvix_store.blobservice.cached import CachedBlobService
    from tvix_store.blobservice.objects import ObjectBlobService
    from tvix_store.directoryservice.cached import CachedDirectoryService
    from tvix_store.directoryservice.objects import ObjectDirectoryService
    from tvix_store.objects import ObjectStore
    from tvix_store.objects.bounded import BoundedObjectStore
    from tvix_store.objects.files import FileObjectStore
    from tvix_store.objects.memory import MemoryObjectStore
    from tvix_store.pathinfoservice.cached import CachedPathInfoService
    from tvix_store.pathinfoservice.objects import ObjectPathInfoService

    if not far.is_remote:
        raise ValidationError(f"--cache-dir only applies to a remote store, not {far.url!r}")
    counters = far.counters
    inner: ObjectStore
    if cache_dir is None:
        inner, default = MemoryObjectStore(), DEFAULT_MEMORY_CACHE_SIZE
    else:
        _adopt_old_cache(cache_dir)
        inner, default = FileObjectStore(cache_dir, exclusive=True), DEFAULT_CACHE_SIZE
    try:
        near = BoundedObjectStore(inner, default if cache_size is None else cache_size, counters)
    except BaseException:
        inner.close()
        raise
    blobs, dirs, infos = far.blobs, far.directories, far.pathinfos
    near_blobs = ObjectBlobService(near)
    near_dirs = ObjectDirectoryService(near)
    if blobs.capabilities.is_remote:
        blobs = CachedBlobService(near_blobs, blobs, counters=counters, timeout=timeout)
    if dirs.capabilities.is_remote:
        dirs = CachedDirectoryService(near_dirs, dirs, counters=counters)
    if infos.capabilities.is_remote:
        infos = CachedPathInfoService(ObjectPathInfoService(near, near_blobs, near_dirs), infos, counters=counters)
    return Store(blobs, dirs, infos, url=far.url, counters=counters)


# --- the schemes of this package -------------------------------------------------------------


def _no_query(url: str) -> None:
    if urlparse(url).query:
        raise ValidationError(f"invalid store URL {url!r}: this scheme takes no options")


def _open_memory(url: str, opts: Options) -> Backend:
    from tvix_store.blobservice.memory import MemoryBlobService
    from tvix_store.directoryservice.memory import MemoryDirectoryService
    from tvix_store.pathinfoservice.memory import MemoryPathInfoService

    u = urlparse(url)
    if u.netloc or u.path not in ("", "/"):
        raise ValidationError(f"invalid store URL {url!r}: expected memory://")
    _no_query(url)
    return Backend(MemoryBlobService, MemoryDirectoryService, MemoryPathInfoService)


def _open_local(url: str, opts: Options) -> Backend:
    from tvix_store.blobservice.objects import ObjectBlobService
    from tvix_store.directoryservice.objects import ObjectDirectoryService
    from tvix_store.objects.packs import PackObjectStore
    from tvix_store.pathinfoservice.objects import ObjectPathInfoService

    u = urlparse(url)
    if u.netloc or not u.path.startswith("/"):
        raise ValidationError(f"invalid store URL {url!r}: expected local:///absolute/path")
    fsync = False
    for key, value in parse_qsl(u.query, keep_blank_values=True):
        if key == "fsync" and value in ("0", "1", "true", "false"):
            fsync = value in ("1", "true")
        else:
            raise ValidationError(f"invalid store URL {url!r}: unknown option {key}={value!r} (known: fsync=0|1)")
    objects = PackObjectStore(Path(u.path), fsync=fsync)
    return Backend(
        lambda: ObjectBlobService(objects),
        lambda: ObjectDirectoryService(objects),
        lambda b, d: ObjectPathInfoService(objects, b, d),
        objects.close,
    )


def _read_option_file(url: str, key: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValidationError(f"invalid store URL {public_url(url)!r}: {key}={path}: {e.strerror or e}") from None


def _grpc_security(url: str, secure: bool, loopback: bool) -> ChannelSecurity:
    """The `ChannelSecurity` a gRPC store URL asks for (its query and `$TVIX_STORE_TOKEN`)."""
    from tvix_store.remote.channel import ChannelSecurity

    known = ("ca", "cert", "key", "token_file", "protocol") if secure else ("token_file", "protocol")
    opts: dict[str, str] = {}
    for key, value in parse_qsl(urlparse(url).query, keep_blank_values=True):
        if key == "protocol":
            continue  # `_grpc_protocol`
        if key not in known or not value:
            raise ValidationError(
                f"invalid store URL {public_url(url)!r}: unknown option {key!r} (known: {', '.join(known)})"
            )
        opts[key] = value
    if ("cert" in opts) != ("key" in opts):
        raise ValidationError(f"invalid store URL {public_url(url)!r}: cert and key go together")
    token: str | None = None
    if "token_file" in opts:
        lines = _read_option_file(url, "token_file", opts["token_file"]).decode("utf-8", "replace").split()
        if not lines:
            raise ValidationError(f"invalid store URL {public_url(url)!r}: token_file {opts['token_file']} is empty")
        token = lines[0]
        if not secure and not loopback:
            raise ValidationError(
                f"invalid store URL {public_url(url)!r}: a token is only sent over TLS to a network address "
                f"(use grpc+https://)"
            )
    elif env := os.environ.get("TVIX_STORE_TOKEN", "").strip():
        if secure or loopback:
            token = env
        else:
            log.warning("not sending $TVIX_STORE_TOKEN in clear to %s (use grpc+https://)", public_url(url))
    return ChannelSecurity(
        tls=secure,
        ca=_read_option_file(url, "ca", opts["ca"]) if "ca" in opts else None,
        cert=_read_option_file(url, "cert", opts["cert"]) if "cert" in opts else None,
        key=_read_option_file(url, "key", opts["key"]) if "key" in opts else None,
        token=token,
    )


def _grpc_protocol(url: str) -> str | None:
    """The protocol generation a gRPC store URL forces (`?protocol=g1|g2|g3`), or None."""
    protocol = None
    for key, value in parse_qsl(urlparse(url).query, keep_blank_values=True):
        if key == "protocol":
            if value not in ("g1", "g2", "g3"):
                raise ValidationError(
                    f"invalid store URL {public_url(url)!r}: protocol={value!r} (known: protocol=g1|g2|g3)"
                )
            protocol = value
    return protocol


def _open_grpc(url: str, opts: Options) -> Backend:
    from tvix_store.blobservice.grpc import GrpcBlobService
    from tvix_store.directoryservice.grpc import GrpcDirectoryService
    from tvix_store.pathinfoservice.grpc import GrpcPathInfoService
    from tvix_store.remote.channel import Remote
    from tvix_store.util.net import is_loopback

    u = urlparse(url)
    shown = public_url(url)
    protocol = _grpc_protocol(url)
    if u.scheme in ("grpc+http", "grpc+https"):
        try:
            port = u.port
        except ValueError:
            port = None
        if not u.hostname or not port or u.path not in ("", "/"):
            raise ValidationError(f"invalid store URL {shown!r}: expected {u.scheme}://HOST:PORT")
        target = f"{u.hostname}:{port}" if ":" not in u.hostname else f"[{u.hostname}]:{port}"
        loopback = is_loopback(u.hostname)
    else:
        if u.netloc or not u.path.startswith("/"):
            raise ValidationError(f"invalid store URL {shown!r}: expected grpc+unix:///absolute/path.sock")
        target = f"unix:{u.path}"
        loopback = True
    security = _grpc_security(url, u.scheme == "grpc+https", loopback)
    remote = Remote(
        target, shown, opts.timeout, opts.counters, fail_fast=opts.fail_fast, security=security, protocol=protocol
    )
    return Backend(
        lambda: GrpcBlobService(remote),
        lambda: GrpcDirectoryService(remote),
        lambda b, d: GrpcPathInfoService(remote),
        remote.close,
    )


def _open_bucket(url: str, opts: Options) -> Backend:
    from tvix_store.blobservice.bucket import BucketBlobService
    from tvix_store.directoryservice.bucket import BucketDirectoryService
    from tvix_store.objects.buckets import open_bucket

    objects = open_bucket(url, opts.timeout)

    def no_pathinfos(b: BlobService, d: DirectoryService) -> PathInfoService:
        raise ValidationError(
            f"{objects.name} holds blobs and Directories only (the tvix/snix bucket layout has no path "
            "infos): name a path-info store with --pathinfo-store (e.g. postgresql://…)"
        )

    return Backend(lambda: BucketBlobService(objects), lambda: BucketDirectoryService(objects), no_pathinfos)


def _open_postgres(url: str, opts: Options) -> Backend:
    from tvix_store.directoryservice.postgres import PostgresDirectoryService
    from tvix_store.pathinfoservice.postgres import PostgresPathInfoService
    from tvix_store.remote.postgres import Database

    db = Database(url, opts.timeout)

    def no_blobs() -> BlobService:
        raise ValidationError(
            f"{db.name} holds Directories and path infos only: name a blob store with --blob-store "
            "(e.g. objectstore+s3://…)"
        )

    return Backend(
        no_blobs,
        lambda: PostgresDirectoryService(db),
        lambda b, d: PostgresPathInfoService(db, b, d),
        db.close_if_unused,
    )


register("local", _open_local, "local:///path")
register("memory", _open_memory, "memory://")
register("grpc+http", _open_grpc, "grpc+http://HOST:PORT")
register("grpc+https", _open_grpc, "grpc+https://HOST:PORT[?ca=FILE]")
register("grpc+unix", _open_grpc, "grpc+unix:///path")
register("objectstore+s3", _open_bucket, "objectstore+s3://BUCKET[/PREFIX][?OPTIONS]")
register("objectstore+file", _open_bucket, "objectstore+file:///path")
register("objectstore+memory", _open_bucket, "objectstore+memory:///")
register("objectstore+http", _open_bucket, "objectstore+http://HOST/PREFIX")
register("objectstore+https", _open_bucket, "objectstore+https://HOST/PREFIX")
register("postgresql", _open_postgres, "postgresql://[USER@][HOST]/DB[?host=/socket/dir&port=N]")
register("postgres", _open_postgres, "postgres://…")
