"""A small threaded loopback TCP proxy for tests and the bench: counts bytes and requests on the
wire, adds latency and a bandwidth cap, injects faults.

`TcpProxy(upstream_port)` listens on 127.0.0.1:0 (`.port`) and forwards every connection to
127.0.0.1:`upstream_port`, counting bytes in each direction (`.up`: client → server, `.down`:
server → client, both counted when delivered). `.mode` can be switched at any time:

- "pass":  forward (connections held by "stall" resume without loss).
- "stall": new connections are accepted and read but never answered or forwarded; existing
           connections stop forwarding in both directions (the remote "hangs").
- "drop":  existing connections are closed; new ones are accepted and closed at once.

Latency and bandwidth (`TcpProxy(port, delay=0.005, rate=None)`, both settable later):
`delay` is a one-way delay in seconds per direction (0.005 → 10 ms round trip). Each piece of
data the proxy reads is delivered `delay` seconds after it was read, in order, with any number
of pieces in flight: a sender thread per direction works off a timed queue, so the delay
pipelines and never serialises. `rate` (bytes/s) paces each direction like a link of that
speed (a piece leaves when the link is free, then travels `delay`). Up to `window` bytes may be
in flight per direction; beyond that the proxy stops reading that side (TCP backpressure).
With `handshake` (default on), a new connection also pays the round trip of TCP's handshake:
no byte moves on it before 2 × `delay` after it was accepted (the client's connect() returns at
once here, so its first bytes arrive 3 × `delay` after it connected, as on a real link).

Requests: `.grpc_calls` counts gRPC calls (after the 24-byte HTTP/2 client preface, every
HEADERS frame that opens a new client stream id), `.http_requests` counts HTTP/1.x request
lines (headers and Content-Length/chunked bodies are skipped, so a body never counts), both in
the client → server stream as the proxy reads it. `.requests` is their sum; `reset_counts()`
zeroes bytes and requests (not `.connections`). `wait_quiet()` waits until the wire is idle.

With `drain_when_down` > 0, a connection whose upstream refuses is read (and its bytes counted
in `.up`) for that many seconds before it is closed, so "0 bytes on the wire" with the upstream
gone really means the client sent nothing.

Bounded: every socket operation has a short timeout, all threads are daemons that check a
stop flag, and `close()` (or leaving the `with` block) ends everything within ~0.5 s.
Not a general-purpose proxy: loopback only, no TLS, no HTTP/2 server-side parsing, no
reordering or loss model.
"""

from __future__ import annotations

import collections
import select
import socket
import threading
import time
from types import TracebackType

from wirecount import RequestCounter

_POLL = 0.1
_BUF = 1 << 18
_IO_TIMEOUT = 10.0  # a peer that stops reading for this long ends the connection
_FULL_POLL = 0.002  # how often a reader re-checks a full window
_PIECE = 16 << 10  # pacing granularity when a bandwidth cap is set
_EOF = b""  # queue marker: the source closed its sending side


