"""`BridgeServer`: a `Bridge` listening on one address, its event loop in a thread of its own.

`start()` binds (`HOST:PORT`, `[V6]:PORT`, port 0 for an ephemeral one, or `unix:/path`) and
returns the URL it listens on once requests are answered; a bad or busy address is a
StoreError. `stop(grace)` stops accepting, lets in-flight requests finish for up to `grace`
seconds, then closes what is left; `hurry()` (a second signal) cuts that short. The same
object serves `tvix-store nar-bridge` (the main thread waits for a signal) and
`tvix-store daemon --nar-bridge` (next to the gRPC server, over the same Store).

Server settings (aiohttp): no access log (refusals are logged by `app`), request bodies are
never decompressed by the server (`Content-Encoding` is refused in `app`), header lines and
fields bounded by aiohttp's defaults (8 KiB), idle keep-alive connections closed after
`KEEPALIVE` seconds. With an `ssl_context` (from `--tls-cert`/`--tls-key`) it serves HTTPS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import stat
import threading

from aiohttp import web

from tvix_store.core.errors import StoreError, ValidationError
from tvix_store.narbridge.app import Bridge

log = logging.getLogger("tvix_store.narbridge")

DEFAULT_LISTEN = "127.0.0.1:9000"
#: seconds an idle keep-alive connection stays open
KEEPALIVE = 75.0
#: bytes aiohttp reads from a socket at once (uploads)
READ_BUFSIZE = 1 << 20


def parse_listen(address: str) -> tuple[str, int] | str:
    """(host, port) of `HOST:PORT` / `[V6]:PORT`, or the absolute path of `unix:/path`."""
    if address.startswith("unix:"):
        path = address[len("unix:") :]
        if not path:
            raise ValidationError(f"invalid listen address {address!r}: expected unix:/path")
        return os.path.abspath(path)
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValidationError(f"invalid listen address {address!r}: expected HOST:PORT or unix:/path")
    if host.startswith("[") != host.endswith("]"):
        raise ValidationError(f"invalid listen address {address!r}: unbalanced brackets")
    return host.strip("[]"), int(port)


class BridgeServer:
    """See the module docstring."""

    def __init__(
        self,
        bridge: Bridge,
        listen: str = DEFAULT_LISTEN,
        *,
        grace: float = 20.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.bridge = bridge
        self.ssl_context = ssl_context
        self.target = parse_listen(listen)
        self.listen = listen
        self.grace = grace
        self.url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._main: asyncio.Task[None] | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="nar-bridge-loop", daemon=True)

    def start(self) -> str:
        """Bind and serve; the URL once ready. StoreError if the address cannot be used."""
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self.url

    def stop(self) -> None:
        """Stop accepting, finish in-flight requests (up to `grace` s), release everything."""
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join()
        self.bridge.close()

    def hurry(self) -> None:
        """Cut a graceful stop short: in-flight requests are cancelled."""
        if self._loop is not None and self._main is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._main.cancel)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except asyncio.CancelledError:
            log.warning("nar-bridge: in-flight requests cancelled")
        except BaseException as e:  # noqa: BLE001 - handed to start() or logged
            if not self._ready.is_set():
                self._error = e
            else:
                log.error("nar-bridge stopped: %s", e)
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._main = asyncio.current_task()
        runner = web.AppRunner(
            self.bridge.application(),
            access_log=None,
            shutdown_timeout=self.grace,
            auto_decompress=False,
            keepalive_timeout=KEEPALIVE,
            read_bufsize=READ_BUFSIZE,
        )
        await runner.setup()
        try:
            site: web.BaseSite
            if isinstance(self.target, str):
                _unlink_stale_socket(self.target)
                site = web.UnixSite(runner, self.target)
            else:
                site = web.TCPSite(
                    runner, self.target[0], self.target[1], reuse_address=True, ssl_context=self.ssl_context
                )
            try:
                await site.start()
            except OSError as e:
                raise StoreError(f"cannot listen on {self.listen}: {e.strerror or e}") from None
            if isinstance(self.target, str):
                self.url = f"unix:{self.target}"
            else:
                host, port = runner.addresses[0][:2]
                scheme = "https" if self.ssl_context is not None else "http"
                self.url = f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"
            self._ready.set()
            await self._stop.wait()
            log.info("nar-bridge: stopping, finishing in-flight requests (up to %g s)", self.grace)
        finally:
            await runner.cleanup()
            if isinstance(self.target, str) and self.url:
                with contextlib.suppress(OSError):
                    os.unlink(self.target)


def _unlink_stale_socket(path: str) -> None:
    """Remove a socket file nobody listens on any more (a killed bridge's), as gRPC does."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return  # not a socket: binding fails with a clear error
    except FileNotFoundError:
        return
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)
        except OSError:
            pass
