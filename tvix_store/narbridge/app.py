"""`Bridge`: the HTTP binary cache over one `Store`, as an aiohttp application (NAR-BRIDGE.md).

Requests (handlers below, one each):
- `GET /`, `GET /nix-cache-info`;
- `GET/HEAD /<hash>.narinfo`: the PathInfo (`PathInfoService.get`), its Deriver/CA record
  (`index`), its signatures plus one per `--sign-key-file`; HEAD answers the same headers;
- `GET/HEAD /nar/tvix-castore/<node>?narsize=N` (and `snix-castore`): the NAR of the node in
  the URL, rendered while it is sent (`tvix_store.nar.render`, batches of `BATCH` bytes in a
  worker thread, written with backpressure), `Range` answered with 206; HEAD from the URL alone;
- `GET/HEAD /<hash>.ls`: the listing (`listing`);
- `PUT /nar/<sha256>.nar[.xz|.zst|.bz2]`: the body streamed into the store (`ingest`), then
  the index record; `HEAD` of that name: 200 once ingested (Nix asks before it uploads);
- `PUT /<hash>.narinfo`: parsed (`narinfo.parse`, at most `MAX_NARINFO` bytes), its NarHash
  looked up in the index, then `Admission.put_pathinfo` (complete closure, matching NarHash,
  never replaces a store path).

The store is blocking: store calls run on a thread pool (`threads`), uploads on their own
threads (`max_uploads` at once, more wait), so the event loop only moves bytes. Errors become
status codes in one place (`_errors`): ValidationError and PreconditionError 400, a missing
object 404, ConflictError 409, a full disk 507, an unreachable remote 503, anything else 500;
the answer is one line of text, logged as one line (at most `LOG_PER_MINUTE` a minute, no
traceback unless debugging). Timeouts: a request body or a response that makes no progress
for `idle_timeout` seconds is abandoned (nothing is indexed or published from it).

Metrics (`_metered`, outermost, with `metrics`): every request by route pattern, method and
status, its duration and body bytes (`tvix_store.serve.metrics.HttpMetrics`).

Access (`_access`, before anything but metrics): with `tokens` (`--auth-tokens`), every request needs
`Authorization: Bearer TOKEN` (or HTTP Basic with the token as password, what Nix sends from a
netrc file): missing or unknown is 401 (with a `WWW-Authenticate` challenge), an upload (`PUT`)
with a read-only token 403; with `public_reads`, GET and HEAD need no token. Tokens are checked
in constant time (`tvix_store.serve.security`) and never logged.

Not here: the listening socket, TLS and signals (`server`), the formats (`narinfo`), the index
storage (`index`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web

from tvix_store import nar
from tvix_store.admission import Admission
from tvix_store.core import nixbase32
from tvix_store.core.castore import MAX_U64, DirectoryNode, FileNode, Node
from tvix_store.core.errors import (
    ConflictError,
    NotFoundError,
    PreconditionError,
    ResourceExhaustedError,
    StoreError,
    UnavailableError,
    ValidationError,
)
from tvix_store.core.pathinfo import NarInfo, PathInfo, StorePath
from tvix_store.gc import writing
from tvix_store.narbridge import narinfo as fmt
from tvix_store.narbridge.index import NarIndex, NarRecord, PathExtra, open_index
from tvix_store.narbridge.ingest import BodyPipe, UploadAborted, ingest
from tvix_store.narbridge.listing import listing
from tvix_store.narbridge.signing import SigningKey
from tvix_store.remote.status import RateLimitedLog
from tvix_store.serve.security import Scope, Tokens, bearer_of
from tvix_store.store import Store

if TYPE_CHECKING:
    from tvix_store.serve.metrics import HttpMetrics

log = logging.getLogger("tvix_store.narbridge")

T = TypeVar("T")

DEFAULT_PRIORITY = 39
DEFAULT_IDLE_TIMEOUT = 60.0
#: the largest narinfo accepted (a narinfo with thousands of references is ~100 KiB)
MAX_NARINFO = 1 << 20
#: bytes of NAR rendered per step in a worker thread, then written
BATCH = 1 << 20
#: threads for store calls (narinfo look-ups, NAR rendering steps, listings)
THREADS = 32
#: uploads ingested at once (each holds a thread for its whole length); more wait
MAX_UPLOADS = 16
#: rendered (and signed) narinfos kept, by what they are made of
RENDERED_ENTRIES = 4096
#: refused requests logged per minute at most
LOG_PER_MINUTE = 10
IMMUTABLE = "max-age=31536000, immutable"

_refused = RateLimitedLog("refused nar-bridge requests", LOG_PER_MINUTE, log)
_RANGE = re.compile(r"bytes=(\d*)-(\d*)\Z")
#: `narinfo_text(quick=True)`: this one needs its NAR rendered (not on the event loop)
_SLOW = "\0slow"


class HttpError(Exception):
    """A request refused with `status` and a one-line `message`."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