class TcpProxy:
    def __init__(
        self,
        upstream_port: int,
        upstream_host: str = "127.0.0.1",
        *,
        delay: float = 0.0,
        rate: float | None = None,
        window: int = 16 << 20,
        drain_when_down: float = 0.0,
        handshake: bool = True,
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._lsock = socket.create_server(("127.0.0.1", 0))
        self._lsock.settimeout(_POLL)
        self.port: int = self._lsock.getsockname()[1]
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._conns: set[_Conn] = set()
        self._mode = "pass"
        self._delay = 0.0
        self._rate: float | None = None
        self.delay = delay
        self.rate = rate
        self.window = window
        self.handshake = handshake
        self.drain_when_down = drain_when_down
        self.up = 0
        self.down = 0
        self.grpc_calls = 0
        self.http_requests = 0
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
        else:
            self._wake_all()

    @property
    def delay(self) -> float:
        """One-way delay in seconds, each direction (round trip = 2 × delay)."""
        return self._delay

    @delay.setter
    def delay(self, value: float) -> None:
        if value < 0:
            raise ValueError("delay must be >= 0")
        self._delay = float(value)
        self._wake_all()

    @property
    def rate(self) -> float | None:
        """Bandwidth cap in bytes/s per direction, or None for none."""
        return self._rate

    @rate.setter
    def rate(self, value: float | None) -> None:
        if value is not None and value <= 0:
            raise ValueError("rate must be > 0 or None")
        self._rate = None if value is None else float(value)

    @property
    def total(self) -> int:
        return self.up + self.down

    @property
    def requests(self) -> int:
        """gRPC calls plus HTTP/1.x requests seen in the client → server streams."""
        return self.grpc_calls + self.http_requests

    def reset_counts(self) -> None:
        with self._lock:
            self.up = 0
            self.down = 0
            self.grpc_calls = 0
            self.http_requests = 0

    def wait_quiet(self, quiet: float = 0.5, limit: float = 5.0) -> int:
        """Wait (at most `limit` s) until no byte crossed for `quiet` s and nothing is queued; the total."""
        deadline = time.monotonic() + limit
        last, since = self.total, time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.02)
            now = self.total
            if now != last or self._queued():
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet:
                break
        return last

    def _queued(self) -> int:
        with self._lock:
            conns = list(self._conns)
        return sum(c.queued() for c in conns)

    def _wake_all(self) -> None:
        with self._lock:
            conns = list(getattr(self, "_conns", ()))
        for c in conns:
            c.wake()

    def _count(self, upstream: bool, n: int) -> None:
        with self._lock:
            if upstream:
                self.up += n
            else:
                self.down += n

    def _count_requests(self, grpc: int, http: int) -> None:
        with self._lock:
            self.grpc_calls += grpc
            self.http_requests += http

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


class _Pipe:
    """One direction of a connection: a timed queue and the thread that delivers it."""

    def __init__(self, conn: _Conn, dst: socket.socket, upstream: bool) -> None:
        self.conn = conn
        self.dst = dst
        self.upstream = upstream
        self.cond = threading.Condition()
        self.q: collections.deque[tuple[float, bytes]] = collections.deque()
        self.queued = 0
        self.sending = False
        self.link_free = 0.0  # when the paced link is next free
        self.done = False  # EOF delivered
        self.thread = threading.Thread(target=self._run, name="tcpproxy-send", daemon=True)

    def full(self) -> bool:
        return self.queued >= self.conn.proxy.window

    def put(self, data: bytes) -> None:
        """Queue `data` (read just now) for delivery; `_EOF` queues the end of this direction."""
        p = self.conn.proxy
        now = time.monotonic()
        delay, rate = p.delay, p.rate
        if p.handshake:
            now = max(now, self.conn.accepted + 2 * delay)
        if delay == 0 and rate is None:
            with self.cond:
                direct = not self.q and not self.sending
                if direct:
                    self.sending = True
            if direct:  # nothing queued or in flight: deliver from the reader, as a plain proxy does
                try:
                    self._deliver(data)
                finally:
                    with self.cond:
                        self.sending = False
                        self.cond.notify_all()
                return
        with self.cond:
            if rate is None or not data:
                self.q.append((now + delay, data))
            else:
                for i in range(0, len(data), _PIECE):
                    piece = data[i : i + _PIECE]
                    self.link_free = max(self.link_free, now) + len(piece) / rate
                    self.q.append((self.link_free + delay, piece))
            self.queued += len(data)
            self.cond.notify_all()

    def _deliver(self, data: bytes) -> None:
        if data is _EOF or not data:
            try:
                self.dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            self.done = True
            self.conn.wake()
            return
        self.dst.sendall(data)
        self.conn.proxy._count(self.upstream, len(data))

    def _run(self) -> None:
        conn, p = self.conn, self.conn.proxy
        try:
            while not conn.closed.is_set() and not p._stop.is_set():
                with self.cond:
                    if not self.q or self.sending or p.mode != "pass":
                        self.cond.wait(_POLL)
                        continue
                    due, data = self.q[0]
                    wait = due - time.monotonic()
                    if wait > 0:
                        self.cond.wait(min(wait, _POLL))
                        continue
                    self.q.popleft()
                    self.sending = True
                try:
                    self._deliver(data)
                finally:
                    with self.cond:
                        self.sending = False
                        self.queued -= len(data)
                        self.cond.notify_all()
                conn.wake()
        except OSError:
            conn.close()

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()


