"""Counting requests in a client → server byte stream, as a TCP proxy sees it (tests/tcpproxy.py).

gRPC calls: after the 24-byte HTTP/2 client preface, every HEADERS frame that opens a new client
stream id is one call. HTTP/1.x requests: request lines (headers and Content-Length or chunked
bodies are skipped, so a body never counts). No decoding beyond that (no HPACK, no payloads).
"""

from __future__ import annotations

import re

_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_H2_HEADERS = 0x1
_REQUEST_LINE = re.compile(rb"^[A-Z][A-Z-]* \S+ HTTP/\d\.\d$")


class RequestCounter:
    """Counts requests in one client → server byte stream, fed in pieces as they are read.

    HTTP/2 (the stream starts with the client preface): one per HEADERS frame opening a new,
    higher client stream id. HTTP/1.x: one per request line; header blocks are skipped, and so
    are bodies framed by Content-Length or chunked encoding. Anything it cannot follow stops
    the counting for that stream (it never guesses).
    """

    def __init__(self) -> None:
        self.kind: str | None = None  # "h2", "http1", or "unknown"
        self.count = 0
        self._buf = bytearray()
        # h2 state
        self._skip = 0
        self._max_stream = 0
        # http/1 state
        self._state = "line"  # line, headers, body, chunk-size, chunk-data, chunk-crlf, trailers
        self._length = 0
        self._chunked = False

    def feed(self, data: bytes) -> int:
        """Consume `data`; the number of new requests in it."""
        before = self.count
        if self.kind == "unknown" or not data:
            return 0
        if self.kind is None:
            self._buf += data
            head = bytes(self._buf[: len(_H2_PREFACE)])
            if _H2_PREFACE.startswith(head) and len(head) < len(_H2_PREFACE):
                return 0  # could still be the preface
            data = bytes(self._buf)
            self._buf.clear()
            if head == _H2_PREFACE:
                self.kind = "h2"
                data = data[len(_H2_PREFACE) :]
            else:
                self.kind = "http1"
        if self.kind == "h2":
            self._feed_h2(data)
        else:
            self._feed_http1(data)
        return self.count - before

    def _feed_h2(self, data: bytes) -> None:
        i, n = 0, len(data)
        while i < n:
            if self._skip:
                step = min(self._skip, n - i)
                self._skip -= step
                i += step
                continue
            need = 9 - len(self._buf)
            self._buf += data[i : i + need]
            i += min(need, n - i)
            if len(self._buf) < 9:
                return
            h = self._buf
            length = (h[0] << 16) | (h[1] << 8) | h[2]
            ftype = h[3]
            stream = int.from_bytes(h[5:9], "big") & 0x7FFFFFFF
            self._buf.clear()
            if ftype == _H2_HEADERS and stream % 2 == 1 and stream > self._max_stream:
                self._max_stream = stream
                self.count += 1
            self._skip = length

    def _feed_http1(self, data: bytes) -> None:
        self._buf += data
        buf = self._buf
        pos = 0
        while True:
            if self._state in ("body", "chunk-data"):
                step = min(self._length, len(buf) - pos)
                self._length -= step
                pos += step
                if self._length:
                    break
                self._state = "line" if self._state == "body" else "chunk-crlf"
                continue
            eol = buf.find(b"\n", pos)
            if eol < 0:
                if len(buf) - pos > 65536:  # no line that long in a request we can follow
                    self.kind = "unknown"
                break
            line = bytes(buf[pos:eol]).rstrip(b"\r")
            pos = eol + 1
            if not self._line(line):
                self.kind = "unknown"
                break
        del buf[:pos]

    def _line(self, line: bytes) -> bool:
        st = self._state
        if st == "line":
            if not line:
                return True  # stray CRLF between requests is allowed
            if not _REQUEST_LINE.match(line):
                return False
            self.count += 1
            self._state, self._length, self._chunked = "headers", 0, False
        elif st in ("headers", "trailers"):
            if line:
                if st == "headers":
                    name, _, value = line.partition(b":")
                    name = name.strip().lower()
                    if name == b"content-length":
                        try:
                            self._length = int(value.strip())
                        except ValueError:
                            return False
                    elif name == b"transfer-encoding" and b"chunked" in value.lower():
                        self._chunked = True
                return True
            if st == "trailers":
                self._state = "line"
            elif self._chunked:
                self._state = "chunk-size"
            else:
                self._state = "body" if self._length else "line"
        elif st == "chunk-size":
            try:
                size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                return False
            self._state, self._length = ("chunk-data", size) if size else ("trailers", 0)
            if size == 0:
                return True
        elif st == "chunk-crlf":
            if line:
                return False
            self._state = "chunk-size"
        return True
