"""Self-test of tests/tcpproxy.py: the delay pipelines, the bandwidth cap paces, the fault modes
still work with a delay, and the request counts (HTTP/1.1 and gRPC) are exact.

Timing asserts are lower bounds implied by the delay, plus one generous upper bound where
pipelining is the point (far below what serialised delays would take). Readiness is never a
sleep: servers are listening before the proxy is built, and reads block until data arrives.
"""

from __future__ import annotations

import http.client
import http.server
import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from mountutil import wait_until
from tcpproxy import TcpProxy
from wirecount import RequestCounter


class EchoServer:
    """Echoes every byte back on each connection (one thread per connection)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._threads: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(c,), daemon=True).start()

    @staticmethod
    def _echo(c: socket.socket) -> None:
        with c:
            while data := c.recv(65536):
                c.sendall(data)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    srv = EchoServer()
    yield srv
    srv.close()


def recv_exactly(s: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        data = s.recv(n - len(out))
        assert data, "connection closed early"
        out += data
    return bytes(out)


def test_round_trip_takes_at_least_twice_the_delay(echo: EchoServer) -> None:
    delay = 0.05
    with TcpProxy(echo.port, delay=delay) as px, socket.create_connection(("127.0.0.1", px.port), timeout=10) as s:
        for _ in range(3):
            t = time.monotonic()
            s.sendall(b"ping")
            assert recv_exactly(s, 4) == b"ping"
            assert time.monotonic() - t >= 2 * delay
        # a piece is counted once its sendall returned, which may be just after the peer got it
        wait_until(lambda: px.up == px.down == 12, 5, "the counts of what was delivered")


def test_a_new_connection_pays_the_handshake_round_trip(echo: EchoServer) -> None:
    delay = 0.05
    with TcpProxy(echo.port, delay=delay) as px:
        t = time.monotonic()
        with socket.create_connection(("127.0.0.1", px.port), timeout=10) as s:
            s.sendall(b"x")
            assert recv_exactly(s, 1) == b"x"
        assert time.monotonic() - t >= 4 * delay  # handshake round trip + the request's round trip


def test_pipelined_writes_are_not_serialised_by_the_delay(echo: EchoServer) -> None:
    delay, n = 0.05, 40
    with TcpProxy(echo.port, delay=delay) as px, socket.create_connection(("127.0.0.1", px.port), timeout=10) as s:
        msgs = [f"m{i:04}".encode() for i in range(n)]
        t = time.monotonic()
        for m in msgs:  # separate segments, each written before the previous one came back
            s.sendall(m)
            time.sleep(0.002)
        got = recv_exactly(s, sum(len(m) for m in msgs))
        took = time.monotonic() - t
    assert got == b"".join(msgs)  # order kept
    assert took >= 2 * delay
    assert took < n * 2 * delay / 4, f"{n} pipelined writes took {took:.2f} s: the delay serialises them"


def test_delay_can_be_set_later_and_zero_again(echo: EchoServer) -> None:
    with TcpProxy(echo.port) as px, socket.create_connection(("127.0.0.1", px.port), timeout=10) as s:
        s.sendall(b"a")
        assert recv_exactly(s, 1) == b"a"
        px.delay = 0.1
        t = time.monotonic()
        s.sendall(b"b")
        assert recv_exactly(s, 1) == b"b"
        assert time.monotonic() - t >= 0.2
        px.delay = 0
        s.sendall(b"c")
        assert recv_exactly(s, 1) == b"c"


def test_bandwidth_cap_paces(echo: EchoServer) -> None:
    rate, size = 2e6, 500_000  # each direction: 0.25 s at 2 MB/s
    with TcpProxy(echo.port, rate=rate) as px, socket.create_connection(("127.0.0.1", px.port), timeout=10) as s:
        payload = bytes(range(256)) * (size // 256)
        t = time.monotonic()
        threading.Thread(target=s.sendall, args=(payload,), daemon=True).start()
        assert recv_exactly(s, len(payload)) == payload
        assert time.monotonic() - t >= len(payload) / rate


def test_stall_and_drop_still_work_with_a_delay(echo: EchoServer) -> None:
    with TcpProxy(echo.port, delay=0.02) as px, socket.create_connection(("127.0.0.1", px.port), timeout=10) as s:
        s.sendall(b"1")
        assert recv_exactly(s, 1) == b"1"
        px.mode = "stall"
        s.sendall(b"2")
        s.settimeout(0.3)
        with pytest.raises(TimeoutError):
            s.recv(1)  # held while stalled, however long
        s.settimeout(10)
        px.mode = "pass"
        assert recv_exactly(s, 1) == b"2"  # resumed without loss
        px.mode = "drop"
        assert s.recv(1) == b""  # closed by the proxy
    with TcpProxy(echo.port, delay=0.02) as px:
        px.mode = "drop"
        with socket.create_connection(("127.0.0.1", px.port), timeout=10) as s2:
            assert s2.recv(1) == b""
        assert px.connections == 1


def test_upstream_gone_is_counted_with_drain_when_down() -> None:
    port = socket.create_server(("127.0.0.1", 0))
    dead = port.getsockname()[1]
    port.close()
    with TcpProxy(dead, drain_when_down=5) as px, socket.create_connection(("127.0.0.1", px.port), timeout=10) as s:
        s.sendall(b"hello")
        s.shutdown(socket.SHUT_WR)
        assert s.recv(1) == b""  # closed once the client is done
        assert px.up == 5


class _Quiet(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def do_POST(self) -> None:  # noqa: N802
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            body = b""
            while size := int(self.rfile.readline().split(b";")[0], 16):
                body += self.rfile.read(size)
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_http1_requests_are_counted_exactly(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x" * 10_000)
    handler = lambda *a: _Quiet(*a, directory=str(tmp_path))  # noqa: E731
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        with TcpProxy(srv.server_address[1], delay=0.005) as px:
            conn = http.client.HTTPConnection("127.0.0.1", px.port, timeout=10)
            for _ in range(5):  # keep-alive: five requests on one connection
                conn.request("GET", "/f")
                assert conn.getresponse().read() == b"x" * 10_000
            body = b"GET /f HTTP/1.1\r\nHost: x\r\n\r\n" * 3  # a body that looks like requests
            conn.request("POST", "/", body=body)
            assert conn.getresponse().read() == body
            chunks = [b"GET / HTTP/1.1\r\n\r\n", b"abc"]
            conn.request("POST", "/", body=iter(chunks))  # chunked
            assert conn.getresponse().read() == b"".join(chunks)
            conn.close()
            other = http.client.HTTPConnection("127.0.0.1", px.port, timeout=10)
            other.request("HEAD", "/f")
            other.getresponse().read()
            other.close()
            assert px.http_requests == 8
            assert px.grpc_calls == 0 and px.requests == 8
            px.reset_counts()
            assert px.requests == px.up == px.down == 0
    finally:
        srv.shutdown()
        srv.server_close()


def test_grpc_calls_are_counted_exactly() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = health.HealthServicer()
    servicer.set("svc", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with TcpProxy(port, delay=0.005) as px:
            with grpc.insecure_channel(px.address) as ch:
                stub = health_pb2_grpc.HealthStub(ch)
                for _ in range(7):
                    r = stub.Check(health_pb2.HealthCheckRequest(service="svc"), timeout=10)
                    assert r.status == health_pb2.HealthCheckResponse.SERVING
                assert px.grpc_calls == 7
                px.reset_counts()
                fs = [stub.Check.future(health_pb2.HealthCheckRequest(service="svc"), timeout=10) for _ in range(5)]
                assert all(f.result().status == health_pb2.HealthCheckResponse.SERVING for f in fs)
                assert px.grpc_calls == 5 and px.http_requests == 0
    finally:
        server.stop(None)


def test_request_counter_follows_frames_split_anywhere() -> None:
    def h2_frame(ftype: int, stream: int, payload: bytes) -> bytes:
        return len(payload).to_bytes(3, "big") + bytes([ftype, 0]) + stream.to_bytes(4, "big") + payload

    stream = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + h2_frame(4, 0, b"")  # preface, SETTINGS
    for sid in (1, 3, 5):
        stream += h2_frame(1, sid, b"\x01" * 50) + h2_frame(0, sid, b"\x00" * 300)  # HEADERS, DATA
    stream += h2_frame(1, 5, b"\x02" * 10)  # trailers on an open stream: not a new call
    for step in (1, 7, 1000):
        c = RequestCounter()
        for i in range(0, len(stream), step):
            c.feed(stream[i : i + step])
        assert (c.kind, c.count) == ("h2", 3)
