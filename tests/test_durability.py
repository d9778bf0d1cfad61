"""Crash safety and multi-process use of the on-disk store, with real processes.

Writers are killed with SIGKILL at random instants; afterwards every visible object must
verify (`tvix_store.verify`, an fsck), nothing partial may be visible, and everything
committed before must be intact. Several processes (CLI commands, a daemon) write
overlapping data into one store directory at once; everything must read back correctly.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import Daemon, cli
from fixtures import HELLO, nix_dump, open_local, pack_bytes, random_bytes, verify
from mountutil import wait_until

from tvix_store.compose import open_store
from tvix_store.core.digest import B3Digest
from tvix_store.core.errors import StoreError
from tvix_store.objects.packs import REPACK_BELOW
from tvix_store.store import Store

pytestmark = pytest.mark.slow

# Puts blobs (small and multi-chunk), directories and path infos in a loop, printing one JSON
# line per committed object; the data of round i is a function of i, so a checker can recompute it.
WRITER = textwrap.dedent(
    """
    import json, random, sys
    from tvix_store.compose import open_store
    from tvix_store.core.castore import Directory, FileNode
    from tvix_store.core.pathinfo import PathInfo, StorePath

    def data(i):
        return random.Random(i).randbytes([10, 70_000, 1_300_000][i % 3] + i)

    s = open_store(sys.argv[1])
    i = int(sys.argv[2])
    while True:
        d = data(i)
        bd = s.blobs.put(d)
        print(json.dumps(["blob", i, bd.hex()]), flush=True)
        top = Directory(files=(FileNode(b"f%d" % i, bd, len(d)),))
        s.directories.put(top)
        print(json.dumps(["dir", i, top.digest.hex()]), flush=True)
        sp = StorePath.from_nar_sha256(bd, "p%d" % i)
        s.pathinfos.put(PathInfo(top.as_node(sp.basename.encode())))
        print(json.dumps(["pathinfo", i, sp.digest.hex()]), flush=True)
        i += 1
    """
)


def writer_data(i: int) -> bytes:
    return random.Random(i).randbytes([10, 70_000, 1_300_000][i % 3] + i)


def check_store(root: Path, committed: list[list]) -> None:  # type: ignore[type-arg]
    """fsck the store, then check every object a writer reported as committed."""
    s = open_local(root)
    rep = verify(s)
    assert rep.ok, rep.problems
    for kind, i, hexd in committed:
        if kind == "blob":
            r = s.blobs.open_read(B3Digest.from_hex(hexd))
            assert r is not None, f"committed blob {i} missing"
            assert r.read() == writer_data(i)
        elif kind == "dir":
            d = s.directories.get(B3Digest.from_hex(hexd))
            assert d is not None and d.files[0].name == b"f%d" % i
        else:
            info = s.pathinfos.get(bytes.fromhex(hexd))
            assert info is not None and info.store_path.name == f"p{i}"
    s.close()


def assert_no_partial_blob(s: Store, data: bytes) -> None:
    """The blob is either absent or complete and correct."""
    d = B3Digest.of(data)
    r = s.blobs.open_read(d)
    if r is not None:
        assert r.read() == data


def test_kill9_writer_at_random_instants(tmp_path: Path) -> None:
    root = tmp_path / "store"
    url = f"local://{root}"
    rng = random.Random(1234)
    committed: list[list] = []  # type: ignore[type-arg]
    start = 0
    for _ in range(4):
        p = subprocess.Popen(
            [sys.executable, "-c", WRITER, url, str(start)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        time.sleep(rng.uniform(0.3, 0.9))
        p.send_signal(signal.SIGKILL)
        out, err = p.communicate()
        assert p.returncode == -signal.SIGKILL, err.decode(errors="replace")
        lines = [json.loads(ln) for ln in out.decode().splitlines()]
        committed += lines
        check_store(root, committed)
        # the object being written when killed is absent or complete
        s = open_local(root)
        nxt = max((i for _, i, _ in lines), default=start - 1) + 1
        assert_no_partial_blob(s, writer_data(nxt))
        s.close()
        start = nxt + 1000  # fresh data next round
    assert any(k == "blob" for k, _, _ in committed)


def pack_of(root: Path, pid: int) -> tuple[bool, int, int] | None:
    """The pack writer `pid` appends to in a store directory: (sealed, bytes in the file, bytes
    up to its last indexed object), read from the index without opening the store."""
    import sqlite3

    db = sqlite3.connect(f"file:{root / 'index.sqlite'}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT id, sealed FROM packs WHERE pid=?", (pid,)).fetchone()
        if row is None:
            return None
        end = db.execute("SELECT MAX(offset + size) FROM objects WHERE pack=?", (row[0],)).fetchone()[0] or 0
    finally:
        db.close()
    return row[1] == 1, (root / "packs" / f"{row[0]}.pack").stat().st_size, end


def mid_write(root: Path, pid: int) -> bool:
    """Writer `pid` has written at least 2 MiB it has not indexed (staged chunks)."""
    import sqlite3

    try:
        p = pack_of(root, pid)
    except (sqlite3.OperationalError, FileNotFoundError):  # the store is not created yet
        return False
    return p is not None and p[1] - p[2] >= 2 << 20


def test_kill9_cli_blob_put_mid_write(tmp_path: Path) -> None:
    """`blob put -` is fed part of a blob and held there: its staged chunks are in its pack (the
    proof it is mid-write) when it is killed. Nothing of it is visible after, the store
    verifies, its pack is sealed with the torn tail cut on the next open, and the same put
    then works."""
    root = tmp_path / "store"
    url = f"local://{root}"
    keep = cli("blob", "put", "--store", url, "-", input=HELLO).stdout.decode().strip()
    for k, fed in enumerate((3 << 20, 9 << 20, (20 << 20) + 12345)):
        data = random_bytes(24 << 20, seed=500 + k)
        p = subprocess.Popen(
            [sys.executable, "-m", "tvix_store.cli", "blob", "put", "--store", url, "-"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert p.stdin is not None
        p.stdin.write(data[:fed])
        p.stdin.flush()
        wait_until(lambda p=p: mid_write(root, p.pid), what="staged chunks of the writer")
        p.kill()
        out, _ = p.communicate()
        assert p.returncode == -signal.SIGKILL and out == b""  # it never committed
        s = open_local(root)
        sealed, size, end = pack_of(root, p.pid) or (False, -1, -2)
        assert sealed and size == end  # its writer is dead: sealed, the torn tail cut
        rep = verify(s)
        assert rep.ok, rep.problems
        assert s.blobs.chunks(B3Digest.of(data)) is None
        assert s.blobs.read_chunk(B3Digest.from_hex(keep)) == HELLO
        d = s.blobs.put(data)
        assert d == B3Digest.of(data) and s.blobs.open_read(d).read() == data  # type: ignore[union-attr]
        assert verify(s).ok
        s.close()


def test_kill9_import_at_random_instants(tmp_path: Path) -> None:
    """`tvix-store import` of a tree (a 6 MiB file, then 400 small ones) killed at random
    instants (bounded rounds, each into a fresh store: odd ones at any instant of a run, even
    ones once its staged chunks prove it mid-write): after each the store verifies, and the
    store path is either absent or whole (its NAR equals `nix-store --dump`); an import into
    the last killed store completes."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    rng = random.Random(77)
    (src / "big").write_bytes(rng.randbytes(6 << 20))
    for i in range(400):
        (src / "d" / f"f{i:03}").write_bytes(rng.randbytes(rng.randrange(0, 20_000)))
    want = nix_dump(src)
    t0 = time.monotonic()
    cli("import", "--store", f"local://{tmp_path / 'timing'}", str(src))
    span = time.monotonic() - t0
    landed = 0
    for r in range(6):
        root = tmp_path / f"store{r}"
        url = f"local://{root}"
        p = subprocess.Popen(
            [sys.executable, "-m", "tvix_store.cli", "import", "--store", url, str(src)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        if r % 2:
            time.sleep(rng.uniform(0.05, span))
        else:
            wait_until(lambda p=p, root=root: p.poll() is not None or mid_write(root, p.pid), what="staged chunks")
        p.kill()
        out, err = p.communicate()
        assert p.returncode in (0, -signal.SIGKILL), err.decode(errors="replace")
        landed += p.returncode == -signal.SIGKILL
        rep = verify(open_local(root))
        assert rep.ok, rep.problems
        for path in cli("path", "list", "--store", url).stdout.decode().split():
            assert cli("nar", "--store", url, path).stdout == want
    assert landed >= 3, f"only {landed} of 6 kills landed before the import finished"
    path = cli("import", "--store", url, str(src)).stdout.decode().strip()
    assert cli("nar", "--store", url, path).stdout == want
    assert verify(open_local(root)).ok


def test_kill9_daemon_during_a_grpc_put(tmp_path: Path) -> None:
    """A daemon killed while a client streams a Put into it (its staged chunks on disk): the
    client gets an error, the store verifies, nothing partial is visible, and the next daemon
    over the directory seals the dead one's pack, its torn tail cut."""
    root = tmp_path / "store"
    url = f"local://{root}"
    d = Daemon(url)
    data = random_bytes(16 << 20, seed=41)
    with open_store(d.url, timeout=5) as client:
        w = client.blobs.open_write()
        w.write(data[: 8 << 20])
        wait_until(lambda: mid_write(root, d.proc.pid), what="chunks staged by the daemon")
        assert d.stop(signal.SIGKILL) == -signal.SIGKILL
        with pytest.raises(StoreError):
            w.write(data[8 << 20 :])
            w.close()
    d2 = Daemon(url)
    try:
        sealed, size, end = pack_of(root, d.proc.pid) or (False, -1, -2)
        assert sealed and size == end
        with open_store(d2.url) as c2:
            assert c2.blobs.chunks(B3Digest.of(data)) is None
    finally:
        assert d2.stop() == 0
    rep = verify(open_local(root))
    assert rep.ok, rep.problems


CONCURRENT = textwrap.dedent(
    """
    import json, random, sys
    from tvix_store.compose import open_store
    from tvix_store.core.castore import Directory, FileNode
    k = int(sys.argv[2])
    s = open_store(sys.argv[1])
    base = bytearray(random.Random(7).randbytes(12 << 20))   # shared by all processes
    out = {"shared": s.blobs.put(bytes(base)).hex()}
    base[(k + 1) << 20] ^= 0xFF                              # and a private variant
    out["variant"] = s.blobs.put(bytes(base)).hex()
    small = [s.blobs.put(b"small %d" % j).hex() for j in range(50)]  # identical in every process
    out["small"] = small
    nodes = [FileNode(b"f%02d" % j, s.blobs.put(b"small %d" % j), len(b"small %d" % j)) for j in range(50)]
    d = Directory(files=tuple(nodes))
    out["dir"] = s.directories.put(d).hex()
    print(json.dumps(out))
    """
)


def expected_concurrent(k: int) -> tuple[bytes, bytes]:
    base = bytearray(random.Random(7).randbytes(12 << 20))
    shared = bytes(base)
    base[(k + 1) << 20] ^= 0xFF
    return shared, bytes(base)


def test_concurrent_processes_overlapping_data(tmp_path: Path) -> None:
    root = tmp_path / "store"
    url = f"local://{root}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT, url, str(k)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for k in range(4)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode(errors="replace")
        results.append(json.loads(out))
    s = open_local(root)
    for k, res in enumerate(results):
        shared, variant = expected_concurrent(k)
        assert res["shared"] == B3Digest.of(shared).hex() == results[0]["shared"]
        assert s.blobs.open_read(B3Digest.from_hex(res["variant"])).read() == variant  # type: ignore[union-attr]
        assert res["small"] == results[0]["small"] and res["dir"] == results[0]["dir"]
    assert s.blobs.open_read(B3Digest.from_hex(results[0]["shared"])).read() == expected_concurrent(0)[0]  # type: ignore[union-attr]
    assert s.directories.get(B3Digest.from_hex(results[0]["dir"])) is not None
    rep = verify(s)
    assert rep.ok, rep.problems
    # deduplicated: the shared 12 MiB plus a few changed chunks per variant are indexed; bytes
    # two writers wrote at once are dead space, given back by `reclaim` (gc runs it)
    objects = s.blobs.objects  # type: ignore[attr-defined]
    live = sum(o.size for o in objects.list("chunks/"))
    assert live < (12 << 20) + 4 * 2 * (1 << 20) + 50 * 16
    objects.reclaim()
    assert pack_bytes(root) <= live / REPACK_BELOW
    assert verify(s).ok
    s.close()


def test_daemon_and_cli_processes_share_a_store(tmp_path: Path) -> None:
    root = tmp_path / "store"
    url = f"local://{root}"
    d = Daemon(url)
    try:
        files = []
        for k in range(3):
            data = bytearray(random_bytes(8 << 20, seed=77))
            data[k << 20] ^= 0x55
            f = tmp_path / f"f{k}"
            f.write_bytes(data)
            files.append((f, bytes(data)))
        # two CLI processes on the directory and one through the daemon, all at once
        targets = [url, url, d.url]
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "tvix_store.cli", "blob", "put", "--store", t, str(f)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for t, (f, _) in zip(targets, files, strict=True)
        ]
        digests = []
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err.decode(errors="replace")
            digests.append(out.decode().strip())
        for hexd, (_, data) in zip(digests, files, strict=True):
            assert hexd == B3Digest.of(data).hex()
            # readable through the daemon (its own writes and the CLI's) and directly
            assert cli("blob", "cat", "--store", d.url, hexd).stdout == data
            assert cli("blob", "cat", "--store", url, hexd).stdout == data
    finally:
        assert d.stop() == 0
    rep = verify(open_local(root))
    assert rep.ok, rep.problems
