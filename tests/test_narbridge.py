"""nar-bridge against the real `nix`: the store as an HTTP binary cache, both ways.

A closure with references (a top path referencing a built dependency and a content-addressed
source path, with a multi-chunk file, an executable, symlinks, empty files and directories)
is built once per module in the real /nix/store (`builder = "/bin/sh"`, no sandbox, no
build users). Then, against real `tvix-store nar-bridge` processes: `nix copy --to` the
bridge with xz (Nix's default), zstd and none; `nix copy --from` the bridge into a fresh
chroot store with `require-sigs` and the bridge's key (and refused with another key),
`nix-store --verify --check-contents` there, `diff -r` against the original; the bridge as a
substituter; narinfo fields equal to `nix copy --to file://…`'s; a restart between NAR upload
and narinfo PUT and two bridges sharing one store (local, and over a gRPC daemon); Range
reads (and `nar.render` from any offset); 16 concurrent downloads; listings; HEAD without
rendering; `daemon --nar-bridge`; SIGTERM during a download; stalled uploads; malformed input of
every kind (4xx with a message, nothing published, the bridge alive); a chunk missing mid-NAR
(the body cut short); an unreachable remote (503, then recovery); a 256 MiB NAR uploaded
zstd-compressed and chunked, then downloaded, in bounded memory.

Nix keeps narinfos it uploaded in its own disk cache (`~/.cache/nix`), so every nix call here
gets a fresh XDG_CACHE_HOME and zero narinfo cache TTLs: what it reads comes from the bridge.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import lzma
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import zstandard
from conftest import GUARANTEE_SLACK, Daemon, cli
from fixtures import make_tree

from tvix_store import nar
from tvix_store.compose import open_store
from tvix_store.core import nixbase32
from tvix_store.core.castore import DirectoryNode
from tvix_store.core.digest import B3Digest
from tvix_store.core.pathinfo import StorePath
from tvix_store.importer import import_path
from tvix_store.narbridge import narinfo as fmt
from tvix_store.narbridge.signing import SigningKey, verify

pytestmark = pytest.mark.nix

NIX = ["nix", "--extra-experimental-features", "nix-command"]
NO_CACHE = ["--option", "narinfo-cache-negative-ttl", "0", "--option", "narinfo-cache-positive-ttl", "0"]
BUILD = ["--option", "build-users-group", "", "--option", "sandbox", "false", "--option", "substituters", ""]

CLOSURE_NIX = r"""
{ seed }:
let
  src = ./src.txt;  # a source path: content-addressed (CA: fixed:r:sha256:…)
  dep = derivation {
    name = "nbt-dep-${seed}"; system = builtins.currentSystem; builder = "/bin/sh";
    args = [ "-c" "echo dep ${seed} > $out" ];
  };
in derivation {
  name = "nbt-top-${seed}"; system = builtins.currentSystem; builder = "/bin/sh";
  args = [ "-c" ''
    /bin/mkdir -p $out/sub/deeper $out/bin $out/emptydir
    echo ${dep} > $out/ref
    echo ${src} > $out/sub/src-ref
    /bin/ln -s ${dep} $out/link-dep
    /bin/ln -s ../ref $out/sub/up
    printf '#!/bin/sh\necho hi\n' > $out/bin/tool
    /bin/chmod +x $out/bin/tool
    /usr/bin/head -c 3000000 /dev/urandom > $out/sub/deeper/big.bin
    : > $out/empty
    for n in A a - _ B- b_ 0 Z; do echo $n > "$out/sub/$n"; done
  '' ];
}
"""


def run(argv: list[str], *, env: dict[str, str] | None = None, check: bool = True, timeout: float = 120):
    p = subprocess.run(argv, capture_output=True, env={**os.environ, **(env or {})}, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {p.returncode}: {p.stderr.decode(errors='replace')}")
    return p


class Nix:
    """The real nix, each call with a fresh client-side cache (see the module docstring)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.n = 0

    def __call__(self, *args: str, check: bool = True, nix: list[str] = NIX) -> subprocess.CompletedProcess[bytes]:
        self.n += 1
        env = {"XDG_CACHE_HOME": str(self.tmp / f"xdg-{self.n}")}
        return run([*nix, *args, *NO_CACHE], env=env, check=check)

    def copy_to(self, url: str, *paths: str) -> None:
        self("copy", "--to", url, *paths, "--option", "substituters", "")

    def copy_from(self, url: str, dest: Path, pk: str, *paths: str, check: bool = True):
        return self(
            "copy", "--from", url, "--to", str(dest), *paths,
            "--option", "require-sigs", "true", "--option", "trusted-public-keys", pk, check=check,
        )  # fmt: skip


