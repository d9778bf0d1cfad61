"""`daemon --metrics-listen`: a real daemon, real gRPC calls (with tokens, so refusals are counted
too), the endpoint scraped over HTTP and parsed with prometheus-client's own parser."""

from __future__ import annotations

import hashlib
import os
import re
import urllib.request
from pathlib import Path

import grpc
from conftest import Daemon, cli, one_line_error
from prometheus_client.parser import text_string_to_metric_families

from tvix_store.protocol.g1 import rpc_blobstore_pb2 as rb
from tvix_store.protocol.g1 import rpc_blobstore_pb2_grpc as rbg

RW = "metrics-rw-token-0123456789abcdef"
RO = "metrics-ro-token-0123456789abcdef"
PUT = "/tvix.store.v1.BlobService/Put"
STAT = "/tvix.store.v1.BlobService/Stat"
READ = "/tvix.store.v1.BlobService/Read"


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the endpoint: (name, sorted labels) → value."""
    with urllib.request.urlopen(url, timeout=30) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_count_calls_by_method_and_status_with_bytes(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{RW} rw\n{RO} ro\n")
    tokens.chmod(0o600)
    d = Daemon("memory://", extra=("--auth-tokens", str(tokens), "--metrics-listen", "127.0.0.1:0"))
    try:
        m = re.search(r"metrics on (http://\S+/metrics)", "".join(d.log))
        assert m, d.log
        url = m.group(1)
        data = os.urandom(300_000)
        with grpc.insecure_channel(d.address) as ch:
            stub = rbg.BlobServiceStub(ch)
            rw, ro = [("authorization", f"Bearer {RW}")], [("authorization", f"Bearer {RO}")]
            digest = stub.Put(iter([rb.BlobChunk(data=data)]), metadata=rw, timeout=30).digest
            got = b"".join(c.data for c in stub.Read(rb.ReadBlobRequest(digest=digest), metadata=ro, timeout=30))
            assert got == data
            for _ in range(2):
                try:
                    stub.Stat(rb.StatBlobRequest(digest=bytes(32)), metadata=ro, timeout=30)
                except grpc.RpcError as e:
                    assert e.code() is grpc.StatusCode.NOT_FOUND
            for md in ([], [("authorization", "Bearer wrong")]):
                try:
                    stub.Stat(rb.StatBlobRequest(digest=digest), metadata=md, timeout=30)
                    raise AssertionError("a call without a valid token was answered")
                except grpc.RpcError as e:
                    assert e.code() is grpc.StatusCode.UNAUTHENTICATED
            try:
                stub.Put(iter([rb.BlobChunk(data=b"x")]), metadata=ro, timeout=30)
                raise AssertionError("a read-only token wrote")
            except grpc.RpcError as e:
                assert e.code() is grpc.StatusCode.PERMISSION_DENIED
        s = scrape(url)

        def v(name: str, **labels: str) -> float:
            return s.get((name, tuple(sorted(labels.items()))), 0.0)

        assert v("tvix_store_grpc_requests_total", method=PUT, code="OK") == 1
        assert v("tvix_store_grpc_requests_total", method=PUT, code="PERMISSION_DENIED") == 1
        assert v("tvix_store_grpc_requests_total", method=READ, code="OK") == 1
        assert v("tvix_store_grpc_requests_total", method=STAT, code="NOT_FOUND") == 2
        assert v("tvix_store_grpc_requests_total", method=STAT, code="UNAUTHENTICATED") == 2
        assert v("tvix_store_grpc_request_duration_seconds_count", method=PUT, code="OK") == 1
        assert v("tvix_store_grpc_request_duration_seconds_bucket", method=STAT, code="NOT_FOUND", le="+Inf") == 2
        assert v("tvix_store_grpc_request_duration_seconds_sum", method=READ, code="OK") > 0
        assert v("tvix_store_grpc_received_bytes_total", method=PUT) >= len(data)
        assert v("tvix_store_grpc_sent_bytes_total", method=READ) >= len(data)
        assert v("tvix_store_grpc_sent_bytes_total", method=STAT) < 1000
        assert v("tvix_store_grpc_in_flight", method=READ) == 0
        assert v("process_resident_memory_bytes") > 0
        assert RW not in "".join(d.log)
    finally:
        assert d.stop() == 0


def test_bad_metrics_address_is_a_usage_error() -> None:
    p = cli("daemon", "--store", "memory://", "--metrics-listen", "nonsense", check=False)
    one_line_error(p, 2, "--metrics-listen")


def test_narbridge_metrics_and_store_counters(tmp_path: Path) -> None:
    """nar-bridge requests by route, method and status with body bytes; and the counters of its
    store (here a remote daemon behind the in-memory cache): cache limit, bytes fetched."""
    from test_security import Bridge

    from tvix_store.core import nixbase32

    d = Daemon(f"local://{tmp_path / 'daemon'}")
    f = tmp_path / "payload"
    f.write_bytes(os.urandom(200_000))
    sp = cli("import", "--store", d.url, str(f)).stdout.decode().strip()
    b = Bridge("--metrics-listen", "127.0.0.1:0", store=d.url)
    try:
        m = re.search(r"metrics on (http://\S+/metrics)", "".join(b.log))
        assert m, b.log
        for _ in range(2):
            assert b.request("GET", "/nix-cache-info")[0] == 200
        assert b.request("GET", "/" + "0" * 32 + ".narinfo")[0] == 404
        status, _, narinfo = b.request("GET", "/" + sp[len("/nix/store/") :][:32] + ".narinfo")
        assert status == 200, narinfo
        nar_url = next(line.split(": ", 1)[1] for line in narinfo.decode().splitlines() if line.startswith("URL: "))
        status, _, nar = b.request("GET", "/" + nar_url)
        assert status == 200 and len(nar) > 200_000
        upload = os.urandom(1000)
        name = "/nar/" + nixbase32.encode(hashlib.sha256(upload).digest()) + ".nar"
        assert b.request("PUT", name, body=upload)[0] == 400  # not a NAR: refused, but received
        s = scrape(m.group(1))

        def v(metric: str, **labels: str) -> float:
            return s.get((metric, tuple(sorted(labels.items()))), 0.0)

        req = "tvix_store_http_requests_total"
        assert v(req, route="/nix-cache-info", method="GET", status="200") == 2
        assert v(req, route="/{name}", method="GET", status="404") == 1
        assert v(req, route="/{name}", method="GET", status="200") == 1
        assert v(req, route="/nar/{name}", method="PUT", status="400") == 1
        nar_route = next(
            dict(k[1])["route"] for k in s if k[0] == req and dict(k[1]).get("route", "").endswith("{node}")
        )
        assert v(req, route=nar_route, method="GET", status="200") == 1
        assert v("tvix_store_http_sent_bytes_total", route=nar_route) >= len(nar)
        assert v("tvix_store_http_received_bytes_total", route="/nar/{name}") >= len(upload)
        assert v("tvix_store_http_request_duration_seconds_count", route="/nix-cache-info", method="GET") == 2
        assert v("tvix_store_stat", name="cache_limit") == 256 << 20
        assert v("tvix_store_stat", name="bytes_fetched") >= 200_000
        assert v("tvix_store_stat", name="timeouts") == 0
    finally:
        assert b.stop() == 0
        assert d.stop() == 0