def _status_of(e: BaseException) -> int:
    if isinstance(e, HttpError):
        return e.status
    if isinstance(e, ValidationError | PreconditionError):
        return 400
    if isinstance(e, NotFoundError):
        return 404
    if isinstance(e, ConflictError):
        return 409
    if isinstance(e, ResourceExhaustedError):
        return 507
    if isinstance(e, UnavailableError):
        return 503
    return 500


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The one byte range of a `Range` header as (first, last) inclusive; None to send the whole
    (no header, several ranges, or a syntax we ignore, as RFC 9110 allows); HttpError 416 if
    it cannot be satisfied."""
    if not header:
        return None
    m = _RANGE.match(header.strip())
    if m is None:
        return None
    a, b = m.group(1), m.group(2)
    if not a and not b:
        return None
    if not a:  # the last b bytes
        n = int(b)
        if n == 0 or size == 0:
            raise HttpError(416, "range not satisfiable", {"Content-Range": f"bytes */{size}"})
        return max(0, size - n), size - 1
    first = int(a)
    last = min(int(b), size - 1) if b else size - 1
    if b and int(b) < first:
        return None
    if first >= size:
        raise HttpError(416, "range not satisfiable", {"Content-Range": f"bytes */{size}"})
    return first, last


def _batch(pieces: Iterator[bytes], limit: int = BATCH) -> bytes:
    """The next pieces of a NAR, joined, about `limit` bytes; b"" at its end."""
    out: list[bytes] = []
    n = 0
    for p in pieces:
        out.append(p)
        n += len(p)
        if n >= limit:
            break
    return b"".join(out)


def _close(pieces: Iterator[bytes]) -> None:
    """Close a generator of pieces; one still running in a worker thread (its request was
    cancelled meanwhile) finishes its step there and is then dropped."""
    with contextlib.suppress(ValueError):
        pieces.close()  # type: ignore[attr-defined]


def _present(store: Store, node: Node) -> bool:
    """Whether the root of `node` is in the store (a Directory is stored after its children)."""
    if isinstance(node, DirectoryNode):
        return store.directories.has(node.digest)
    if isinstance(node, FileNode):
        return store.blobs.has(node.digest)
    return True


class Bridge:
    """The binary cache over `store` (see the module docstring). `admission` may be shared with
    a gRPC server over the same store (one per-path lock, one NAR cache)."""

    def __init__(
        self,
        store: Store,
        *,
        keys: tuple[SigningKey, ...] = (),
        priority: int = DEFAULT_PRIORITY,
        admission: Admission | None = None,
        index: NarIndex | None = None,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        max_narinfo: int = MAX_NARINFO,
        threads: int = THREADS,
        max_uploads: int = MAX_UPLOADS,
        tokens: Tokens | None = None,
        public_reads: bool = False,
        metrics: HttpMetrics | None = None,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.tokens = tokens
        self.public_reads = public_reads
        self.keys = keys
        self.priority = priority
        self.admission = admission or Admission(store)
        self.index = index or open_index(store)
        self.idle_timeout = idle_timeout
        self.max_narinfo = max_narinfo
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="nar-bridge")
        self._uploads = ThreadPoolExecutor(max_uploads, thread_name_prefix="nar-bridge-upload")
        self._upload_slots = asyncio.Semaphore(max_uploads)
        self._rendered: OrderedDict[tuple[PathInfo, PathExtra | None], str] = OrderedDict()
        self._rendered_lock = threading.Lock()
        self._inline = not store.pathinfos.capabilities.is_remote

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._uploads.shutdown(wait=True, cancel_futures=True)

    # --- plumbing ------------------------------------------------------------------------

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def _timed(self, aw: Awaitable[T], what: str) -> T:
        try:
            return await asyncio.wait_for(aw, self.idle_timeout)
        except TimeoutError:
            raise HttpError(408, f"{what}: no progress for {self.idle_timeout:g} s") from None

    def application(self) -> web.Application:
        middlewares = [self._errors] if self.tokens is None else [self._access, self._errors]
        if self.metrics is not None:
            middlewares.insert(0, self._metered)
        app = web.Application(middlewares=middlewares, client_max_size=self.max_narinfo)
        r = app.router
        r.add_get("/", self.root)
        r.add_get("/nix-cache-info", self.cache_info)
        r.add_get(r"/nar/{prefix:(tvix|snix)-castore}/{node}", self.get_nar)
        r.add_route("HEAD", "/nar/{name}", self.head_upload)
        r.add_put("/nar/{name}", self.put_nar)
        r.add_get("/{name}", self.get_narinfo)
        r.add_put("/{name}", self.put_narinfo)
        return app

    @web.middleware
    async def _metered(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Every request reported to `metrics` (only installed with it): route pattern, method,
        status (499: the client went away), duration, body bytes both ways."""
        assert self.metrics is not None
        start = time.perf_counter()
        status, sent = 500, 0
        try:
            resp = await handler(request)
            status = resp.status
            body = getattr(resp, "body", None)
            sent = len(body) if isinstance(body, bytes) else resp.body_length
            return resp
        except web.HTTPException as e:
            status = e.status
            raise
        except (asyncio.CancelledError, ConnectionError):
            status = 499
            raise
        finally:
            resource = request.match_info.route.resource
            route = resource.canonical if resource is not None else "unmatched"
            received = getattr(request.content, "total_bytes", 0)
            self.metrics.observe(route, request.method, status, time.perf_counter() - start, received, sent)

    @web.middleware
    async def _access(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """The token check of the module docstring (only installed with `tokens`)."""
        assert self.tokens is not None
        reading = request.method in ("GET", "HEAD")
        if reading and self.public_reads:
            return await handler(request)
        scope = self.tokens.scope_of(bearer_of(request.headers.get("Authorization")))
        status, msg = 0, ""
        if scope is None:
            status, msg = 401, "a valid token is required"
        elif not reading and scope is not Scope.WRITE:
            status, msg = 403, "this token may only read (scope ro)"
        if status:
            _refused.warning("%s %s: %d %s", request.method, request.path[:160], status, msg)
            headers = {"WWW-Authenticate": 'Basic realm="nar-bridge"'} if status == 401 else {}
            resp = web.Response(status=status, text=msg + "\n", headers=headers)
            if request.can_read_body:
                resp.force_close()  # the body of a refused upload is not read: the connection ends
            return resp
        return await handler(request)

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except (web.HTTPException, ConnectionError):  # aiohttp's answers; a client that went away
            raise
        except Exception as e:
            status = _status_of(e)
            msg = _one_line(e)
            if status == 500 and not isinstance(e, StoreError):
                log.debug("internal error", exc_info=True)
                msg = f"internal error: {msg}"
            path = request.path[:160]
            if status >= 500:
                log.warning("%s %s: %d %s", request.method, path, status, msg)
            elif status == 404:  # a cache miss is the normal answer to most look-ups
                log.debug("%s %s: %d %s", request.method, path, status, msg)
            else:
                _refused.warning("%s %s: %d %s", request.method, path, status, msg)
            headers = e.headers if isinstance(e, HttpError) else {}
            return web.Response(status=status, text=msg + "\n", headers=headers)

    # --- small answers -------------------------------------------------------------------

    async def root(self, request: web.Request) -> web.Response:
        return web.Response(text="tvix-store nar-bridge: a Nix binary cache over a tvix store\n")

    async def cache_info(self, request: web.Request) -> web.Response:
        return web.Response(text=fmt.cache_info(self.priority), content_type=fmt.CACHE_INFO_TYPE)

    # --- narinfo -------------------------------------------------------------------------

    def narinfo_of(self, path_hash: bytes) -> tuple[fmt.NarInfoText, Node] | None:
        """What the narinfo of this store path says (signatures included) and its root node, or
        None if the store does not have it."""
        info = self.store.pathinfos.get(path_hash)
        if info is None or info.node is None:
            return None
        return self._narinfo_of(info, self.index.extra(path_hash))

    def _narinfo_of(self, info: PathInfo, extra: PathExtra | None) -> tuple[fmt.NarInfoText, Node]:
        assert info.node is not None
        sp = info.store_path
        if info.narinfo is not None:
            size, sha = info.narinfo.nar_size, info.narinfo.nar_sha256
            refs = tuple(info.narinfo.reference_names)
            sigs = list(info.narinfo.signatures)
        else:
            if info.references:
                raise StoreError(f"the path info of {sp} has references but no reference names")
            size, sha = self.admission.nar_of(info.node)
            refs, sigs = (), []
        extra = extra or PathExtra()
        ca = extra.ca
        if ca is None and not refs and StorePath.from_nar_sha256(sha, sp.name) == sp:
            ca = f"fixed:r:sha256:{nixbase32.encode(sha)}"  # what `nix-store --add` makes
        if self.keys:
            fp = fmt.fingerprint(sp, sha, size, refs)
            sigs += [s for s in (k.sign(fp) for k in self.keys) if s not in sigs]
        return fmt.NarInfoText(sp, sha, size, tuple(sorted(refs)), extra.deriver, tuple(sigs), ca), info.node

    def narinfo_text(self, path_hash: bytes, quick: bool = False) -> str | None:
        """The narinfo served for this store path, or None. Rendered texts are kept by what they
        are made of (the PathInfo as stored and its record), so a cache hit is two look-ups.
        `quick`: `_SLOW` instead of rendering its NAR when the PathInfo has no narinfo."""
        info = self.store.pathinfos.get(path_hash)
        if info is None or info.node is None:
            return None
        if quick and info.narinfo is None:
            return _SLOW
        key = (info, self.index.extra(path_hash))
        with self._rendered_lock:
            text = self._rendered.get(key)
            if text is not None:
                self._rendered.move_to_end(key)
                return text
        got = self._narinfo_of(info, key[1])
        ni, node = got
        text = fmt.render(ni, fmt.nar_url(node, ni.nar_size))
        with self._rendered_lock:
            self._rendered[key] = text
            while len(self._rendered) > RENDERED_ENTRIES:
                self._rendered.popitem(last=False)
        return text

    async def get_narinfo(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if (h := fmt.listing_hash_of(name)) is not None:
            return await self.get_listing(request, h)
        h = fmt.path_hash_of(name)
        if h is None:
            raise HttpError(404, f"no such file: {name[:80]!r}")
        # a narinfo of a local store is two small reads: answered on the event loop (measured: 5,000
        # req/s against 3,000 with a hop to a worker thread); a remote store's take a round trip
        text = self.narinfo_text(h, quick=True) if self._inline else _SLOW
        if text is _SLOW:
            text = await self._call(self.narinfo_text, h)
        if text is None:
            raise HttpError(404, f"{name[:32]}: no such store path")
        return web.Response(text=text, content_type=fmt.NARINFO_TYPE)

    async def put_narinfo(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if fmt.listing_hash_of(name) is not None:  # Nix with write-nar-listing=1: ours are made on the fly
            await self._discard(request)
            return web.Response(text="")
        h = fmt.path_hash_of(name)
        if h is None:
            raise HttpError(
                404, f"cannot PUT {name[:80]!r}: expected <hash>.narinfo or nar/<sha256>.nar[.xz|.zst|.bz2]"
            )
        self._check_encoding(request)
        body = await self._read_limited(request, self.max_narinfo, "narinfo")
        ni = fmt.parse(body)
        if ni.store_path.digest != h:
            raise ValidationError(f"the narinfo is for {ni.store_path}, but was PUT at {name}")
        await self._call(self.publish, ni)
        return web.Response(text="")

    def publish(self, ni: fmt.NarInfoText) -> PathInfo:
        """Store the PathInfo an uploaded narinfo describes (see the module docstring)."""
        with writing(self.store):  # no GC sweep between the closure check and the PathInfo
            return self._publish(ni)

    def _publish(self, ni: fmt.NarInfoText) -> PathInfo:
        sp = ni.store_path
        existing = self.store.pathinfos.get(sp.digest)
        rec = self.index.nar(ni.nar_sha256)
        if rec is not None and rec.nar_sha256 != ni.nar_sha256:
            rec = None  # filed under a file hash that happens to be this NarHash: not this NAR
        if rec is None:
            if existing is None or existing.narinfo is None or existing.narinfo.nar_sha256 != ni.nar_sha256:
                raise ValidationError(
                    f"NarHash sha256:{nixbase32.encode(ni.nar_sha256)} of {sp} was not uploaded here: "
                    "PUT its NAR first (nar/<sha256>.nar[.xz|.zst|.bz2])"
                )
            assert existing.node is not None
            node = existing.node
        else:
            if rec.nar_size != ni.nar_size:
                raise ValidationError(
                    f"NarSize {ni.nar_size} of {sp} does not match its uploaded NAR ({rec.nar_size} bytes)"
                )
            node = rec.node.renamed(sp.basename.encode())
        refs = tuple(StorePath.parse_basename(r).digest for r in ni.references)
        info = PathInfo(node, refs, NarInfo(ni.nar_size, ni.nar_sha256, ni.signatures, ni.references))
        info.validate()
        extra = existing is None and (ni.deriver or ni.ca)
        if extra:  # first: a PathInfo is never served without what its narinfo said
            self.index.put_extra(sp.digest, PathExtra(ni.deriver, ni.ca))
        try:
            return self.admission.put_pathinfo(info)
        except BaseException as e:
            if extra and self.store.pathinfos.get(sp.digest) is None:
                self.index.drop_extra(sp.digest)
            if rec is None or not isinstance(e, PreconditionError):
                raise
            self.index.drop_nar(ni.nar_sha256)
            raise PreconditionError(
                f"the uploaded NAR of {sp} is no longer complete in the store ({e}): upload it again"
            ) from None

    # --- NARs ----------------------------------------------------------------------------

    async def get_nar(self, request: web.Request) -> web.StreamResponse:
        node = fmt.node_of_url(request.match_info["node"])
        if node is None:
            raise HttpError(404, "the NAR URL does not name a node")
        size_text = request.query.get("narsize")
        if size_text is None or not size_text.isdigit() or len(size_text) > 20:
            raise HttpError(400, "the NAR URL needs ?narsize=N (the NarSize of the narinfo)")
        size = int(size_text)
        if size > MAX_U64:
            raise HttpError(400, f"narsize {size} is out of range")
        rng = parse_range(request.headers.get("Range"), size)
        first, last = rng if rng is not None else (0, size - 1)
        length = last - first + 1
        resp = web.StreamResponse(status=206 if rng is not None else 200)
        resp.content_type = fmt.NAR_TYPE
        resp.headers["Cache-Control"] = IMMUTABLE
        resp.headers["Accept-Ranges"] = "bytes"
        if rng is not None:
            resp.headers["Content-Range"] = f"bytes {first}-{last}/{size}"
        resp.content_length = length
        if request.method == "HEAD" or length == 0:
            await resp.prepare(request)
            await resp.write_eof()
            return resp
        pieces = nar.render(node, self.store.blobs, self.store.directories, first)
        try:
            data = await self._call(_batch, pieces)  # before the first byte: errors are statuses
            if not data:
                raise StoreError(f"the NAR ends before byte {first}")
            await resp.prepare(request)
            left = length
            while data:
                data = data[:left]
                await self._timed(resp.write(data), "sending the NAR")
                left -= len(data)
                if not left:
                    break
                data = await self._call(_batch, pieces)
            if left:
                raise StoreError(f"the NAR ended {left} bytes before the narsize of its URL")
        except (ConnectionError, asyncio.CancelledError):
            self._abort(request)
            raise
        except Exception as e:
            if not resp.prepared:
                raise
            if not isinstance(e, StoreError | HttpError):
                log.debug("internal error", exc_info=True)
            log.warning("GET %s: NAR cut short after the headers: %s", request.path[:120], _one_line(e))
            self._abort(request)
            return resp
        finally:
            _close(pieces)
        await resp.write_eof()
        await self._sent(request)
        return resp

    async def _sent(self, request: web.Request) -> None:
        """Until the kernel holds every byte of the response (up to 64 KiB wait in the
        transport after the last write): a stop right after this handler returns must not drop
        the tail of a download. Like a write, gives up (and cuts the connection) after
        `idle_timeout` seconds without progress."""
        t = request.transport
        loop = asyncio.get_running_loop()
        last, since = -1, loop.time()
        while t is not None and not t.is_closing():
            n = t.get_write_buffer_size()
            if n == 0:
                return
            if n != last:
                last, since = n, loop.time()
            elif loop.time() - since > self.idle_timeout:
                t.abort()
                return
            await asyncio.sleep(0.005)

    @staticmethod
    def _abort(request: web.Request) -> None:
        """End the connection without completing the body: the client sees a short read."""
        if request.transport is not None:
            request.transport.abort()

    async def head_upload(self, request: web.Request) -> web.Response:
        parsed = fmt.nar_file_of(request.match_info["name"])
        if parsed is None:
            raise HttpError(404, "no such NAR")
        rec = await self._call(self._uploaded, parsed[0])
        if rec is None:
            raise HttpError(404, "no such NAR")
        return web.Response(headers={"Cache-Control": "no-cache"})

    def _uploaded(self, sha256: bytes) -> NarRecord | None:
        rec = self.index.nar(sha256)
        if rec is not None and not _present(self.store, rec.node):
            self.index.drop_nar(sha256)
            return None
        return rec

    async def put_nar(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        parsed = fmt.nar_file_of(name)
        if parsed is None:
            raise HttpError(
                400, f"cannot PUT nar/{name[:80]}: expected nar/<52 nixbase32 chars of its sha256>.nar[.xz|.zst|.bz2]"
            )
        self._check_encoding(request)
        async with self._upload_slots:  # the others wait here, their bodies unread
            return await self._receive(request, name, *parsed)

    async def _receive(self, request: web.Request, name: str, sha: bytes, compression: str) -> web.Response:
        log.debug("receiving NAR %s (%s bytes)", name, request.content_length)
        loop = asyncio.get_running_loop()
        pipe = BodyPipe(loop)
        job = loop.run_in_executor(self._uploads, self._ingest, pipe, compression, sha)
        try:
            while True:
                chunk = await self._timed(request.content.readany(), "receiving the NAR")
                if not chunk:
                    pipe.finish()
                    break
                if not await pipe.feed(chunk):
                    break  # the reader stopped: its error is the answer
        except HttpError as e:  # stalled
            pipe.finish(UploadAborted(str(e)))
            with contextlib.suppress(Exception):
                await job
            raise
        except asyncio.CancelledError:
            pipe.finish(UploadAborted("upload cancelled"))
            raise
        except Exception as e:  # the body broke off (the client went away, a bad chunked encoding)
            pipe.finish(UploadAborted(f"upload abandoned: {_one_line(e)}"))
            with contextlib.suppress(Exception):
                await job
            raise HttpError(400, f"the body of the upload broke off: {_one_line(e)}") from None
        rec = await job
        return web.Response(text=f"{nixbase32.encode(rec.nar_sha256)}\n")

    def _ingest(self, pipe: BodyPipe, compression: str, sha: bytes) -> NarRecord:
        with writing(self.store):  # no GC sweep between what is written and its record
            got = ingest(self.store, pipe, compression, sha)
            rec = NarRecord(got.node, got.nar_size, got.nar_sha256)
            self.admission.known_nar(got.node, got.nar_size, got.nar_sha256)
            if got.file_sha256 is None:
                self.index.put_nar(rec)
            else:
                self.index.put_nar(rec, got.file_sha256)
        log.debug("ingested NAR sha256:%s (%d bytes)", nixbase32.encode(got.nar_sha256), got.nar_size)
        return rec

    # --- listings --------------------------------------------------------------------------

    async def get_listing(self, request: web.Request, path_hash: bytes) -> web.StreamResponse:
        info = await self._call(self.store.pathinfos.get, path_hash)
        if info is None or info.node is None:
            raise HttpError(404, "no such store path")
        pieces = listing(info.node, self.store.directories)
        resp = web.StreamResponse()
        resp.content_type = "application/json"
        try:
            data = await self._call(next, pieces, b"")
            await resp.prepare(request)
            while data:
                await self._timed(resp.write(data), "sending the listing")
                data = await self._call(next, pieces, b"")
        except (ConnectionError, asyncio.CancelledError):
            self._abort(request)
            raise
        except Exception as e:
            if not resp.prepared:
                raise
            log.warning("GET %s: listing cut short: %s", request.path[:120], _one_line(e))
            self._abort(request)
            return resp
        finally:
            _close(pieces)
        await resp.write_eof()
        await self._sent(request)
        return resp

    # --- request bodies --------------------------------------------------------------------

    @staticmethod
    def _check_encoding(request: web.Request) -> None:
        enc = request.headers.get("Content-Encoding", "identity").strip().lower()
        if enc not in ("", "identity"):
            raise HttpError(415, f"Content-Encoding {enc[:40]!r} is not accepted (send the body as is)")

    async def _read_limited(self, request: web.Request, limit: int, what: str) -> bytes:
        if request.content_length is not None and request.content_length > limit:
            raise HttpError(413, f"the {what} is {request.content_length} bytes, more than the limit of {limit}")
        parts: list[bytes] = []
        n = 0
        while True:
            chunk = await self._timed(request.content.readany(), f"receiving the {what}")
            if not chunk:
                return b"".join(parts)
            n += len(chunk)
            if n > limit:
                raise HttpError(413, f"the {what} is more than the limit of {limit} bytes")
            parts.append(chunk)

    async def _discard(self, request: web.Request) -> None:
        while await self._timed(request.content.readany(), "receiving the body"):
            pass
