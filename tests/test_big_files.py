"""A file of 5 GiB end to end, over the 2025 protocol (snix.castore.v1 / snix.store.v1): import
over gRPC into a daemon, its path info (NAR size and hash past 4 GiB), its Directory in G3
(uint64 size) and a clear refusal in G1, a real mount reading it at offsets past 4 GiB.

The file is sparse (a few random regions, zeros elsewhere): it costs no disk, its chunks of
zeros deduplicate in the store, and no process may hold it in memory: the peak resident size of
the import and of the daemon is checked to stay far below the file's size. Expected values come
from b3sum, `nix-store --dump` (streamed into sha256 here) and `nix-hash`, never from this
project's code.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from conftest import Daemon
from mountutil import MountProc, requires_fuse

from tvix_store.protocol.g3 import castore_pb2 as snix_castore

GiB = 1 << 30
SIZE = 5 * GiB
#: (offset, length) of the random regions; the rest of the file is zeros
REGIONS = [(0, 100_000), (4 * GiB - 70_000, 140_000), (4 * GiB + 212_345, 65_536), (SIZE - 65_536, 65_536)]
#: a process holding the file would need ≥ 5 GiB; streaming needs tens of MiB
MAX_RSS = 1 * GiB


def _make(path: Path) -> dict[int, bytes]:
    regions = {}
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for off, n in REGIONS:
            data = os.urandom(n)
            f.seek(off)
            f.write(data)
            regions[off] = data
    return regions


def _nar_of(path: Path) -> tuple[int, str]:
    """Size and sha256 of `nix-store --dump`, streamed (never whole in memory)."""
    h = hashlib.sha256()
    size = 0
    with subprocess.Popen(["nix-store", "--dump", str(path)], stdout=subprocess.PIPE) as p:
        assert p.stdout is not None
        while piece := p.stdout.read(1 << 20):
            h.update(piece)
            size += len(piece)
    assert p.returncode == 0
    return size, h.hexdigest()


def _vm_hwm(pid: int) -> int:
    """Peak resident set size of a running process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


_MEASURED = r"""
import resource, sys
from tvix_store.cli import main
rc = main(sys.argv[1:])
sys.stderr.write(f"\nmaxrss={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}\n")
sys.exit(rc)
"""


def _cli(*args: str) -> tuple[str, int]:
    """`tvix-store ARGS` in a process of its own: its output and its peak resident size (bytes)."""
    p = subprocess.run([sys.executable, "-c", _MEASURED, *args], capture_output=True, timeout=900)
    err = p.stderr.decode(errors="replace")
    assert p.returncode == 0, err
    return p.stdout.decode(), int(err.rsplit("maxrss=", 1)[1].split()[0])


@pytest.mark.nix
@pytest.mark.mount
@pytest.mark.slow
@requires_fuse
def test_five_gib_file_end_to_end_over_g3(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    big = tree / "big"
    regions = _make(big)
    (tree / "small").write_bytes(b"small\n")
    b3 = subprocess.run(["b3sum", "--no-names", "--no-mmap", str(big)], capture_output=True, text=True, check=True)
    b3sum = b3.stdout.strip()
    nar_size, nar_sha256 = _nar_of(tree)
    nar_hash = subprocess.run(
        ["nix-hash", "--type", "sha256", "--to-base32", nar_sha256], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert nar_size > 4 * GiB + SIZE // 5  # the NAR is past uint32 too

    d = Daemon(f"local://{tmp_path / 'store'}")
    try:
        url = d.url + "?protocol=g3"
        out, import_rss = _cli("import", "--store", url, str(tree))
        sp = out.strip()
        assert import_rss < MAX_RSS, f"import peaked at {import_rss} bytes"

        info = json.loads(_cli("path", "info", "--json", "--store", url, sp)[0])
        assert (info["narSize"], info["narHash"]) == (nar_size, f"sha256:{nar_hash}")
        root = bytes.fromhex(info["root"]["digest"])

        # the root Directory: G3 carries the size, G1 refuses it instead of truncating it
        with grpc.insecure_channel(d.address) as ch:
            get3 = ch.unary_stream(
                "/snix.castore.v1.DirectoryService/Get", response_deserializer=snix_castore.Directory.FromString
            )
            request = b"\x0a\x20" + root  # GetDirectoryRequest{digest = root}, encoded by hand
            (directory,) = list(get3(request, timeout=30))
            sizes = {bytes(f.name): f.size for f in directory.files}
            assert sizes == {b"big": SIZE, b"small": 6}
            assert directory.files[0].digest.hex() == b3sum
            get1 = ch.unary_stream("/tvix.store.v1.DirectoryService/Get")
            with pytest.raises(grpc.RpcError) as e:
                list(get1(request, timeout=30))
            assert e.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            assert "tvix.store.v1 (2022) cannot carry it" in (e.value.details() or "")

        # a real mount over G3: the size, and bytes at offsets past 4 GiB
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        m = MountProc(mnt, url, "--timeout", "30")
        try:
            f = mnt / "store" / sp.rsplit("/", 1)[1] / "big"
            assert f.stat().st_size == SIZE
            fd = os.open(f, os.O_RDONLY)
            try:
                for off, data in regions.items():
                    assert os.pread(fd, len(data), off) == data
                assert os.pread(fd, 4096, 4 * GiB + 1_000_000) == bytes(4096)
            finally:
                os.close(fd)
        finally:
            m.cleanup()
        daemon_rss = _vm_hwm(d.proc.pid)
        assert daemon_rss < MAX_RSS, f"daemon peaked at {daemon_rss} bytes"
    finally:
        assert d.stop() == 0
