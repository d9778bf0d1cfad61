"""Secure network defaults, with real TLS (certificates made here) and real processes: the
daemon and the nar-bridge with `--tls-cert/--tls-key`, `--tls-client-ca`, `--auth-tokens`,
`--public-reads`; clients over `grpc+https://…?ca=…&token_file=…` and `$TVIX_STORE_TOKEN`; the
refusal to listen on a network address unprotected; no secret in logs or errors."""

from __future__ import annotations

import base64
import hashlib
import http.client
import os
import re
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Daemon, cli, one_line_error
from fixtures import make_tree
from tlsutil import Pki, make_pki

from tvix_store.compose import public_url
from tvix_store.core.errors import ValidationError
from tvix_store.serve.security import Scope, Tokens, bearer_of

RW = "rw-0123456789abcdef0123456789abcdef"
RO = "ro-fedcba9876543210fedcba9876543210"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def secrets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("secrets")
    files = {"tokens": f"# comment\n\n{RW} rw\n{RO}   ro\n", "rw": RW + "\n", "ro": RO + "\n", "wrong": "nope-123\n"}
    out = {}
    for name, text in files.items():
        (d / name).write_text(text)
        (d / name).chmod(0o600)
        out[name] = d / name
    return out


@pytest.fixture(scope="module")
def tls_daemon(tmp_path_factory: pytest.TempPathFactory, pki: Pki, secrets: dict[str, Path]) -> Iterator[Daemon]:
    store = tmp_path_factory.mktemp("tls-daemon") / "store"
    d = Daemon(
        f"local://{store}",
        extra=(
            *("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)),
            *("--auth-tokens", str(secrets["tokens"])),
        ),
    )
    try:
        yield d
    finally:
        d.stop()


def https(d: Daemon, pki: Pki, token: Path | None = None, host: str = "localhost") -> str:
    port = d.address.rsplit(":", 1)[1]
    q = f"?ca={pki.ca}" + (f"&token_file={token}" if token else "")
    return f"grpc+https://{host}:{port}{q}"


# --- units: the token file and the Authorization header -------------------------------------


def test_token_file_parsing_and_scopes(tmp_path: Path) -> None:
    f = tmp_path / "t"
    f.write_text(f"{RW} rw\n# x\n{RO} ro\n")
    t = Tokens.load(f)
    assert t.scope_of(RW) is Scope.WRITE and t.scope_of(RO) is Scope.READ
    assert t.scope_of("nope") is None and t.scope_of(None) is None and t.scope_of(RW[:-1]) is None
    assert all(RW.encode() not in d for d, _ in t.entries)  # kept as digests only
    for bad in (f"{RW}\n", f"{RW} admin\n", "# nothing\n", f"{RW} rw extra\n"):
        f.write_text(bad)
        with pytest.raises(ValidationError) as e:
            Tokens.load(f)
        assert RW not in str(e.value)
    assert bearer_of(f"Bearer {RW}") == RW
    assert bearer_of("Basic " + base64.b64encode(f"nix:{RW}".encode()).decode()) == RW
    assert bearer_of("Basic !!!") is None and bearer_of(None) is None and bearer_of("Bearer ") is None


def test_public_url_hides_secret_options() -> None:
    u = public_url("grpc+https://h:1?ca=/etc/ca.pem&token_file=/run/tok&key=/k.pem&cert=/c.pem")
    assert "token_file" not in u and "/run/tok" not in u and "/k.pem" not in u
    assert "ca=/etc/ca.pem" in u and "cert=/c.pem" in u
    assert public_url("grpc+http://h:1") == "grpc+http://h:1"


# --- the gRPC daemon over TLS with tokens ------------------------------------------------------


def test_tls_daemon_with_tokens(tls_daemon: Daemon, pki: Pki, secrets: dict[str, Path], tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", seed=13)
    dump = subprocess.run(["nix-store", "--dump", str(tree)], capture_output=True, check=True).stdout
    rw = https(tls_daemon, pki, secrets["rw"])
    sp = cli("import", "--store", rw, str(tree)).stdout.decode().strip()
    # a read-only token reads, by token_file and by $TVIX_STORE_TOKEN (also via 127.0.0.1)
    assert cli("nar", "--store", https(tls_daemon, pki, secrets["ro"]), sp).stdout == dump
    env = {"TVIX_STORE_TOKEN": RO}
    assert cli("nar", "--store", https(tls_daemon, pki, host="127.0.0.1"), sp, env=env).stdout == dump

    # ... and cannot write
    other = make_tree(tmp_path / "other", seed=14)
    p = cli("import", "--store", https(tls_daemon, pki, secrets["ro"]), str(other), check=False)
    line = one_line_error(p, 1, "PERMISSION_DENIED", "read")
    assert "token_file" not in line and RO not in line

    # missing or wrong token: UNAUTHENTICATED, the way to give one named
    for url, e in ((https(tls_daemon, pki), {"TVIX_STORE_TOKEN": ""}), (https(tls_daemon, pki, secrets["wrong"]), {})):
        p = cli("nar", "--store", url, sp, check=False, env=e)
        line = one_line_error(p, 1, "UNAUTHENTICATED", "TVIX_STORE_TOKEN")
        assert "nope-123" not in line

    # a plain client to the TLS server: one clear line, no gRPC internals
    port = tls_daemon.address.rsplit(":", 1)[1]
    p = cli("nar", "--store", f"grpc+http://127.0.0.1:{port}", sp, check=False, env={"TVIX_STORE_TOKEN": RW})
    line = one_line_error(p, 1, "grpc+https://")
    assert "UNKNOWN" not in line and "ipv4" not in line and RW not in line

    # TLS with roots that did not sign the server's certificate
    bad = https(tls_daemon, pki, secrets["rw"]).replace(str(pki.ca), str(pki.other_ca))
    one_line_error(cli("nar", "--store", bad, sp, check=False), 1, "TLS")

    # nothing secret in the daemon's log
    log = "".join(tls_daemon.log)
    assert RW not in log and RO not in log and "nope-123" not in log
    assert re.search(r"listening on \S+ \(store local://\S+; TLS; 2 tokens\)", log), log


def test_mutual_tls(tmp_path: Path, pki: Pki) -> None:
    d = Daemon(
        "memory://",
        extra=(
            *("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)),
            *("--tls-client-ca", str(pki.ca)),
        ),
    )
    try:
        port = d.address.rsplit(":", 1)[1]
        f = tmp_path / "f"
        f.write_bytes(b"mutual tls\n")
        base = f"grpc+https://localhost:{port}?ca={pki.ca}"
        p = cli("blob", "put", "--store", base, str(f), check=False)
        one_line_error(p, 1, "unavailable")
        with_cert = f"{base}&cert={pki.client_cert}&key={pki.client_key}"
        digest = cli("blob", "put", "--store", with_cert, str(f)).stdout.decode().strip()
        assert len(digest) == 64
        assert cli("blob", "cat", "--store", with_cert, digest).stdout == b"mutual tls\n"
    finally:
        assert d.stop() == 0


# --- refusing to listen on the network unprotected ------------------------------------------


@pytest.mark.parametrize("command", ["daemon", "nar-bridge"])
def test_network_address_needs_tls_and_auth_unless_insecure(command: str, pki: Pki, secrets: dict[str, Path]) -> None:
    tls = ("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key))
    for extra, missing in (((), "TLS"), (tls, "authentication"), (("--auth-tokens", str(secrets["tokens"])), "TLS")):
        p = cli(command, "--listen", "0.0.0.0:0", "--store", "memory://", *extra, check=False, timeout=60)
        line = one_line_error(p, 2, "0.0.0.0", missing, "--insecure")
        assert "Traceback" not in line
    # mismatched key and certificate, half a pair: usage errors too
    p = cli(command, "--store", "memory://", "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.client_key),
            check=False)  # fmt: skip
    one_line_error(p, 2, "--tls-key")
    one_line_error(
        cli(command, "--store", "memory://", "--tls-cert", str(pki.server_cert), check=False), 2, "--tls-key"
    )
    # loopback and unix sockets need nothing; --insecure allows the network address
    d = Daemon("memory://", listen="0.0.0.0:0", extra=("--insecure",)) if command == "daemon" else None
    if d is not None:
        try:
            assert any("insecure: no authentication" in line for line in d.log), d.log
        finally:
            assert d.stop() == 0
    else:
        b = Bridge("--listen", "0.0.0.0:0", "--insecure")
        b.stop()


# --- nar-bridge: HTTPS, tokens, public reads ----------------------------------------------------


class Bridge:
    """A real `tvix-store nar-bridge` process; `url` as it logs it (http:// or https://)."""

    def __init__(self, *extra: str, store: str = "memory://") -> None:
        argv = [sys.executable, "-m", "tvix_store.cli", "nar-bridge", "--store", store, *extra]
        if "--listen" not in extra:
            argv += ["--listen", "127.0.0.1:0"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.log: list[str] = []
        assert self.proc.stderr is not None
        deadline = time.monotonic() + 30
        while True:
            line = self.proc.stderr.readline().decode(errors="replace")
            if not line:
                raise AssertionError(f"nar-bridge exited ({self.proc.wait()}):\n{''.join(self.log)}")
            self.log.append(line)
            if m := re.search(r"nar-bridge listening on (https?)://(\S+):(\d+)", line):
                self.scheme, self.host, self.port = m.group(1), m.group(2), int(m.group(3))
                break
            assert time.monotonic() < deadline, self.log
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self.log.append(raw.decode(errors="replace"))

    def request(
        self, method: str, path: str, token: str | None = None, body: bytes | None = None, ca: Path | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if self.scheme == "https":
            ctx = ssl.create_default_context(cafile=str(ca))
            conn: http.client.HTTPConnection = http.client.HTTPSConnection("localhost", self.port, context=ctx)
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers)
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        return self.proc.returncode


def _nar_of_file(data: bytes) -> bytes:
    def s(b: bytes) -> bytes:
        return len(b).to_bytes(8, "little") + b + b"\0" * (-len(b) % 8)

    return s(b"nix-archive-1") + s(b"(") + s(b"type") + s(b"regular") + s(b"contents") + s(data) + s(b")")


def test_narbridge_https_tokens_and_public_reads(pki: Pki, secrets: dict[str, Path]) -> None:
    from tvix_store.core import nixbase32

    b = Bridge(
        *("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)),
        *("--auth-tokens", str(secrets["tokens"]), "--public-reads"),
    )
    try:
        assert b.scheme == "https"
        # downloads are public
        status, _, body = b.request("GET", "/nix-cache-info", ca=pki.ca)
        assert status == 200 and b"StoreDir: /nix/store" in body
        nar = _nar_of_file(b"uploaded over https\n")
        name = f"/nar/{nixbase32.encode(hashlib.sha256(nar).digest())}.nar"
        # uploads: 401 without or with a wrong token (with a challenge), 403 with a read-only one
        status, headers, _ = b.request("PUT", name, body=nar, ca=pki.ca)
        assert status == 401 and headers.get("www-authenticate", "").startswith("Basic")
        assert b.request("PUT", name, token="wrong", body=nar, ca=pki.ca)[0] == 401
        assert b.request("PUT", name, token=RO, body=nar, ca=pki.ca)[0] == 403
        assert b.request("HEAD", name, ca=pki.ca)[0] == 404  # nothing was ingested
        status, _, body = b.request("PUT", name, token=RW, body=nar, ca=pki.ca)
        assert status == 200, body
        assert b.request("HEAD", name, ca=pki.ca)[0] == 200
        # a plain HTTP client to the HTTPS port gets nothing served
        conn = http.client.HTTPConnection("127.0.0.1", b.port, timeout=30)
        try:
            with pytest.raises((http.client.HTTPException, ConnectionError)):
                conn.request("GET", "/nix-cache-info")
                conn.getresponse()
        finally:
            conn.close()
        log = "".join(b.log)
        assert RW not in log and RO not in log
    finally:
        assert b.stop() == 0


def test_narbridge_reads_need_a_token_without_public_reads(secrets: dict[str, Path]) -> None:
    b = Bridge("--auth-tokens", str(secrets["tokens"]))
    try:
        assert b.request("GET", "/nix-cache-info")[0] == 401
        assert b.request("GET", "/nix-cache-info", token="wrong")[0] == 401
        assert b.request("GET", "/nix-cache-info", token=RO)[0] == 200
        assert b.request("GET", "/nix-cache-info", token=RW)[0] == 200
    finally:
        assert b.stop() == 0


def test_nix_copies_to_a_bridge_with_a_token_from_its_netrc(tmp_path: Path, secrets: dict[str, Path]) -> None:
    """Real Nix: the token as the password of a netrc entry (HTTP Basic) uploads; without it, refused."""
    f = tmp_path / "netrc-test.txt"
    f.write_text(f"uploaded by nix with a netrc token {tmp_path}\n")
    sp = subprocess.run(["nix-store", "--add", str(f)], capture_output=True, check=True).stdout.decode().strip()
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine 127.0.0.1\nlogin nix\npassword {RW}\n")
    netrc.chmod(0o600)
    b = Bridge("--auth-tokens", str(secrets["tokens"]), store=f"local://{tmp_path / 'store'}")
    url = f"http://127.0.0.1:{b.port}"
    nix = ["nix", "--extra-experimental-features", "nix-command", "--option", "narinfo-cache-negative-ttl", "0"]

    def run(*args: str, n: int) -> subprocess.CompletedProcess[bytes]:
        env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / f"xdg{n}")}
        return subprocess.run([*nix, *args], capture_output=True, env=env, timeout=120)

    try:
        p = run("copy", "--to", url, sp, "--option", "substituters", "", n=1)
        assert p.returncode != 0, "nix uploaded without a token"
        p = run("copy", "--to", url, sp, "--option", "substituters", "", "--option", "netrc-file", str(netrc), n=2)
        assert p.returncode == 0, p.stderr.decode()
        p = run("path-info", "--store", url, sp, "--option", "netrc-file", str(netrc), n=3)
        assert p.returncode == 0 and p.stdout.decode().strip() == sp, p.stderr.decode()
        assert (
            cli("nar", "--store", f"local://{tmp_path / 'store'}", sp).stdout
            == subprocess.run(["nix-store", "--dump", sp], capture_output=True, check=True).stdout
        )
    finally:
        assert b.stop() == 0


def test_daemon_nar_bridge_shares_tls_and_tokens(pki: Pki, secrets: dict[str, Path]) -> None:
    d = Daemon(
        "memory://",
        extra=(
            *("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)),
            *("--auth-tokens", str(secrets["tokens"]), "--nar-bridge", "127.0.0.1:0"),
        ),
    )
    try:
        m = re.search(r"nar-bridge on https://127\.0\.0\.1:(\d+)", "".join(d.log))
        assert m, d.log
        ctx = ssl.create_default_context(cafile=str(pki.ca))
        for token, want in ((None, 401), (RO, 200)):
            conn = http.client.HTTPSConnection("localhost", int(m.group(1)), context=ctx, timeout=30)
            try:
                conn.request("GET", "/nix-cache-info", headers={"Authorization": f"Bearer {token}"} if token else {})
                assert conn.getresponse().status == want
            finally:
                conn.close()
    finally:
        assert d.stop() == 0
