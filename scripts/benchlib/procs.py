"""The long-running processes of the bench: FUSE mounts, the tvix daemon, static HTTP servers, proxies.

Every one registers its own undo with `CLEANUP` when it starts and runs it when its `with`
block ends, so nothing outlives a row, a failure or Ctrl-C. Mounts are
`tests/mountutil.py`'s `ForegroundMount`/`MountProc` (readiness by polling, polite then lazy
unmount); proxies are `tests/tcpproxy.py`'s `TcpProxy` (byte and request counts, delay).

Not generic service management: loopback only, one process per object, logs under the
bench's temp dir.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType

from mountutil import ForegroundMount, MountProc
from tcpproxy import TcpProxy

from .util import CLEANUP, BenchError, free_port, stop_process, tail, warn


class Mount:
    """A FUSE server in the foreground (our child, own session); `.mnt` is mounted inside the `with`."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        mnt: Path,
        logfile: Path,
        *,
        env: dict[str, str] | None = None,
        ready: float = 90,
        tvix_url: str | None = None,
        tvix_extra: tuple[str, ...] = (),
    ) -> None:
        self.name, self.argv, self.mnt, self.logfile, self.env, self.ready = name, argv, mnt, logfile, env, ready
        self.tvix_url, self.tvix_extra = tvix_url, tvix_extra
        self.fm: ForegroundMount | None = None
        self._key = 0

    def __enter__(self) -> Mount:
        self.mnt.mkdir(parents=True, exist_ok=True)
        if os.path.ismount(self.mnt):
            raise BenchError(f"{self.mnt} is already a mount point")
        try:
            if self.tvix_url is not None:  # argv is the tvix-store command
                self.fm = MountProc(
                    self.mnt,
                    self.tvix_url,
                    *self.tvix_extra,
                    log_path=self.logfile,
                    argv0=self.argv,
                    env=self.env,
                    timeout=self.ready,
                    new_session=True,
                )
            else:
                self.fm = ForegroundMount(
                    self.argv, self.mnt, log_path=self.logfile, env=self.env, timeout=self.ready, new_session=True
                )
        except AssertionError as e:
            raise BenchError(f"{self.name}: {e}: {tail(self.logfile)}") from None
        fm, name = self.fm, self.name
        self._key = CLEANUP.add(f"unmount {self.mnt}", lambda: _release(fm, name))
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        CLEANUP.run(self._key)


#: seconds a FUSE server may take to exit after its unmount, or a daemon after SIGTERM, before it is killed
EXIT_GRACE = 5.0


def _release(fm: ForegroundMount, name: str) -> None:
    if not fm.release(grace=EXIT_GRACE):
        warn(f"{name} did not exit within {EXIT_GRACE:g} s of its unmount (ended with SIGTERM/SIGKILL)")


