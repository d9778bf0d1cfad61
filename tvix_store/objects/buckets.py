"""`BucketObjectStore`: the object layer over `obstore` (S3 and S3-compatible, HTTP, file, memory).

What the `objectstore+…` URLs name (`open_bucket`), as tvix/snix read them:

    objectstore+memory:///                       in-process (obstore's MemoryStore)
    objectstore+file:///ABS/PATH                 a directory (created if missing)
    objectstore+s3://BUCKET[/PREFIX][?OPTS]      S3 or any S3-compatible server
    objectstore+http[s]://HOST[:PORT]/PREFIX     plain HTTP(S) GETs: read-only

`OPTS` are object_store configuration keys as snix passes them (`aws_endpoint_url=…`,
`aws_allow_http=true`, `aws_region=…`, …); client keys (`allow_http`, `timeout`, …, also with
an `aws_` prefix) go to the HTTP client. Credentials and region also come from the standard
`AWS_*` environment variables (read by obstore; never logged or put in messages: errors name
the bucket URL without its query).

Keys are any relative paths (the bucket layout is `tvix_store.protocol.bucket`'s). `put` is
put-if-absent (a conditional create; where a backend cannot, HEAD then PUT: the objects are
content-addressed, so a racing writer writes the same bytes); an object is visible whole or
not at all (one PUT, a multipart upload completes atomically, files are renamed into place).
Every call has a deadline (`timeout`: per request, and for retries together); a server that
is down or too slow is an UnavailableError naming the bucket, within that deadline.
Not here: verification (the services hash what they read), caching.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qsl, urlparse, urlunparse

import obstore
from obstore import exceptions as obx
from obstore.store import HTTPStore, LocalStore, MemoryStore, S3Store

from tvix_store.core.capabilities import Capabilities
from tvix_store.core.errors import StoreError, UnavailableError, ValidationError
from tvix_store.objects import ObjectInfo, ObjectStore
from tvix_store.util.urls import redact

PREFIX = "objectstore+"
#: object_store's client (HTTP) options; accepted bare or with an `aws_` prefix
CLIENT_KEYS = frozenset(
    {
        "allow_http",
        "allow_invalid_certificates",
        "connect_timeout",
        "default_content_type",
        "http1_only",
        "http2_only",
        "pool_idle_timeout",
        "pool_max_idle_per_host",
        "proxy_url",
        "proxy_ca_certificate",
        "proxy_excludes",
        "timeout",
        "user_agent",
    }
)


def _bool(v: str) -> bool:
    return v.lower() in ("1", "true", "yes", "on")


class BucketObjectStore(ObjectStore):
    """An ObjectStore over one obstore store (see the module docstring). Thread-safe."""

    def __init__(self, store: Any, name: str, *, remote: bool, writable: bool = True, can_list: bool = True) -> None:
        self._s = store
        self.name = name
        self.writable = writable
        self.capabilities = Capabilities(is_remote=remote, can_list=can_list, verifies_reads=False)
        self._create_ok = True  # conditional create supported (until the backend says not)

    # --- errors ---------------------------------------------------------------------------

    def _failed(self, e: Exception, what: str) -> StoreError:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "169.254.169.254" in msg:  # no credentials given: object_store asked the EC2 metadata service
            msg = (
                "no S3 credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or aws_skip_signature=true "
                "for a public bucket); the instance metadata service answered: " + msg
            )
        if isinstance(e, obx.PermissionDeniedError | obx.UnauthenticatedError):
            return StoreError(f"object store {self.name}: access denied for {what}: {msg}")
        return UnavailableError(f"object store {self.name} failed {what}: {msg}")

    # --- reads ------------------------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        try:
            return obstore.get(self._s, key).bytes().to_bytes()
        except FileNotFoundError:
            return None
        except Exception as e:  # noqa: BLE001 - every other obstore failure is the store's
            raise self._failed(e, f"GET {key}") from None

    def get_range(self, key: str, offset: int, length: int) -> bytes | None:
        try:
            return obstore.get_range(self._s, key, start=offset, length=length).to_bytes()
        except FileNotFoundError:
            return None
        except Exception:  # noqa: BLE001 - a range past the end, or a server without ranges
            data = self.get(key)
            return None if data is None else data[offset : offset + length]

    def stat(self, key: str) -> int | None:
        try:
            return int(obstore.head(self._s, key)["size"])
        except FileNotFoundError:
            return None
        except Exception as e:  # noqa: BLE001
            raise self._failed(e, f"HEAD {key}") from None

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        if not self.capabilities.can_list:
            return
        try:
            for batch in obstore.list(self._s, prefix=prefix or None):
                for m in batch:
                    yield ObjectInfo(m["path"], int(m["size"]), m["last_modified"].timestamp())
        except Exception as e:  # noqa: BLE001
            raise self._failed(e, f"LIST {prefix}") from None

    # --- writes -----------------------------------------------------------------------------

    def put(self, key: str, data: bytes | bytearray | memoryview, *, replace: bool = False) -> bool:
        if not self.writable:
            raise StoreError(f"object store {self.name} is read-only")
        payload = bytes(data)
        if not replace and self._create_ok:
            try:
                obstore.put(self._s, key, payload, mode="create")
                return True
            except obx.AlreadyExistsError:
                return False
            except obx.NotSupportedError:
                self._create_ok = False
            except Exception as e:  # noqa: BLE001
                raise self._failed(e, f"PUT {key}") from None
        if not replace and self.has(key):
            return False
        try:
            obstore.put(self._s, key, payload)
        except Exception as e:  # noqa: BLE001
            raise self._failed(e, f"PUT {key}") from None
        return True

    def delete(self, key: str) -> bool:
        if not self.writable:
            raise StoreError(f"object store {self.name} is read-only")
        if self.stat(key) is None:
            return False
        try:
            obstore.delete(self._s, key)
        except FileNotFoundError:
            return False
        except Exception as e:  # noqa: BLE001
            raise self._failed(e, f"DELETE {key}") from None
        return True


def open_bucket(url: str, timeout: float = 10.0) -> BucketObjectStore:
    """Open an `objectstore+…` URL (the module docstring). ValidationError for a bad URL or an
    unknown option; nothing is contacted yet (the first call finds out whether the server is there)."""
    if not url.startswith(PREFIX):
        raise ValidationError(f"invalid store URL {redact(url)!r}: expected {PREFIX}SCHEME://…")
    inner = url[len(PREFIX) :]
    u = urlparse(inner)
    bare = urlunparse(u._replace(query="", fragment=""))
    name = PREFIX + bare
    query = parse_qsl(u.query, keep_blank_values=True)
    secs = max(1, round(timeout))
    client: dict[str, Any] = {"timeout": f"{secs}s", "connect_timeout": f"{min(secs, 5)}s"}
    retry: Any = {"max_retries": 3, "retry_timeout": timedelta(seconds=timeout)}
    try:
        if u.scheme == "memory":
            if u.netloc or u.path not in ("", "/") or query:
                raise ValidationError(f"invalid store URL {redact(url)!r}: expected {PREFIX}memory:///")
            return BucketObjectStore(MemoryStore(), name, remote=False)
        if u.scheme == "file":
            if u.netloc or not u.path.startswith("/") or query:
                raise ValidationError(f"invalid store URL {redact(url)!r}: expected {PREFIX}file:///absolute/path")
            os.makedirs(u.path, exist_ok=True)
            return BucketObjectStore(LocalStore(u.path, mkdir=True), name, remote=False)
        config: dict[str, str] = {}
        for key, value in query:
            k = key.lower()
            bare_key = k[len("aws_") :] if k.startswith("aws_") and k[len("aws_") :] in CLIENT_KEYS else k
            if bare_key in CLIENT_KEYS:
                client[bare_key] = _bool(value) if bare_key.startswith(("allow_", "http")) else value
            else:
                config[k] = value
        if u.scheme in ("s3", "s3a"):
            if not u.netloc:
                raise ValidationError(f"invalid store URL {redact(url)!r}: expected {PREFIX}s3://BUCKET[/PREFIX]")
            store = S3Store.from_url(bare, config=config or None, client_options=client, retry_config=retry)
            return BucketObjectStore(store, name, remote=True)
        if u.scheme in ("http", "https"):
            if not u.netloc:
                raise ValidationError(f"invalid store URL {redact(url)!r}: expected {PREFIX}{u.scheme}://HOST/PREFIX")
            if config:
                raise ValidationError(f"invalid store URL {redact(url)!r}: unknown option {next(iter(config))!r}")
            if u.scheme == "http":
                client.setdefault("allow_http", True)  # the URL says plain HTTP
            store = HTTPStore.from_url(bare, client_options=client, retry_config=retry)
            return BucketObjectStore(store, name, remote=True, writable=False, can_list=False)
    except ValidationError:
        raise
    except obx.UnknownConfigurationKeyError as e:
        raise ValidationError(f"invalid store URL {name!r}: {str(e).splitlines()[0]}") from None
    except Exception as e:  # noqa: BLE001 - obstore refuses the URL or an option value
        raise ValidationError(f"invalid store URL {name!r}: {str(e).strip().splitlines()[0]}") from None
    raise ValidationError(
        f"invalid store URL {redact(url)!r}: expected {PREFIX}memory:///, {PREFIX}file:///PATH, "
        f"{PREFIX}s3://BUCKET[/PREFIX] or {PREFIX}http(s)://HOST/PREFIX"
    )
