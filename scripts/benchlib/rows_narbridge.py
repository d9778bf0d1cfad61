"""Row group `narbridge`: `tvix-store nar-bridge` as a Nix binary cache, beside nginx serving the
same closure as a static binary cache (`nix copy --to file://DIR`), all on loopback.

Rows (BENCH.md):
- `nix copy --from` the bridge of the closure tree + big into a fresh chroot store, with
  `require-sigs` (the bridge signs with its key; the static cache was signed by `nix copy`),
  beside the same from nginx serving `file://DIR?compression=none`. Run 1 of each is checked
  by `nix-store --verify --check-contents` in the destination (NarHash and content address).
- `nix copy --to` the bridge (a fresh bridge and store each run) with compression none, beside
  `nix copy --to file://DIR` with the same compression (the reference of the goal) and, as a
  second reference, nginx accepting the uploads by WebDAV PUT: what any HTTP cache costs with
  this Nix, whose HTTP upload path holds each NAR in memory and is slower than file:// by itself.
- `nix copy --to` with xz, tree only (xz of 512 MiB of random bytes takes Nix minutes, for the
  file:// reference alike), beside `file://DIR?compression=xz`.
- narinfo GETs per second from `wrk` with 16 connections, beside nginx serving the static
  cache's narinfos.

Every nix call gets a fresh XDG_CACHE_HOME (Nix keeps narinfos of caches it used in
~/.cache/nix) and `substituters = ` (no network). The store paths are those of
`nix-store --add` (content-addressed), added to /nix/store for the group and deleted after.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .peers import nix_delete
from .procs import Nginx
from .results import Measurement, row_of
from .runner import Bench, Subject, interleave
from .util import CLEANUP, BenchError, log, run, stop_process, tail

NIX = ["nix", "--extra-experimental-features", "nix-command"]
NO_SUBST = ["--option", "substituters", ""]

NGINX_DAV_CONF = """master_process off;
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
  client_max_body_size 0;
  keepalive_requests 1000000;
  server {{
    listen 127.0.0.1:{port};
    root {root};
    dav_methods PUT;
    create_full_put_path on;
  }}
}}
"""

WRK_LUA = """
paths = {{{paths}}}
i = 0
request = function()
  i = i + 1
  return wrk.format("GET", paths[(i % #paths) + 1])
end
"""


class NarBridge:
    """`tvix-store nar-bridge --listen 127.0.0.1:0`, ready once it logs its URL."""

    def __init__(self, b: Bench, store: Path, *extra: str, ready: float = 60) -> None:
        self.logfile = b.logfile("nar-bridge")
        argv = [*b.ts, "nar-bridge", "--listen", "127.0.0.1:0", "--store", f"local://{store}", *extra]
        with open(self.logfile, "ab") as lf:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=lf, start_new_session=True
            )
        proc = self.proc
        self._key = CLEANUP.add("stop nar-bridge", lambda: stop_process(proc))
        deadline = time.monotonic() + ready
        while True:
            m = re.search(r"nar-bridge listening on (http://\S+)", self.logfile.read_text(errors="replace"))
            if m:
                self.url = m.group(1)
                return
            if proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise BenchError(f"nar-bridge did not start: {tail(self.logfile)}")
            time.sleep(0.05)

    def stop(self) -> None:
        CLEANUP.run(self._key)

    def __enter__(self) -> NarBridge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Ctx:
    """What the rows share: the nix paths, the key pair, the static caches."""

    def __init__(self, b: Bench) -> None:
        self.b = b
        self.n = 0
        d = b.data
        self.paths: list[str] = []
        for src in (d.tree, d.big):
            out = run(["nix-store", "--add", str(src)], timeout=600).stdout.decode().strip()
            CLEANUP.add(f"nix-store --delete {out}", lambda p=out: nix_delete(p, check=False))
            self.paths.append(out)
        keys = b.tmp / "nar-bridge-keys"
        keys.mkdir()
        run(["nix-store", "--generate-binary-cache-key", "bench-1", str(keys / "sk"), str(keys / "pk")])
        self.sk, self.pk = keys / "sk", (keys / "pk").read_text().strip()
        self.static = b.tmp / "static-cache"
        self.nix("copy", "--to", f"file://{self.static}?compression=none&secret-key={self.sk}", *self.paths)
        self.nar_bytes = sum(int(run(["nix-store", "-q", "--size", p]).stdout) for p in self.paths)
        self.tree_nar = int(run(["nix-store", "-q", "--size", self.paths[0]]).stdout)

    def nix(self, *args: str, cap: float | None = None) -> float:
        self.n += 1
        env = dict(self.b.env, XDG_CACHE_HOME=str(self.b.tmp / f"nix-xdg-{self.n}"))
        t0 = time.perf_counter()
        run([*NIX, *args, *NO_SUBST], env=env, cap=cap, timeout=1200)
        return time.perf_counter() - t0


def rows_narbridge(b: Bench) -> None:
    for peer in ("nix-store", "nginx"):
        if (why := b.peer(peer)) is not None:
            raise BenchError(f"needs {peer}: {why}")
    b.ensure_main_store()
    log("narbridge: nix-store --add of tree and big, the static cache (setup)")
    ctx = _Ctx(b)
    try:
        row_copy_from(b, ctx)
        row_copy_to(b, ctx, "none")
        row_copy_to(b, ctx, "xz")
        row_narinfo_rate(b, ctx)
    finally:
        for p in ctx.paths:
            nix_delete(p, check=False)


def _fresh_dest(b: Bench) -> Path:
    return b.fresh("nix-dest")


def row_copy_from(b: Bench, ctx: _Ctx) -> None:
    name = "nix copy --from, closure tree + big"
    sub = Measurement("nar-bridge", amount=ctx.nar_bytes, note="signed narinfos, require-sigs")
    ref = Measurement("nginx static file:// cache", amount=ctx.nar_bytes, note="compression=none, signed")
    assert b.main_store is not None

    @contextmanager
    def bridge() -> Iterator[NarBridge]:
        with NarBridge(b, b.main_store, "--sign-key-file", str(ctx.sk)) as nb:  # type: ignore[arg-type]
            yield nb

    @contextmanager
    def nginx() -> Iterator[Nginx]:
        with Nginx(ctx.static, b.fresh("nginx")) as ng:
            yield ng

    def once(url: str, m: Measurement, i: int, cap: float) -> float:
        dest = _fresh_dest(b)
        try:
            t = ctx.nix("copy", "--from", url, "--to", str(dest), *ctx.paths, "--option", "require-sigs", "true",
                        "--option", "trusted-public-keys", ctx.pk, cap=cap)  # fmt: skip
            if i == 0:
                run(["nix-store", "--store", str(dest), "--verify", "--check-contents"], timeout=600)
                if run(["nix-store", "--store", str(dest), "--check-validity", *ctx.paths], check=False).returncode:
                    raise BenchError(f"WRONG DATA: {m.label}: the closure is not valid in the destination")
                m.check("nix-store --verify --check-contents of the copy (run 1)")
        finally:
            shutil.rmtree(dest, ignore_errors=True)
        return t

    interleave(
        b,
        name,
        [
            Subject(sub, lambda nb, i, cap: once(nb.url, sub, i, cap), session=bridge),
            Subject(ref, lambda ng, i, cap: once(f"http://127.0.0.1:{ng.port}", ref, i, cap), session=nginx),
        ],
    )
    b.report.report(name, sub, [(ref, 0.5)])


def row_copy_to(b: Bench, ctx: _Ctx, compression: str) -> None:
    paths = ctx.paths if compression == "none" else ctx.paths[:1]
    amount = ctx.nar_bytes if compression == "none" else ctx.tree_nar
    what = "closure tree + big" if compression == "none" else "tree (xz of big takes Nix minutes)"
    name = f"nix copy --to ({compression}), {what}"
    sub = Measurement("nar-bridge", amount=amount, note="fresh bridge and store each run")
    ref = Measurement(f"file://DIR?compression={compression}", amount=amount)
    dav = Measurement("nginx WebDAV PUT", amount=amount, note="Nix's own cost of an HTTP cache: the ceiling")
    q = "" if compression == "xz" else f"?compression={compression}"  # xz: Nix's default

    def bridge_once(i: int, cap: float) -> float:
        store = b.fresh("bridge-upload-store")
        try:
            with NarBridge(b, store) as nb:
                t = ctx.nix("copy", "--to", nb.url + q, *paths, cap=cap)
            if i == 0:
                for p in paths:
                    got = run([*b.ts, "path", "info", "--store", f"local://{store}", p], check=False)
                    if got.returncode:
                        raise BenchError(f"WRONG DATA: {p} not in the bridge's store after nix copy --to")
                sub.check("each path's PathInfo stored (NarHash checked by the bridge)")
        finally:
            shutil.rmtree(store, ignore_errors=True)
        return t

    def file_once(i: int, cap: float) -> float:
        d = b.fresh("file-cache")
        try:
            return ctx.nix("copy", "--to", f"file://{d}?compression={compression}", *paths, cap=cap)
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def dav_once(i: int, cap: float) -> float:
        root = b.fresh("dav-root")
        root.mkdir()
        (root / "nix-cache-info").write_text("StoreDir: /nix/store\n")
        try:
            with Nginx(root, b.fresh("nginx-dav"), NGINX_DAV_CONF) as ng:
                return ctx.nix("copy", "--to", f"http://127.0.0.1:{ng.port}{q}", *paths, cap=cap)
        finally:
            shutil.rmtree(root, ignore_errors=True)

    subjects = [
        Subject(sub, lambda _v, i, cap: bridge_once(i, cap)),
        Subject(ref, lambda _v, i, cap: file_once(i, cap)),
    ]
    if compression == "none":
        subjects.append(Subject(dav, lambda _v, i, cap: dav_once(i, cap)))
    interleave(b, name, subjects)
    refs: list[tuple[Measurement, float | None]] = [(ref, 0.5)]
    if compression == "none":
        refs.append((dav, None))
    b.report.report(name, sub, refs)


def row_narinfo_rate(b: Bench, ctx: _Ctx) -> None:
    name = "narinfo GETs, 16 concurrent clients (wrk)"
    if (why := b.peer("wrk")) is not None:
        b.report.emit(row_of(name, Bench.skipped("nar-bridge", why, unit="req/s")))
        return
    assert b.main_store is not None
    n = 10_000  # each run's rate is reported as the time of n requests at that rate
    seconds = "3" if b.quick else "5"
    sub = Measurement("nar-bridge", amount=n, unit="req/s", note=f"wrk -t2 -c16 -d{seconds}s, signed narinfos")
    ref = Measurement("nginx static cache", amount=n, unit="req/s")
    lua = b.tmp / "narinfos.lua"
    hashes = [os.path.basename(p)[:32] for p in ctx.paths]
    lua.write_text(WRK_LUA.format(paths=", ".join(f'"/{h}.narinfo"' for h in hashes)))

    def wrk(url: str, m: Measurement) -> float:
        for h in hashes:
            got = run(["curl", "-sf", f"{url}/{h}.narinfo"], check=False).stdout
            if b"NarHash: sha256:" not in got:
                raise BenchError(f"{m.label}: no narinfo at {url}/{h}.narinfo")
        out = run(["wrk", "-t2", "-c16", f"-d{seconds}s", "-s", str(lua), url], timeout=60).stdout.decode()
        rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
        errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        if rate is None or errors is not None:
            raise BenchError(f"wrk: {' '.join(out.split())[-200:]}")
        m.check("every answer 200, narinfos checked before")
        return n / float(rate.group(1))

    @contextmanager
    def bridge() -> Iterator[NarBridge]:
        with NarBridge(b, b.main_store, "--sign-key-file", str(ctx.sk)) as nb:  # type: ignore[arg-type]
            yield nb

    @contextmanager
    def nginx() -> Iterator[Nginx]:
        with Nginx(ctx.static, b.fresh("nginx")) as ng:
            yield ng

    interleave(
        b,
        name,
        [
            Subject(sub, lambda nb, i, cap: wrk(nb.url, sub), session=bridge),
            Subject(ref, lambda ng, i, cap: wrk(f"http://127.0.0.1:{ng.port}", ref), session=nginx),
        ],
    )
    b.report.report(name, sub, [(ref, None)])
