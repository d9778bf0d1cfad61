"""The subjects of the latency rows: one cold operation on a fresh mount behind a delaying link.

Every subject runs the same operation (`Op`: a timed read of a path, with its content check) on
a mount made fresh for each run, after the page cache was dropped, and counts the requests that
crossed tests/tcpproxy.py's TcpProxy during the timed part (gRPC calls, or HTTP requests):

- `tvix_subject`: a fresh `tvix-store daemon` over the main store, the proxy with the given
  one-way delay in front of it, `tvix-store mount --store grpc+http://PROXY --cache-dir EMPTY`.
- `casync_subject`: `casync mount --store=http://PROXY/store` of the index, the casync store
  served by `python3 -m http.server` (HTTP/1.1 keep-alive) behind the proxy.
- `rclone_subject`: `rclone mount :http:` of nginx serving big and the tree, behind the proxy.
- `local_subject`: the tvix mount of the local store (no link at all).

Not the rows themselves (what is compared with what, goals): see `rows_latency`.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .peers import casync_mount, ensure_casync, rclone_mount, rclone_www
from .procs import HttpServer, Nginx, Proxy
from .results import Measurement
from .runner import Bench, Subject

#: the timed operation: (path, cap) -> seconds; raises BenchError on wrong content, Capped at the cap
Op = Callable[[Path, float], float]
#: where the operation's path is on a mount: (mount root) -> path
Where = Callable[[Path], Path]


@dataclass
class Counted:
    """A subject's measurement plus the requests its timed runs sent through the proxy."""

    m: Measurement
    delay: float | None = None  # one-way delay of its link (None: no link)
    kind: str = "gRPC calls"
    requests: list[int] = field(default_factory=list)

    @property
    def rtt(self) -> float:
        return 2 * (self.delay or 0.0)

    def median_requests(self) -> float | None:
        return statistics.median(self.requests) if self.requests else None

    def note_requests(self) -> None:
        if self.requests:
            counts = ", ".join(str(r) for r in self.requests)
            self.m.note = "; ".join(x for x in (self.m.note, f"{self.kind} per run at the proxy: {counts}") if x)


def label(what: str, delay: float | None) -> str:
    return what if delay is None else f"{what} @{2000 * delay:g} ms RTT"


def tvix_subject(
    b: Bench, delay: float, m: Measurement, where: Where, op: Op, pre: Callable[[Path], None] | None = None
) -> tuple[Subject, Counted]:
    """A fresh daemon, proxy and remote mount (empty cache) for every run; caches dropped before `op`."""
    c = Counted(m, delay)

    def once(_v: object, i: int, cap: float) -> float:
        with b.daemon() as dmn, Proxy(dmn.port, delay=delay) as px, b.remote_mount(px.url) as mnt:
            target = where(mnt.mnt)
            if pre is not None:
                pre(target)
            b.cold()
            px.reset_counts()
            t = op(target, cap)
            c.requests.append(px.grpc_calls)
            return t

    return Subject(m, once), c


def local_subject(b: Bench, m: Measurement, where: Where, op: Op, pre: Callable[[Path], None] | None = None) -> Subject:
    def once(_v: object, i: int, cap: float) -> float:
        with b.local_mount() as mnt:
            target = where(mnt.mnt)
            if pre is not None:
                pre(target)
            b.cold()
            return op(target, cap)

    return Subject(m, once)


def casync_subject(
    b: Bench, which: str, delay: float, m: Measurement, where: Where, op: Op, pre: Callable[[Path], None] | None = None
) -> tuple[Subject, Counted]:
    """casync mount over HTTP through the delaying proxy; `where` gets the mount root."""
    c = Counted(m, delay, kind="HTTP requests")

    @contextlib.contextmanager
    def served() -> Iterator[Proxy]:
        with HttpServer(b.casync[which], b.logfile("http")) as srv, Proxy(srv.port, delay=delay) as px:
            yield px

    def once(px: Proxy, i: int, cap: float) -> float:
        with casync_mount(b, which, store=f"http://127.0.0.1:{px.port}/store") as mnt:
            target = where(mnt.mnt)
            if pre is not None:
                pre(target)
            b.cold()
            px.reset_counts()
            t = op(target, cap)
            c.requests.append(px.http_requests)
            return t

    return Subject(m, once, session=served, setup=lambda: ensure_casync(b, which)), c


def rclone_subject(
    b: Bench, delay: float, m: Measurement, where: Where, op: Op, pre: Callable[[Path], None] | None = None
) -> tuple[Subject, Counted]:
    """rclone mount :http: of nginx (big, tree/) through the delaying proxy, a fresh rclone each run."""
    c = Counted(m, delay, kind="HTTP requests")

    @contextlib.contextmanager
    def served() -> Iterator[Proxy]:
        www = rclone_www(b)
        with Nginx(www, b.fresh("nginx")) as ngx, Proxy(ngx.port, delay=delay) as px:
            yield px

    def once(px: Proxy, i: int, cap: float) -> float:
        with rclone_mount(b, f"http://127.0.0.1:{px.port}/") as mnt:
            target = where(mnt.mnt)
            if pre is not None:
                pre(target)
            b.cold()
            px.reset_counts()
            t = op(target, cap)
            c.requests.append(px.http_requests)
            return t

    return Subject(m, once, session=served), c