class NarBridge:
    """A real `tvix-store nar-bridge` process on an ephemeral loopback port."""

    def __init__(self, store_url: str, *extra: str, log_level: str = "info") -> None:
        self.argv = [sys.executable, "-m", "tvix_store.cli", "--log-level", log_level, "nar-bridge"]
        self.argv += ["--listen", "127.0.0.1:0", "--store", store_url, *extra]
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.log: list[str] = []
        assert self.proc.stderr is not None
        deadline = time.monotonic() + 30
        while True:
            line = self.proc.stderr.readline().decode(errors="replace")
            if not line:
                raise AssertionError(f"nar-bridge exited ({self.proc.wait()}) before ready:\n{''.join(self.log)}")
            self.log.append(line)
            if m := re.search(r"nar-bridge listening on (http://\S+)", line):
                self.url = m.group(1)
                self.host, self.port = self.url[len("http://") :].rsplit(":", 1)
                break
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError("nar-bridge not ready within 30 s:\n" + "".join(self.log))
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self.log.append(raw.decode(errors="replace"))

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(self.host, int(self.port), timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()

    def alive(self) -> None:
        status, _, body = self.request("GET", "/nix-cache-info")
        assert status == 200 and b"WantMassQuery: 1" in body, (status, body)
        assert self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def narinfo_fields(text: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.decode().splitlines():
        k, _, v = line.partition(":")
        out[k] = out[k] + "\n" + v.strip() if k in out else v.strip()
    return out


def sha_name(data: bytes) -> str:
    return nixbase32.encode(hashlib.sha256(data).digest())


# --- NARs made by hand, also malformed ones ---


def s(b: bytes) -> bytes:
    return len(b).to_bytes(8, "little") + b + b"\0" * (-len(b) % 8)


def reg(data: bytes) -> bytes:
    return s(b"(") + s(b"type") + s(b"regular") + s(b"contents") + s(data) + s(b")")


def dir_(*entries: tuple[bytes, bytes]) -> bytes:
    out = s(b"(") + s(b"type") + s(b"directory")
    for name, node in entries:
        out += s(b"entry") + s(b"(") + s(b"name") + s(name) + s(b"node") + node + s(b")")
    return out + s(b")")


MAGIC = s(b"nix-archive-1")


# --- module fixtures ---------------------------------------------------------------------


class Closure:
    def __init__(self, top: str, paths: list[str], tmp: Path) -> None:
        self.top = top
        self.paths = paths  # the closure, dependencies first
        self.tmp = tmp


@pytest.fixture(scope="module")
def closure(tmp_path_factory: pytest.TempPathFactory) -> Closure:
    tmp = tmp_path_factory.mktemp("closure")
    (tmp / "default.nix").write_text(CLOSURE_NIX)
    (tmp / "src.txt").write_text("a source file, added as a content-addressed path\n")
    top = run(["nix-build", str(tmp), "--argstr", "seed", "v1", "--no-out-link", *BUILD]).stdout.decode().strip()
    paths = run(["nix-store", "-qR", top]).stdout.decode().split()
    assert len(paths) == 3 and paths[-1] == top, paths
    return Closure(top, paths, tmp)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """(secret key file, its public key, another public key)."""
    tmp = tmp_path_factory.mktemp("keys")
    run(["nix-store", "--generate-binary-cache-key", "bridge-test-1", str(tmp / "sk"), str(tmp / "pk")])
    run(["nix-store", "--generate-binary-cache-key", "bridge-test-1", str(tmp / "sk2"), str(tmp / "pk2")])
    return tmp / "sk", (tmp / "pk").read_text().strip(), (tmp / "pk2").read_text().strip()


@pytest.fixture(scope="module")
def nix(tmp_path_factory: pytest.TempPathFactory) -> Nix:
    return Nix(tmp_path_factory.mktemp("nix-cache"))


@pytest.fixture(scope="module")
def served(
    closure: Closure, keys: tuple[Path, str, str], nix: Nix, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[NarBridge]:
    """One bridge over a local store holding the closure (uploaded with Nix's default, xz)."""
    store = tmp_path_factory.mktemp("served") / "store"
    b = NarBridge(f"local://{store}", "--sign-key-file", str(keys[0]), "--idle-timeout", "2")
    try:
        nix.copy_to(b.url, closure.top)
        yield b
    finally:
        b.stop()


def _narinfo(b: NarBridge, path: str) -> bytes:
    status, headers, body = b.request("GET", f"/{os.path.basename(path)[:32]}.narinfo")
    assert status == 200 and headers["content-type"].startswith("text/x-nix-narinfo"), (status, body)
    return body


# --- nix copy, both ways -------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("compression", ["xz", "zstd", "none"])
def test_nix_copy_to_the_bridge_then_from_it_with_require_sigs(
    compression: str, closure: Closure, keys: tuple[Path, str, str], nix: Nix, tmp_path: Path
) -> None:
    b = NarBridge(f"local://{tmp_path / 'store'}", "--sign-key-file", str(keys[0]))
    try:
        url = b.url if compression == "xz" else f"{b.url}?compression={compression}"
        nix.copy_to(url, closure.top)
        if compression == "xz":
            assert not any("WARNING" in line or "ERROR" in line for line in b.log), "".join(b.log)
        for p in closure.paths:
            ni = narinfo_fields(_narinfo(b, p))
            assert ni["StorePath"] == p and ni["URL"].startswith("nar/tvix-castore/")
        dest = tmp_path / "dest"
        nix.copy_from(b.url, dest, keys[1], closure.top)
        run(["nix-store", "--store", str(dest), "--verify", "--check-contents"])
        for p in closure.paths:
            run(["diff", "-r", "--no-dereference", p, f"{dest}{p}"])
        got = run(["nix-store", "--store", str(dest), "-qR", closure.top]).stdout.decode().split()
        assert sorted(got) == sorted(closure.paths)
        if compression == "xz":  # another key: refused (the built paths are not content-addressed)
            p = nix.copy_from(b.url, tmp_path / "dest2", keys[2], closure.top, check=False)
            assert p.returncode != 0 and b"lacks a valid signature" in p.stderr, p.stderr
            assert not (tmp_path / "dest2" / closure.top.lstrip("/")).exists()
        b.alive()
    finally:
        assert b.stop() == 0


def test_narinfo_fields_equal_those_of_a_file_cache(
    served: NarBridge, closure: Closure, keys: tuple[Path, str, str], nix: Nix, tmp_path: Path
) -> None:
    nix.copy_to(f"file://{tmp_path / 'cache'}?compression=none", closure.top)
    key = SigningKey.load(keys[0])
    for p in closure.paths:
        h = os.path.basename(p)[:32]
        ours = narinfo_fields(_narinfo(served, p))
        theirs = narinfo_fields((tmp_path / "cache" / f"{h}.narinfo").read_bytes())
        for field in ("StorePath", "Compression", "FileSize", "NarHash", "NarSize", "References", "Deriver", "CA"):
            assert ours.get(field) == theirs.get(field), (p, field, ours, theirs)
        assert ("CA" in ours) == p.endswith("-src.txt"), ours
        ni = fmt.parse(_narinfo(served, p))
        fp = fmt.fingerprint(ni.store_path, ni.nar_sha256, ni.nar_size, ni.references)
        assert [s.name for s in ni.signatures] == [key.name]
        assert verify(keys[1], fp, ni.signatures[0]) and not verify(keys[2], fp, ni.signatures[0])
        # the narinfo's order is Nix's, as NAR-BRIDGE.md gives it
        order = [line.split(":")[0] for line in _narinfo(served, p).decode().splitlines()]
        want = [
            "StorePath",
            "URL",
            "Compression",
            "FileSize",
            "NarHash",
            "NarSize",
            "References",
            "Deriver",
            "Sig",
            "CA",
        ]
        assert order == [f for f in want if f in order]


def test_the_bridge_as_a_substituter(
    served: NarBridge, closure: Closure, keys: tuple[Path, str, str], nix: Nix, tmp_path: Path
) -> None:
    dest = tmp_path / "dest"
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    run(
        ["nix-store", "--store", str(dest), "-r", closure.top, "--option", "substituters", served.url,
         "--option", "trusted-public-keys", keys[1], *NO_CACHE],
        env=env,
    )  # fmt: skip
    run(["nix-store", "--store", str(dest), "--verify", "--check-contents"])
    run(["diff", "-r", "--no-dereference", closure.top, f"{dest}{closure.top}"])
    # the listing Nix reads with `nix store ls`
    out = nix("store", "ls", "--store", served.url, "-lR", closure.top + "/sub").stdout.decode()
    assert "big.bin" in out and "src-ref" in out


def test_nar_is_nix_store_dump_and_ranges_are_its_slices(served: NarBridge, closure: Closure) -> None:
    dump = run(["nix-store", "--dump", closure.top]).stdout
    url = "/" + narinfo_fields(_narinfo(served, closure.top))["URL"]
    status, headers, body = served.request("GET", url)
    assert status == 200 and body == dump
    assert headers["content-length"] == str(len(dump)) and headers["cache-control"] == "max-age=31536000, immutable"
    assert headers["content-type"] == "application/x-nix-nar"
    big_at = dump.index(b"big.bin")
    n = len(dump)
    for rng, first, last in [
        ("bytes=0-0", 0, 0),
        ("bytes=100-199", 100, 199),
        (f"bytes={big_at + 500_000}-{big_at + 2_600_000}", big_at + 500_000, big_at + 2_600_000),  # across chunks
        (f"bytes={n - 10}-", n - 10, n - 1),
        ("bytes=-7", n - 7, n - 1),
        (f"bytes=5-{n + 100}", 5, n - 1),
    ]:
        status, headers, body = served.request("GET", url, headers={"Range": rng})
        assert status == 206, (rng, status, body[:200])
        assert headers["content-range"] == f"bytes {first}-{last}/{n}", rng
        assert body == dump[first : last + 1], rng
    status, headers, _ = served.request("GET", url, headers={"Range": f"bytes={n}-"})
    assert status == 416 and headers["content-range"] == f"bytes */{n}"
    status, _, body = served.request("GET", url, headers={"Range": "bytes=0-1,5-6"})  # several: the whole
    assert status == 200 and body == dump
    # the snix spelling of the same URL
    status, _, body = served.request("GET", url.replace("tvix-castore", "snix-castore"))
    assert status == 200 and body == dump


def test_16_concurrent_downloads(served: NarBridge, closure: Closure) -> None:
    dump = run(["nix-store", "--dump", closure.top]).stdout
    url = "/" + narinfo_fields(_narinfo(served, closure.top))["URL"]

    def one(_: int) -> str:
        status, _, body = served.request("GET", url)
        assert status == 200
        return hashlib.sha256(body).hexdigest()

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(one, range(16)))
    assert got == [hashlib.sha256(dump).hexdigest()] * 16


def test_head_answers_from_the_url_alone_and_listings_point_into_the_nar(served: NarBridge, closure: Closure) -> None:
    # a node whose directory the store does not have: HEAD says 200 (nothing rendered), GET 404
    absent = fmt.nar_url(DirectoryNode(b"", B3Digest(bytes(32)), 1), 1234)
    status, headers, body = served.request("HEAD", "/" + absent)
    assert status == 200 and headers["content-length"] == "1234" and body == b""
    status, _, body = served.request("GET", "/" + absent)
    assert status == 404 and b"not found" in body
    status, _, _ = served.request("GET", "/nar/tvix-castore/" + "A" * 40 + "?narsize=5")  # undecodable
    assert status == 404
    status, _, _ = served.request("GET", "/" + absent.split("?")[0])  # no narsize
    assert status == 400
    status, _, _ = served.request("HEAD", f"/{os.path.basename(closure.top)[:32]}.narinfo")
    assert status == 200
    status, _, _ = served.request("GET", "/" + "0" * 32 + ".narinfo")
    assert status == 404
    status, _, _ = served.request("GET", "/not-a-narinfo.narinfo")
    assert status == 404
    status, _, _ = served.request("DELETE", "/nix-cache-info")
    assert status == 405
    # the listing's narOffsets point at the files' contents in the NAR
    dump = run(["nix-store", "--dump", closure.top]).stdout
    status, _, body = served.request("GET", f"/{os.path.basename(closure.top)[:32]}.ls")
    assert status == 200
    listing = json.loads(body)
    assert listing["version"] == 1
    stack = [(listing["root"], Path(closure.top))]
    files = 0
    while stack:
        entry, path = stack.pop()
        if entry["type"] == "directory":
            stack.extend((e, path / name) for name, e in entry["entries"].items())
        elif entry["type"] == "regular":
            files += 1
            data = path.read_bytes()
            assert entry["size"] == len(data) and dump[entry["narOffset"] :][: len(data)] == data, path
            assert entry.get("executable", False) == os.access(path, os.X_OK)
        else:
            assert entry["target"] == os.readlink(path)
    assert files >= 10


# --- uploads: persistence, sharing, refusals ------------------------------------------------


def _upload(b: NarBridge, path: str, *, suffix: str = "", compress=lambda d: d) -> tuple[int, bytes]:
    dump = compress(run(["nix-store", "--dump", path]).stdout)
    status, _, body = b.request("PUT", f"/nar/{sha_name(dump)}.nar{suffix}", dump)
    return status, body


def _file_narinfo(path: str) -> bytes:
    """A narinfo for a path of /nix/store, as Nix would upload it (without URL details)."""
    refs = run(["nix-store", "-q", "--references", path]).stdout.decode().split()
    nar_hash = run(["nix-store", "-q", "--hash", path]).stdout.decode().strip()
    nar_size = run(["nix-store", "-q", "--size", path]).stdout.decode().strip()
    return (
        f"StorePath: {path}\nURL: nar/x.nar\nCompression: none\nNarHash: {nar_hash}\nNarSize: {nar_size}\n"
        f"References: {' '.join(os.path.basename(r) for r in refs)}\n"
    ).encode()


@pytest.mark.slow
def test_nar_index_survives_a_restart_and_is_shared_by_bridges_over_one_store(
    closure: Closure, keys: tuple[Path, str, str], nix: Nix, tmp_path: Path
) -> None:
    store = f"local://{tmp_path / 'store'}"
    dep = closure.paths[0] if "nbt-dep" in closure.paths[0] else closure.paths[1]
    a = NarBridge(store)
    try:
        status, body = _upload(a, dep, suffix=".xz", compress=lambda d: lzma.compress(d))
        assert status == 200, body
    finally:
        assert a.stop() == 0
    b, c = NarBridge(store, "--sign-key-file", str(keys[0])), NarBridge(store)  # after a restart, and a second one
    try:
        dump = run(["nix-store", "--dump", dep]).stdout
        xz_name = sha_name(lzma.compress(dump))
        status, _, _ = b.request("HEAD", f"/nar/{xz_name}.nar.xz")  # what Nix asks before uploading
        assert status == 200
        status, _, _ = c.request("HEAD", f"/nar/{sha_name(dump)}.nar")
        assert status == 200
        status, _, body = c.request("PUT", f"/{os.path.basename(dep)[:32]}.narinfo", _file_narinfo(dep))
        assert status == 200, body
        assert fmt.parse(_narinfo(b, dep)).store_path.basename == os.path.basename(dep)
    finally:
        b.stop()
        c.stop()


@pytest.mark.slow
def test_bridges_over_a_grpc_daemon_share_their_records(closure: Closure, nix: Nix, tmp_path: Path) -> None:
    d = Daemon(f"local://{tmp_path / 'store'}")
    a, b = NarBridge(d.url), NarBridge(d.url)
    try:
        dep = next(p for p in closure.paths if "nbt-dep" in p)
        status, body = _upload(a, dep, suffix=".zst", compress=zstandard.compress)
        assert status == 200, body
        status, _, body = b.request("PUT", f"/{os.path.basename(dep)[:32]}.narinfo", _file_narinfo(dep))
        assert status == 200, body
        nix.copy_to(b.url, closure.top)  # and the rest through the other bridge, Nix's way
        dest = tmp_path / "dest"
        nix("copy", "--from", a.url, "--to", str(dest), closure.top, "--option", "require-sigs", "false")
        run(["diff", "-r", "--no-dereference", closure.top, f"{dest}{closure.top}"])
    finally:
        a.stop()
        b.stop()
        d.stop()
    listed = cli("path", "list", "--store", f"local://{tmp_path / 'store'}").stdout.decode().split()
    assert f"/nix/store/{os.path.basename(dep)}" in listed
    assert any(p.endswith("-nar-bridge-record") for p in listed)  # where the records are kept there


def test_malformed_uploads_are_4xx_with_a_message_and_publish_nothing(served: NarBridge, tmp_path: Path) -> None:
    b = served
    good = MAGIC + dir_((b"a", reg(b"x")), (b"b", reg(b"y")))
    cases: list[tuple[str, str, bytes, int, str]] = [
        ("wrong hash", f"/nar/{sha_name(b'other')}.nar", good, 400, "sha256 mismatch"),
        ("truncated", "", good[:-20], 400, "truncated NAR"),
        ("dot-dot", "", MAGIC + dir_((b"..", reg(b"x"))), 400, "'..'"),
        ("slash", "", MAGIC + dir_((b"a/b", reg(b"x"))), 400, "a/b"),
        ("unsorted", "", MAGIC + dir_((b"b", reg(b"x")), (b"a", reg(b"y"))), 400, "ascending"),
        ("garbage", "", os.urandom(5000), 400, "NAR"),
        ("not xz", "xz", good, 400, "not valid xz"),
        ("bad name", "/nar/abc.nar", good, 400, "expected nar/"),
    ]
    for what, where, data, code, needle in cases:
        if where == "xz":
            where = f"/nar/{sha_name(data)}.nar.xz"
        status, _, body = b.request("PUT", where or f"/nar/{sha_name(data)}.nar", data)
        assert status == code and needle in body.decode(), (what, status, body)
        name = where.split("/")[-1] if where.startswith("/nar/") else f"{sha_name(data)}.nar"
        assert b.request("HEAD", f"/nar/{name}")[0] == 404, what
    # narinfos: for another path, an unknown NarHash, oversized, garbage, bad fields
    dep_narinfo = MAGIC + reg(b"payload\n")
    assert b.request("PUT", f"/nar/{sha_name(dep_narinfo)}.nar", dep_narinfo)[0] == 200
    sp = "/nix/store/" + "1" * 32 + "-victim"
    text = f"StorePath: {sp}\nURL: nar/a.nar\nNarHash: sha256:{sha_name(dep_narinfo)}\nNarSize: {len(dep_narinfo)}\n"
    bad: list[tuple[str, str, bytes, int, str]] = [
        ("other path", "2" * 32, text.encode(), 400, "but was PUT at"),
        (
            "unknown NarHash",
            "1" * 32,
            text.replace(sha_name(dep_narinfo), sha_name(b"no")).encode(),
            400,
            "not uploaded",
        ),
        (
            "wrong NarSize",
            "1" * 32,
            text.replace(f"NarSize: {len(dep_narinfo)}", "NarSize: 7").encode(),
            400,
            "NarSize",
        ),
        ("oversized", "1" * 32, text.encode() + b"X-Pad: " + b"x" * (1 << 20) + b"\n", 413, "limit"),
        ("garbage", "1" * 32, os.urandom(300), 400, "narinfo"),
        ("bad reference", "1" * 32, text.encode() + b"References: ../../etc\n", 400, "References"),
        ("bad sig", "1" * 32, text.encode() + b"Sig: k:AAAA\n", 400, "Sig"),
        ("no NarHash", "1" * 32, b"StorePath: " + sp.encode() + b"\n", 400, "NarHash"),
    ]
    for what, h, body_, code, needle in bad:
        status, _, body = b.request("PUT", f"/{h}.narinfo", body_)
        assert status == code and needle in body.decode(), (what, status, body)
        assert b.request("GET", "/" + "1" * 32 + ".narinfo")[0] == 404, what
    status, _, body = b.request("PUT", "/" + "1" * 32 + ".narinfo", text.encode())  # the good one works
    assert status == 200, body
    assert b.request("GET", "/" + "1" * 32 + ".narinfo")[0] == 200
    # never replaced: the same path with other content is a conflict
    other = MAGIC + reg(b"other payload\n")
    assert b.request("PUT", f"/nar/{sha_name(other)}.nar", other)[0] == 200
    text2 = text.replace(sha_name(dep_narinfo), sha_name(other)).replace(
        f"NarSize: {len(dep_narinfo)}", f"NarSize: {len(other)}"
    )
    status, _, body = b.request("PUT", "/" + "1" * 32 + ".narinfo", text2.encode())
    assert status == 409 and b"never replaced" in body, body
    b.alive()
    assert not any("Traceback" in line for line in b.log), "".join(b.log)


def test_a_stalled_upload_times_out_and_publishes_nothing(served: NarBridge) -> None:
    """The module's bridge runs with --idle-timeout 2."""
    data = MAGIC + reg(os.urandom(100_000))
    with socket.create_connection((served.host, int(served.port)), timeout=30) as sock:
        head = f"PUT /nar/{sha_name(data)}.nar HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n"
        sock.sendall(head.encode() + data[:5000])
        t0 = time.monotonic()
        answer = sock.recv(4096)
        took = time.monotonic() - t0
    assert answer.startswith(b"HTTP/1.1 408") and b"no progress" in answer, answer
    assert took < 2 + GUARANTEE_SLACK
    assert served.request("HEAD", f"/nar/{sha_name(data)}.nar")[0] == 404
    served.alive()


# --- lifecycle ---------------------------------------------------------------------------------


def test_daemon_serves_the_bridge_next_to_grpc_and_sigterm_finishes_a_download(tmp_path: Path) -> None:
    src = tmp_path / "tree"
    (src / "d").mkdir(parents=True)
    (src / "d" / "big").write_bytes(os.urandom(8 << 20))
    d = Daemon(f"local://{tmp_path / 'store'}", extra=("--nar-bridge", "127.0.0.1:0"))
    try:
        m = re.search(r"nar-bridge on (http://\S+)\)", "".join(d.log))
        assert m, d.log
        sp = cli("import", "--store", d.url, str(src)).stdout.decode().strip()
        host, port = m.group(1)[len("http://") :].rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("GET", f"/{os.path.basename(sp)[:32]}.narinfo")
        ni = narinfo_fields(conn.getresponse().read())
        conn.request("GET", "/" + ni["URL"])
        r = conn.getresponse()
        first = r.read(1 << 16)  # a download in flight...
        d.proc.send_signal(signal.SIGTERM)  # ...finishes before the daemon exits
        rest = r.read()
        assert hashlib.sha256(first + rest).digest() == fmt.parse_hash(ni["NarHash"])
        assert d.proc.wait(30) == 0
    finally:
        d.stop()


def test_bad_options_are_one_line_usage_errors(tmp_path: Path) -> None:
    (tmp_path / "bad-key").write_text("name:notbase64\n")
    p = cli("nar-bridge", "--store", "memory://", "--sign-key-file", str(tmp_path / "bad-key"), check=False)
    assert p.returncode == 2 and b"--sign-key-file" in p.stderr and b"Traceback" not in p.stderr, p.stderr
    p = cli("nar-bridge", "--store", "memory://", "--listen", "nonsense", check=False)
    assert p.returncode == 2 and b"invalid listen address" in p.stderr, p.stderr
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        p = cli("nar-bridge", "--store", "memory://", "--listen", f"127.0.0.1:{busy.getsockname()[1]}", check=False)
        assert p.returncode == 1 and b"cannot listen" in p.stderr and len(p.stderr.splitlines()) == 1, p.stderr
    finally:
        busy.close()


# --- the formats, without processes --------------------------------------------------------


def test_narinfo_parse_render_roundtrip_and_fingerprint() -> None:
    # RFC 8032's first test key: seed 9d61…, public key d75a…
    seed = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
    pub = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
    sk = SigningKey.parse("k:" + base64.b64encode(seed + pub).decode())
    assert sk.public == "k:" + base64.b64encode(pub).decode()
    sp = "/nix/store/" + "a" * 32 + "-x"
    text = (
        f"StorePath: {sp}\nURL: nar/y.nar.xz\nCompression: xz\nFileHash: sha256:{'0' * 52}\nFileSize: 9\n"
        f"NarHash: sha256:{'1' * 52}\nNarSize: 120\nReferences: {'b' * 32}-z {'a' * 32}-x\n"
        f"Deriver: {'c' * 32}-x.drv\nSystem: x86_64-linux\nCA: fixed:r:sha256:{'1' * 52}\n"
    )
    ni = fmt.parse(text.encode())
    assert ni.references == (f"{'a' * 32}-x", f"{'b' * 32}-z") and ni.deriver == f"{'c' * 32}-x.drv"
    fp = fmt.fingerprint(ni.store_path, ni.nar_sha256, ni.nar_size, ni.references)
    assert fp == f"1;{sp};sha256:{'1' * 52};120;/nix/store/{'a' * 32}-x,/nix/store/{'b' * 32}-z".encode()
    sig = sk.sign(fp)
    assert verify(sk.public, fp, sig) and not verify(sk.public, fp + b"x", sig)
    again = fmt.parse(fmt.render(ni.__class__(**{**ni.__dict__, "signatures": (sig,)}), "nar/u").encode())
    assert again.signatures == (sig,) and again.references == ni.references and again.ca == ni.ca
    for h in (f"sha256:{'1' * 52}", "sha256:" + ni.nar_sha256.hex()):
        assert fmt.parse_hash(h) == ni.nar_sha256
    assert fmt.nar_file_of(f"{'1' * 52}.nar.zst") == (ni.nar_sha256, "zstd")
    assert fmt.nar_file_of(f"{'1' * 52}.nar.gz") is None
    assert fmt.path_hash_of("e" * 32 + ".narinfo") is None  # not nixbase32


# --- failures of the store, memory -----------------------------------------------------------


def test_a_chunk_missing_mid_nar_cuts_the_body_and_the_bridge_lives_on(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"first\n")
    (src / "big").write_bytes(os.urandom(3 << 20))
    url = f"local://{tmp_path / 'store'}"
    sp = cli("import", "--store", url, str(src)).stdout.decode().strip()
    b = NarBridge(url)
    try:
        nar_url = "/" + narinfo_fields(_narinfo(b, sp))["URL"]
        with open_store(url) as store:
            info = store.pathinfos.get(StorePath.parse(sp).digest)
            assert info is not None and isinstance(info.node, DirectoryNode)
            d = store.directories.get(info.node.digest)
            assert d is not None
            big = next(f for f in d.files if f.name == b"big")
            chunks = store.blobs.chunks(big.digest)
            assert chunks is not None and len(chunks) > 4
            store.blobs.delete(chunks[len(chunks) // 2].digest)  # a chunk after the first batch
        conn = http.client.HTTPConnection(b.host, int(b.port), timeout=30)
        conn.request("GET", nar_url)
        r = conn.getresponse()
        assert r.status == 200  # the headers went out before the hole was found
        with pytest.raises(http.client.IncompleteRead):
            r.read()
        conn.close()
        b.alive()
        deadline = time.monotonic() + 10
        while not any("cut short" in line for line in b.log):
            assert time.monotonic() < deadline, "".join(b.log)
            time.sleep(0.05)
        assert not any("Traceback" in line for line in b.log), "".join(b.log)
    finally:
        assert b.stop() == 0


@pytest.mark.slow
def test_an_unreachable_remote_is_503_then_the_bridge_recovers(tmp_path: Path) -> None:
    with socket.socket() as s_:
        s_.bind(("127.0.0.1", 0))
        port = s_.getsockname()[1]
    store = f"local://{tmp_path / 'store'}"
    d = Daemon(store, listen=f"127.0.0.1:{port}")
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"hello\n")
    sp = cli("import", "--store", d.url, str(src)).stdout.decode().strip()
    b = NarBridge(d.url, "--timeout", "2")
    try:
        assert b.request("GET", f"/{os.path.basename(sp)[:32]}.narinfo")[0] == 200
        d.stop()
        t0 = time.monotonic()
        status, _, body = b.request("GET", "/" + "1" * 32 + ".narinfo")
        assert status == 503 and b"127.0.0.1" in body, (status, body)
        assert time.monotonic() - t0 < 2 + GUARANTEE_SLACK
        assert b.request("GET", f"/{os.path.basename(sp)[:32]}.narinfo")[0] == 200  # kept in memory
        b.alive()
        d = Daemon(store, listen=f"127.0.0.1:{port}")
        deadline = time.monotonic() + 30
        while b.request("GET", "/" + "1" * 32 + ".narinfo")[0] != 404:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        b.stop()
        d.stop()


def _vm_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.slow
def test_a_big_nar_is_uploaded_compressed_and_downloaded_in_bounded_memory(tmp_path: Path) -> None:
    """A 256 MiB NAR, zstd-compressed and sent chunked (no Content-Length), then downloaded: the
    bridge's peak memory stays far below the NAR's size."""
    size, piece = 256 << 20, 1 << 20

    def nar_pieces() -> Iterator[bytes]:
        rng = random.Random(5)
        yield MAGIC + s(b"(") + s(b"type") + s(b"regular") + s(b"contents") + size.to_bytes(8, "little")
        for _ in range(size // piece):
            yield rng.randbytes(piece)
        yield s(b")")

    sha = hashlib.sha256()
    nar_size = 0
    for p in nar_pieces():
        sha.update(p)
        nar_size += len(p)

    def body() -> Iterator[bytes]:
        c = zstandard.ZstdCompressor(level=1).compressobj()
        for p in nar_pieces():
            if out := c.compress(p):
                yield out
        yield c.flush()

    b = NarBridge(f"local://{tmp_path / 'store'}")
    try:
        base = _vm_hwm(b.proc.pid)
        conn = http.client.HTTPConnection(b.host, int(b.port), timeout=120)
        conn.request("PUT", f"/nar/{nixbase32.encode(sha.digest())}.nar.zst", body=body(), encode_chunked=True)
        r = conn.getresponse()
        assert r.status == 200, r.read()
        r.read()
        sp = "/nix/store/" + "3" * 32 + "-big"
        text = f"StorePath: {sp}\nURL: x\nNarHash: sha256:{nixbase32.encode(sha.digest())}\nNarSize: {nar_size}\n"
        assert b.request("PUT", "/" + "3" * 32 + ".narinfo", text.encode())[0] == 200
        conn.request("GET", "/" + narinfo_fields(_narinfo(b, sp))["URL"])
        r = conn.getresponse()
        got = hashlib.sha256()
        while data := r.read(1 << 20):
            got.update(data)
        assert got.digest() == sha.digest()
        peak = _vm_hwm(b.proc.pid)
        assert peak - base < 64 << 20, f"peak {peak >> 20} MiB, at start {base >> 20} MiB"
    finally:
        b.stop()


def test_render_from_an_offset_is_the_suffix_of_the_nar(tmp_path: Path) -> None:
    """`nar.render(…, start)` (Range requests): the NAR's suffix, at offsets inside tokens, names,
    file contents and across the chunks of a multi-chunk file."""
    tree = make_tree(tmp_path / "tree")
    (tree / "sub" / "multi.bin").write_bytes(random.Random(3).randbytes(3 << 20))
    store = open_store("memory://")
    info = import_path(store, tree)
    assert info.node is not None
    whole = b"".join(nar.render(info.node, store.blobs, store.directories))
    assert whole == run(["nix-store", "--dump", str(tree)]).stdout
    offsets = {0, 1, 7, 8, 9, len(whole) - 1, len(whole), len(whole) + 5, *range(0, len(whole), 104_729)}
    at = whole.index(b"multi.bin")
    offsets |= {at + k for k in (0, 100, 300_000, 1 << 20, (1 << 20) + 1, 2_999_999)}
    for start in sorted(offsets):
        got = b"".join(nar.render(info.node, store.blobs, store.directories, start))
        assert got == whole[start:], start
