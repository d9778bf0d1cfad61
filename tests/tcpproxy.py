"""A small threaded loopback TCP proxy for tests: counts the bytes on the wire, injects faults.

`TcpProxy(upstream_port)` listens on 127.0.0.1:0 (`.port`) and forwards every connection to
127.0.0.1:`upstream_port`, counting bytes in each direction (`.up`: client → server, `.down`:
server → client). `.mode` can be switched at any time:

- "pass":  forward (connections held by "stall" resume without loss).
- "stall": new connections are accepted and read but never answered or forwarded; existing
           connections stop forwarding in both directions (the remote "hangs").
- "drop":  existing connections are closed; new ones are accepted and closed at once.

Bounded: every socket operation has a short timeout, all threads are daemons that check a
stop flag, and `close()` (or leaving the `with` block) ends everything within ~0.5 s.
Not a general-purpose proxy: loopback only, no TLS, no HTTP awareness.
"""

from __future__ import annotations

import select
import socket
import threading
from types import TracebackType

_POLL = 0.1
_BUF = 1 << 18
_IO_TIMEOUT = 10.0  # a peer that stops reading for this long ends the connection


class TcpProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self._lsock = socket.create_server(("127.0.0.1", 0))
        self._lsock.settimeout(_POLL)
        self.port: int = self._lsock.getsockname()[1]
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._conns: set[_Conn] = set()
        self._mode = "pass"
        self.up = 0
        self.down = 0
        self.connections = 0
        self._thread = threading.Thread(target=self._accept_loop, name="tcpproxy-accept", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"grpc+http://127.0.0.1:{self.port}"

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in ("pass", "stall", "drop"):
            raise ValueError(f"unknown proxy mode {value!r}")
        self._mode = value
        if value == "drop":
            with self._lock:
                conns = list(self._conns)
            for c in conns:
                c.close()

    @property
    def total(self) -> int:
        return self.up + self.down

    def reset_counts(self) -> None:
        with self._lock:
            self.up = 0
            self.down = 0

    def _count(self, upstream: bool, n: int) -> None:
        with self._lock:
            if upstream:
                self.up += n
            else:
                self.down += n

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._lsock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            mode = self._mode
            if mode == "drop":
                _close(client)
                continue
            conn = _Conn(self, client)
            with self._lock:
                self._conns.add(conn)
            threading.Thread(target=conn.run, name="tcpproxy-conn", daemon=True).start()

    def _forget(self, conn: _Conn) -> None:
        with self._lock:
            self._conns.discard(conn)

    def close(self) -> None:
        self._stop.set()
        _close(self._lsock)
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            c.close()
        self._thread.join(timeout=1)

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _close(s: socket.socket) -> None:
    try:
        s.close()
    except OSError:
        pass


class _Conn:
    """One proxied connection: a single thread pumps both directions with select()."""

    def __init__(self, proxy: TcpProxy, client: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.server: socket.socket | None = None
        self._closed = threading.Event()

    def close(self) -> None:
        self._closed.set()

    def _connect(self) -> bool:
        try:
            self.server = socket.create_connection(self.proxy.upstream, timeout=2)
        except OSError:
            return False
        self.server.settimeout(_IO_TIMEOUT)
        self.server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return True

    def run(self) -> None:
        p = self.proxy
        self.client.settimeout(_IO_TIMEOUT)
        self.client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            # a connection accepted while stalling never reaches the server: read and discard
            while p._mode == "stall" and self.server is None:
                if self._closed.is_set() or p._stop.is_set():
                    return
                r, _, _ = select.select([self.client], [], [], _POLL)
                if r and not self.client.recv(_BUF):
                    return
            if p._mode == "drop" or not self._connect():
                return
            assert self.server is not None
            pairs = {self.client: (self.server, True), self.server: (self.client, False)}
            while not (self._closed.is_set() or p._stop.is_set()):
                if p._mode != "pass":  # stall: hold both directions (data waits in the kernel)
                    self._closed.wait(_POLL)
                    continue
                r, _, _ = select.select(list(pairs), [], [], _POLL)
                for s in r:
                    data = s.recv(_BUF)
                    if not data:
                        return
                    dst, upstream = pairs[s]
                    dst.sendall(data)
                    p._count(upstream, len(data))
        except OSError:
            return
        finally:
            _close(self.client)
            if self.server is not None:
                _close(self.server)
            p._forget(self)