def _stop_daemon(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(EXIT_GRACE)
    except subprocess.TimeoutExpired:
        warn(f"tvix-store daemon did not exit within {EXIT_GRACE:g} s of SIGTERM (killed)")
        stop_process(proc, 1)


class Daemon:
    """`tvix-store daemon --listen 127.0.0.1:0`, ready once it logs `listening on HOST:PORT`."""

    def __init__(
        self, ts: list[str], store_url: str, logfile: Path, ready: float = 60, extra: tuple[str, ...] = ()
    ) -> None:
        self.logfile = logfile
        self.proc = subprocess.Popen(
            [*ts, "daemon", "--listen", "127.0.0.1:0", "--store", store_url, *extra],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        proc = self.proc
        self._key = CLEANUP.add("stop daemon", lambda: _stop_daemon(proc))
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._drain, args=(lines,), daemon=True).start()
        deadline = time.monotonic() + ready
        while True:
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                line = ""
            if line is None:
                self.stop()
                raise BenchError(f"daemon exited ({proc.wait()}) before ready: {tail(logfile)}")
            m = re.search(r"listening on (\S+)", line)
            if m:
                host, _, port = m.group(1).rpartition(":")
                self.host, self.port = host.strip("[]"), int(port)
                break
            if time.monotonic() > deadline:
                self.stop()
                raise BenchError(f"daemon not ready within {ready:.0f} s: {tail(logfile)}")

    def _drain(self, lines: queue.Queue[str | None]) -> None:
        assert self.proc.stderr is not None
        with open(self.logfile, "ab") as lf:
            for raw in self.proc.stderr:
                lf.write(raw)
                lf.flush()
                lines.put(raw.decode(errors="replace"))
        lines.put(None)

    @property
    def url(self) -> str:
        return f"grpc+http://{self.host}:{self.port}"

    def stop(self) -> None:
        CLEANUP.run(self._key)

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Proxy(TcpProxy):
    """tests/tcpproxy.py's TcpProxy, closed by the bench's cleanup too."""

    def __init__(self, upstream_port: int, *, delay: float = 0.0, drain_when_down: float = 0.0) -> None:
        super().__init__(upstream_port, delay=delay, drain_when_down=drain_when_down)
        self._key = CLEANUP.add("close proxy", super().close)

    def close(self) -> None:
        CLEANUP.run(self._key)

    @property
    def rtt_ms(self) -> float:
        return 2000 * self.delay


class HttpServer:
    """`python3 -m http.server -b 127.0.0.1` over a directory, as BENCH.md serves casync stores.

    HTTP/1.0, a connection per request (through the delaying proxy each pays its handshake). Not
    `-p HTTP/1.1`: its keep-alive connections meet Nagle (the server sets no TCP_NODELAY) and
    delayed ACKs, ~33 ms per small response even on loopback."""

    def __init__(self, directory: Path, logfile: Path) -> None:
        with open(logfile, "ab") as lf:
            self.proc = subprocess.Popen(
                [sys.executable, "-u", "-m", "http.server", "-b", "127.0.0.1"] + ["--directory", str(directory), "0"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=lf,
                start_new_session=True,
            )
        srv = self.proc
        self._key = CLEANUP.add("stop http.server", lambda: stop_process(srv))
        lines: queue.Queue[bytes] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in srv.stdout or []], daemon=True).start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.2).decode(errors="replace")
            except queue.Empty:
                if srv.poll() is not None:
                    break
                continue
            if mt := re.search(r"port (\d+)", line):
                self.port = int(mt.group(1))
                return
        self.stop()
        raise BenchError(f"http.server did not start: {tail(logfile)}")

    def stop(self) -> None:
        CLEANUP.run(self._key)

    def __enter__(self) -> HttpServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


NGINX_CONF = """master_process off;
daemon off;
worker_processes 1;
error_log {d}/error.log;
pid {d}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {d}/tmp; proxy_temp_path {d}/tmp; fastcgi_temp_path {d}/tmp;
  uwsgi_temp_path {d}/tmp; scgi_temp_path {d}/tmp;
  sendfile on;
  keepalive_requests 1000000;
  keepalive_timeout 300s;
  server {{
    listen 127.0.0.1:{port};
    root {root};
    autoindex on;
  }}
}}
"""


class Nginx:
    """nginx from Debian serving `root` statically on 127.0.0.1 (keep-alive, Range, autoindex)."""

    def __init__(self, root: Path, workdir: Path, template: str = NGINX_CONF) -> None:
        (workdir / "tmp").mkdir(parents=True, exist_ok=True)
        for attempt in range(5):
            self.port = free_port()
            conf = workdir / "nginx.conf"
            conf.write_text(template.format(d=workdir, port=self.port, root=root))
            with open(workdir / "stderr.log", "ab") as lf:
                self.proc = subprocess.Popen(
                    ["nginx", "-c", str(conf), "-p", str(workdir)],
                    stdin=subprocess.DEVNULL,
                    stdout=lf,
                    stderr=lf,
                    start_new_session=True,
                )
            proc = self.proc
            self._key = CLEANUP.add("stop nginx", lambda p=proc: stop_process(p))
            if self._wait_ready():
                return
            self.stop()
            if attempt == 4:
                raise BenchError(f"nginx did not start: {tail(workdir / 'error.log')} {tail(workdir / 'stderr.log')}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        CLEANUP.run(self._key)

    def __enter__(self) -> Nginx:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
