"""`daemon --metrics-listen`: a real daemon, real gRPC calls (with tokens, so refusals are counted
too), the endpoint scraped over HTTP and parsed with prometheus-client's own parser."""

from __future__ import annotations

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
