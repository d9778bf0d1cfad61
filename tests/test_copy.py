"""`tvix-store copy`: between a local store and a real daemon (both ways), where the destination
already holds part of the closure; what it had is not sent again (bytes counted by a TCP proxy
in front of the daemon); the copy renders the same NAR as `nix-store --dump` of the tree."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from conftest import Daemon, cli, one_line_error
from fixtures import make_tree
from tcpproxy import TcpProxy

MiB = 1 << 20


def dump(p: Path) -> bytes:
    return subprocess.run(["nix-store", "--dump", str(p)], capture_output=True, check=True).stdout


def test_copy_sends_only_what_the_daemon_lacks(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", seed=5)
    shared = tree / "shared"
    shared.mkdir()
    (shared / "big.bin").write_bytes(os.urandom(3 * MiB))
    for i in range(40):  # small files: a batch
        (shared / f"s{i}").write_bytes(os.urandom(100 + i))
    new = tree / "new"
    new.mkdir()
    (new / "fresh.bin").write_bytes(os.urandom(MiB + 17))
    (new / "tiny").write_bytes(b"tiny\n")
    # the destination already has `shared` (the same Directory and blobs), from another store path
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copytree(shared, partial / "shared")

    src = f"local://{tmp_path / 'src'}"
    sp = cli("import", "--store", src, str(tree)).stdout.decode().strip()
    d = Daemon(f"local://{tmp_path / 'daemon'}")
    try:
        cli("import", "--store", d.url, str(partial))
        port = int(d.address.rsplit(":", 1)[1])
        with TcpProxy(port) as proxy:
            p = cli("copy", "--from", src, "--to", proxy.url, sp)
            assert p.stdout.decode().split() == [sp]
            sent = proxy.up
            assert sent < 2 * MiB, f"{sent} bytes sent: what the daemon had went again"
            assert sent > MiB, sent  # new/fresh.bin did go
            assert "Traceback" not in p.stderr.decode()
            # and again: the path is there, nothing but questions
            proxy.reset_counts()
            assert cli("copy", "--from", src, "--to", proxy.url, sp).stdout.decode().split() == [sp]
            assert proxy.up < 64 << 10, proxy.up
        assert cli("nar", "--store", d.url, sp).stdout == dump(tree)

        # the other way: from the daemon into a fresh local store that already has `shared`
        dst = f"local://{tmp_path / 'dst'}"
        cli("import", "--store", dst, str(partial))
        assert cli("copy", "--from", d.url, "--to", dst, sp).stdout.decode().split() == [sp]
        assert cli("nar", "--store", dst, sp).stdout == dump(tree)
        assert cli("verify", "--store", dst).returncode == 0
    finally:
        assert d.stop() == 0


def test_copy_errors(tmp_path: Path) -> None:
    src = f"local://{tmp_path / 'src'}"
    f = tmp_path / "file"
    f.write_bytes(b"a file\n")
    sp = cli("import", "--store", src, str(f)).stdout.decode().strip()
    missing = sp[: len("/nix/store/")] + "0" * 32 + "-file"
    one_line_error(cli("copy", "--from", src, "--to", "memory://", missing, check=False), 1, "not found", missing)
    one_line_error(cli("copy", "--from", "bogus://x", "--to", "memory://", sp, check=False), 2, "--from")
    one_line_error(cli("copy", "--from", src, "--to", "grpc+http://nohost", sp, check=False), 2, "--to")
    one_line_error(cli("copy", "--from", src, "--to", src, "not-a-store-path", check=False), 2)
    p = cli("copy", "--from", src, "--to", "grpc+http://127.0.0.1:1", sp, check=False)
    line = one_line_error(p, 1, "127.0.0.1:1", "connection refused")
    assert "UNKNOWN" not in line and "ipv4" not in line