class _Conn:
    """One proxied connection: a reader thread selects on both sockets, a _Pipe per direction delivers."""

    def __init__(self, proxy: TcpProxy, client: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.server: socket.socket | None = None
        self.closed = threading.Event()
        self.accepted = time.monotonic()
        self.pipes: list[_Pipe] = []
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)

    def close(self) -> None:
        self.closed.set()
        self.wake()

    def wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        for pipe in self.pipes:
            pipe.wake()

    def queued(self) -> int:
        return sum(pipe.queued for pipe in self.pipes)

    def _connect(self) -> bool:
        try:
            self.server = socket.create_connection(self.proxy.upstream, timeout=2)
        except OSError:
            return False
        self.server.settimeout(_IO_TIMEOUT)
        self.server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return True

    def _drain_refused(self) -> None:
        """The upstream is down: read (and count) what the client sends for a while, then close."""
        p = self.proxy
        deadline = time.monotonic() + p.drain_when_down
        while time.monotonic() < deadline and not (self.closed.is_set() or p._stop.is_set()):
            r, _, _ = select.select([self.client], [], [], min(_POLL, max(0.0, deadline - time.monotonic())))
            if r:
                data = self.client.recv(_BUF)
                if not data:
                    return
                p._count(True, len(data))

    def run(self) -> None:
        p = self.proxy
        self.client.settimeout(_IO_TIMEOUT)
        self.client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            # a connection accepted while stalling never reaches the server: read and discard
            while p._mode == "stall" and self.server is None:
                if self.closed.is_set() or p._stop.is_set():
                    return
                r, _, _ = select.select([self.client], [], [], _POLL)
                if r and not self.client.recv(_BUF):
                    return
            if p._mode == "drop":
                return
            if not self._connect():
                if p.drain_when_down > 0:
                    self._drain_refused()
                return
            assert self.server is not None
            up = _Pipe(self, self.server, True)
            down = _Pipe(self, self.client, False)
            self.pipes = [up, down]
            for pipe in self.pipes:
                pipe.thread.start()
            self._pump(up, down)
        except OSError:
            return
        finally:
            self.closed.set()
            for pipe in self.pipes:
                pipe.wake()
            _close(self.client)
            if self.server is not None:
                _close(self.server)
            _close(self._wake_r)
            _close(self._wake_w)
            p._forget(self)

    def _pump(self, up: _Pipe, down: _Pipe) -> None:
        p = self.proxy
        assert self.server is not None
        counter = RequestCounter()
        sources = {self.client: up, self.server: down}
        eof: set[socket.socket] = set()
        while not (self.closed.is_set() or p._stop.is_set()):
            if up.done and down.done:
                return
            if p._mode != "pass":  # stall: hold both directions (data waits in the kernel)
                self.closed.wait(_POLL)
                continue
            ready = [s for s, pipe in sources.items() if s not in eof and not pipe.full()]
            timeout = _FULL_POLL if len(ready) + len(eof) < len(sources) else _POLL
            r, _, _ = select.select([*ready, self._wake_r], [], [], timeout)
            for s in r:
                if s is self._wake_r:
                    try:
                        self._wake_r.recv(4096)
                    except OSError:
                        pass
                    continue
                data = s.recv(_BUF)
                pipe = sources[s]
                if not data:
                    eof.add(s)
                    pipe.put(_EOF)
                    continue
                if s is self.client and (n := counter.feed(data)):
                    if counter.kind == "h2":
                        p._count_requests(n, 0)
                    else:
                        p._count_requests(0, n)
                pipe.put(data)
