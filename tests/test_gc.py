"""`tvix-store path list|info|rm`, `gc` and `verify` as real processes, over the embedded store.

Oracles are independent of the code under test: what gc leaves must be exactly the objects of a
fresh store into which only the kept trees were imported (content addressing makes that set
unique), every kept path's NAR must equal `nix-store --dump` of its source, and `verify` must
pass. GC is run against concurrent imports and killed with SIGKILL at random instants; verify
is shown one damaged store per kind of problem, and repairs it from a daemon holding good copies.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import Daemon, cli, one_line_error
from fixtures import nix_dump, nix_nar_hash
from test_hardening import chain_nar

from tvix_store.compose import open_store
from tvix_store.core import nixbase32
from tvix_store.core.castore import Directory, DirectoryNode, FileNode
from tvix_store.core.errors import PreconditionError
from tvix_store.core.pathinfo import NarInfo, PathInfo, Signature, StorePath
from tvix_store.gc import CLOCK_SLACK, GcLock, objects_of, parse_duration
from tvix_store.objects import ObjectStore
from tvix_store.store import Store

#: the kinds the object layer holds for blobs, Directories and PathInfos
KINDS = ("chunks", "blobs", "directories", "pathinfos")


# --- helpers ----------------------------------------------------------------------------------


def make(root: Path, seed: int, files: int = 6, big: int = 0) -> Path:
    """A tree with content of its own (by `seed`) and content every tree shares (`common/`,
    `shared.txt`): gc must keep what a kept tree shares with a removed one."""
    rng = random.Random(seed)
    (root / "sub").mkdir(parents=True)
    (root / "common").mkdir()
    for i in range(files):
        (root / f"f{i}").write_bytes(rng.randbytes(rng.randrange(1, 40_000)))
    (root / "sub" / "s").write_bytes(rng.randbytes(3000))
    (root / "common" / "c").write_bytes(b"the same in every tree\n")
    (root / "shared.txt").write_bytes(b"shared\n" * 100)
    if big:
        (root / "big").write_bytes(rng.randbytes(big))  # several chunks: a chunk list
    os.symlink("f0", root / "link")
    return root


def imp(url: str, *paths: Path) -> list[str]:
    return cli("import", "--store", url, *map(str, paths)).stdout.decode().split()


def keys(url: str) -> set[str]:
    """Every object of the object layer (blobs, Directories, PathInfos), by key."""
    with open_store(url) as s:
        return {o.key for o in _objects(s).list() if o.key.split("/")[0] in KINDS}


def _objects(s: Store) -> ObjectStore:
    o = objects_of(s)
    assert o is not None
    return o


def nar_ok(url: str, path: str, src: Path) -> None:
    assert cli("nar", "--store", url, path).stdout == nix_dump(src), path


def gc(url: str, *args: str) -> dict[str, tuple[int, int, int, int]]:
    """Run gc; per kind (deleted, deleted bytes, kept, kept bytes) from its output."""
    out = cli("gc", "--store", url, *args).stdout.decode()
    got = {}
    for line in out.splitlines():
        kind, _, rest = line.partition(": ")
        if kind in ("directories", "blobs", "chunks"):
            w = rest.replace("(", " ").replace(")", " ").replace(",", " ").split()
            nums = [int(x) for x in w if x.isdigit()]
            got[kind] = (nums[0], nums[1], nums[2], nums[3])
    assert set(got) == {"directories", "blobs", "chunks"}, out
    return got


def age() -> None:
    """Let everything written so far become older than `--grace 0s` (plus the clock slack)."""
    time.sleep(CLOCK_SLACK + 0.2)


def verify_ok(url: str) -> None:
    p = cli("verify", "--store", url, check=False)
    assert p.returncode == 0, p.stdout.decode() + p.stderr.decode()
    assert p.stdout.decode().startswith("ok: "), p.stdout


# --- path list / info / rm --------------------------------------------------------------------


def test_path_list_info_rm_with_json_and_errors(tmp_path: Path) -> None:
    url = f"local://{tmp_path / 'store'}"
    a, b = make(tmp_path / "a", 1), make(tmp_path / "b", 2)
    pa, pb = imp(url, a, b)
    # a third path, put in-process, with references and a signature (imports have neither)
    sig = Signature("cache.example.org-1", bytes(range(64)))
    with open_store(url) as s:
        ia = s.pathinfos.get(StorePath.parse(pa).digest)
        assert ia is not None and ia.node is not None and ia.narinfo is not None
        spc = StorePath(hashlib.sha1(b"c").digest(), "c")
        refs = (StorePath.parse(pa), StorePath.parse(pb))
        s.pathinfos.put(
            PathInfo(
                node=ia.node.renamed(spc.basename.encode()),
                references=tuple(r.digest for r in refs),
                narinfo=NarInfo(
                    ia.narinfo.nar_size,
                    ia.narinfo.nar_sha256,
                    signatures=(sig,),
                    reference_names=tuple(r.basename for r in refs),
                ),
            )
        )
    pc = spc.absolute
    listed = cli("path", "list", "--store", url).stdout.decode().splitlines()
    assert listed == sorted([pa, pb, pc])
    js = [json.loads(line) for line in cli("path", "list", "--store", url, "--json").stdout.decode().splitlines()]
    assert [j["path"] for j in js] == listed
    for j in js:
        src = {pa: a, pb: b, pc: a}[j["path"]]
        size, sha = nix_nar_hash(src)
        assert j["narSize"] == size
        assert j["narHash"] == "sha256:" + nixbase32.encode(sha)
        assert j["references"] == ([pa, pb] if j["path"] == pc else [])
        assert set(j) == {"path", "narSize", "narHash", "references"}

    info = cli("path", "info", "--store", url, pc).stdout.decode().splitlines()
    assert info[0] == f"store path: {pc}"
    assert info[1] == f"root: directory {ia.node.digest.hex()} (size {ia.node.size})"  # type: ignore[union-attr]
    assert f"nar size: {ia.narinfo.nar_size}" in info
    assert f"nar hash: sha256:{nixbase32.encode(ia.narinfo.nar_sha256)}" in info
    assert [x for x in info if x.startswith("reference: ")] == [f"reference: {pa}", f"reference: {pb}"]
    assert "signature: cache.example.org-1:" + base64.b64encode(sig.data).decode() in info
    j = json.loads(cli("path", "info", "--store", url, "--json", pa).stdout)
    assert j["root"] == {"type": "directory", "digest": ia.node.digest.hex(), "size": ia.node.size}  # type: ignore[union-attr]
    assert j["references"] == [] and j["signatures"] == [] and j["path"] == pa

    # rm: all named paths must exist, else nothing is removed
    one_line_error(cli("path", "rm", "--store", url, pb, pb.replace(pb[11:20], "0" * 9), check=False), 1, "not found")
    assert len(cli("path", "list", "--store", url).stdout.decode().splitlines()) == 3
    one_line_error(cli("path", "rm", "--store", url, "/nix/store/not-a-path", check=False), 2)
    one_line_error(cli("path", "info", "--store", url, pb.replace(pb[11:20], "0" * 9), check=False), 1, "not found")
    before = keys(url)
    assert cli("path", "rm", "--store", url, pb, pc).stdout == b""
    assert cli("path", "list", "--store", url).stdout.decode().split() == [pa]
    assert keys(url) == before - {f"pathinfos/{pb[11:43]}", f"pathinfos/{pc[11:43]}"}  # the PathInfos only
    one_line_error(cli("nar", "--store", url, pb, check=False), 1, "not found")
    nar_ok(url, pa, a)


def test_path_and_maintenance_commands_over_grpc(tmp_path: Path) -> None:
    """Over gRPC path infos can be listed (List, 2024 and 2025 generations) but not deleted (no
    generation has a delete call): clear errors for what needs the store itself."""
    url = f"local://{tmp_path / 'store'}"
    (pa,) = imp(url, make(tmp_path / "a", 1))
    d = Daemon(url)
    try:
        assert cli("path", "list", "--store", d.url).stdout.decode().split() == [pa]
        one_line_error(cli("path", "rm", "--store", d.url, pa, check=False), 1, "cannot remove", d.url)
        one_line_error(cli("gc", "--store", d.url, check=False), 1, "gc needs", d.url)
        one_line_error(cli("verify", "--store", d.url, check=False), 1, "verify needs", d.url)
        assert cli("path", "info", "--store", d.url, pa).stdout.decode().startswith(f"store path: {pa}\n")
        # a listing store (path infos local, the rest over gRPC) can list
        out = cli("path", "list", "--store", d.url, "--pathinfo-store", url).stdout.decode()
        assert out.split() == [pa]
    finally:
        assert d.stop() == 0


# --- gc ---------------------------------------------------------------------------------------


def test_gc_removes_exactly_the_unreachable_objects(tmp_path: Path) -> None:
    url = f"local://{tmp_path / 'store'}"
    srcs = [make(tmp_path / f"t{i}", i, big=1_500_000 if i == 1 else 0) for i in range(3)]
    paths = imp(url, *srcs)
    one_line_error(cli("gc", "--store", url, "--grace", "soon", check=False), 2, "invalid duration")
    age()
    full = keys(url)
    # nothing unreachable yet: nothing goes
    assert all(v[0] == 0 for v in gc(url, "--grace", "0s").values())
    assert keys(url) == full
    cli("path", "rm", "--store", url, paths[1])
    age()
    dry = gc(url, "--grace", "0s", "--dry-run")
    assert keys(url) == full - {f"pathinfos/{paths[1][11:43]}"}  # --dry-run deletes nothing
    assert dry["chunks"][0] > 0 and dry["blobs"][0] == 1 and dry["directories"][0] == 2
    real = gc(url, "--grace", "0s")
    assert real == dry  # what the dry run said is what was done
    # the oracle: a fresh store with only the kept trees holds exactly what is left
    oracle = f"local://{tmp_path / 'oracle'}"
    assert imp(oracle, srcs[0], srcs[2]) == [paths[0], paths[2]]
    left = keys(url)
    assert left == keys(oracle)
    kept = {k: (v[2], v[3]) for k, v in real.items()}
    with open_store(url) as s:
        for kind in kept:
            objs = [o for o in _objects(s).list(kind + "/")]
            assert kept[kind] == (len(objs), sum(o.size for o in objs))
    verify_ok(url)
    for p, src in ((paths[0], srcs[0]), (paths[2], srcs[2])):
        nar_ok(url, p, src)
    # a second run finds nothing more
    assert all(v[0] == 0 for v in gc(url, "--grace", "0s").values())


def test_gc_grace_keeps_young_objects_and_a_reput_makes_them_young(tmp_path: Path) -> None:
    url = f"local://{tmp_path / 'store'}"
    a, b = make(tmp_path / "a", 1), make(tmp_path / "b", 2)
    pa, pb = imp(url, a, b)
    cli("path", "rm", "--store", url, pa, pb)
    # default grace (1h): nothing unreachable is old enough
    assert all(v[0] == 0 for v in gc(url).values())
    time.sleep(2 * (CLOCK_SLACK + 0.2))
    # now everything is older than 1 s + slack; a blob put of one of b's files touches it
    # (dedup: found present, relied on) and a new blob is written: both young
    reput = cli("blob", "put", "--store", url, str(b / "f1")).stdout.decode().strip()
    fresh_file = tmp_path / "fresh"
    fresh_file.write_bytes(b"written just now\n")
    fresh = cli("blob", "put", "--store", url, str(fresh_file)).stdout.decode().strip()
    got = gc(url, "--grace", "1s")
    assert got["directories"][2:] == (0, 0) and got["chunks"][2] == 2
    left = keys(url)
    assert left == {f"chunks/{reput}", f"chunks/{fresh}"}, left
    # the young ones go once they are old enough
    time.sleep(2 * (CLOCK_SLACK + 0.2))
    gc(url, "--grace", "1s")
    assert keys(url) == set()
    verify_ok(url)


def test_gc_keep_roots_when_the_path_infos_are_elsewhere(tmp_path: Path) -> None:
    data, meta = f"local://{tmp_path / 'data'}", f"local://{tmp_path / 'meta'}"
    a, b = make(tmp_path / "a", 1), make(tmp_path / "b", 2, big=1_200_000)
    pa, pb = cli("import", "--store", data, "--pathinfo-store", meta, str(a), str(b)).stdout.decode().split()
    age()
    split = ("--store", data, "--pathinfo-store", meta)
    one_line_error(cli("gc", *split, "--grace", "0s", check=False), 1, "--keep")
    one_line_error(cli("gc", *split, "--keep", "nonsense", check=False), 2, "--keep")
    missing = pb.replace(pb[11:20], "0" * 9)
    before = keys(data)
    one_line_error(cli("gc", *split, "--grace", "0s", "--keep", pa, "--keep", missing, check=False), 1, "not found")
    assert keys(data) == before
    got = gc(data, "--pathinfo-store", meta, "--grace", "0s", "--keep", pa)
    assert got["blobs"][0] == 1 and got["directories"][0] == 2  # b's big file, b's root and sub
    assert cli("nar", *split, pa).stdout == nix_dump(a)
    oracle = f"local://{tmp_path / 'oracle'}"
    imp(oracle, a)
    assert keys(data) == keys(oracle) - {k for k in keys(oracle) if k.startswith("pathinfos/")}


def test_gc_of_a_5000_level_tree(tmp_path: Path) -> None:
    """Marking and the parents-first order of deletion are iterative: a chain of 5,000
    Directories (built directly: a filesystem tree that deep is past PATH_MAX) is kept whole
    while a path names it, and deleted whole, parents first, once unreachable."""
    url = f"local://{tmp_path / 'store'}"
    depth = 5000
    paths = []
    with open_store(url) as s:
        for leaf in (b"kept\n", b"dropped\n"):
            blob = s.blobs.put(leaf)
            d = Directory(files=(FileNode(b"leaf", blob, len(leaf)),))
            chain = [d]
            for _ in range(depth):
                d = Directory(directories=(DirectoryNode(b"d", d.digest, d.size),))
                chain.append(d)
            s.directories.put_graph(chain)
            nar = chain_nar(depth, leaf)
            sp = StorePath.from_nar_sha256(hashlib.sha256(nar).digest(), "deep")
            s.pathinfos.put(
                PathInfo(node=d.as_node(sp.basename.encode()), narinfo=NarInfo(len(nar), hashlib.sha256(nar).digest()))
            )
            paths.append((sp.absolute, nar))
    cli("path", "rm", "--store", url, paths[1][0])
    age()
    got = gc(url, "--grace", "0s")
    assert got["directories"][:1] == (depth + 1,) and got["directories"][2] == depth + 1
    assert got["chunks"][0] == 1
    assert cli("nar", "--store", url, paths[0][0]).stdout == paths[0][1]
    verify_ok(url)


# An importer process: imports random trees in a loop until a deadline, one JSON line each
# ([tree, store path] or [tree, null, error]); the store stays open (no start-up per import).
# Right after each import it checks, holding the GC lock shared (no sweep meanwhile), that if
# the path is still there its NAR renders whole and right: a sweep that raced the import (an
# object adopted, then deleted) would show here, before a remover can hide it.
IMPORTER = """
import json, os, random, sys
from pathlib import Path
from tvix_store.compose import open_store
from tvix_store.gc import GcLock
from tvix_store.importer import import_path
url, check_root, seed, stop, trees = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5:]
rng = random.Random(seed)
with open_store(url) as s, open_store("local://" + check_root) as local:
    while not os.path.exists(stop):
        t = rng.choice(trees)
        try:
            info = import_path(s, t)
        except Exception as e:
            print(json.dumps([t, None, f"{type(e).__name__}: {e}"]), flush=True)
            continue
        line = [t, info.store_path.absolute]
        with GcLock(Path(check_root)).shared():
            now = local.pathinfos.get(info.store_path.digest)
            if now is not None:
                try:
                    got = local.pathinfos.calculate_nar(now.node)
                    if got != (info.narinfo.nar_size, info.narinfo.nar_sha256):
                        line.append("BROKEN: wrong NAR")
                except Exception as e:
                    line.append(f"BROKEN: {type(e).__name__}: {e}")
        print(json.dumps(line), flush=True)
"""

# Removes a random store path of a dropped tree (named r…) ten times a second.
REMOVER = """
import os, random, sys, time
from tvix_store.compose import open_store
url, stop = sys.argv[1], sys.argv[2]
rng = random.Random(3)
with open_store(url) as s:
    while not os.path.exists(stop):
        doomed = [i.store_path for i in s.pathinfos.iter_all() if i.store_path.name.startswith("r")]
        if doomed:
            s.pathinfos.delete(rng.choice(doomed).digest)
        time.sleep(0.1)
"""


@pytest.mark.slow
def test_gc_against_concurrent_imports(tmp_path: Path) -> None:
    """Importer processes (local, and one through a daemon) loop over trees while a remover
    drops the paths of some of them and gc (grace 0) runs again and again, so imports keep
    adopting objects that are unreachable and old (found present, not written): none is swept
    under them. Afterwards verify passes (every present PathInfo's closure is whole) and every
    present path's NAR is `nix-store --dump` of its tree."""
    url = f"local://{tmp_path / 'store'}"
    kept = [make(tmp_path / f"k{i}", 100 + i, files=60) for i in range(2)]
    dropped = [make(tmp_path / f"r{i}", 200 + i, files=60) for i in range(3)]
    for i, r in enumerate(dropped[:2]):  # dropped trees share a subtree and files with kept ones
        (r / "sub" / "kept-copy").write_bytes((kept[i] / "f1").read_bytes())
    trees = [str(t) for t in kept + dropped]
    imp(url, *kept, *dropped)
    age()
    d = Daemon(url)
    stop = tmp_path / "stop"  # the importers and the remover end when it appears
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", IMPORTER, u, str(tmp_path / "store"), str(n), str(stop), *trees],
            stdout=subprocess.PIPE,
        )
        for n, u in enumerate([url, url, url, d.url])
    ]
    procs.append(subprocess.Popen([sys.executable, "-c", REMOVER, url, str(stop)]))
    gc_runs = 0
    start = time.monotonic()
    try:
        # at least 10 gc runs and 20 s of racing (a minimum: on a slow machine it runs longer)
        while gc_runs < 10 or time.monotonic() - start < 20:
            cli("gc", "--store", url, "--grace", "0s")
            gc_runs += 1
        stop.touch()
        outs = [p.communicate(timeout=120)[0] for p in procs[:4]]
        assert procs[4].wait(60) == 0
    finally:
        for p in procs:
            p.kill()
        assert d.stop() == 0
    done = [json.loads(line) for out in outs for line in out.decode().splitlines()]
    local = [x for out in outs[:3] for x in map(json.loads, out.decode().splitlines())]
    assert len(local) >= 30 and all(x[1] is not None for x in local), [x for x in local if x[1] is None][:3]
    assert not [x for x in done if len(x) > 2 and x[1] is not None], [x for x in done if len(x) > 2][:3]
    # over gRPC a race with gc may refuse a write: the import fails with a store error, cleanly
    assert all(x[1] is not None or x[2].split(":")[0].endswith("Error") for x in done)
    verify_ok(url)
    by_name = {t.name: t for t in kept + dropped}
    listed = cli("path", "list", "--store", url).stdout.decode().split()
    assert {Path(p).name.split("-", 1)[1] for p in listed} >= {"k0", "k1"}
    for p in listed:
        nar_ok(url, p, by_name[Path(p).name.split("-", 1)[1]])


@pytest.mark.slow
def test_gc_killed_at_random_instants(tmp_path: Path) -> None:
    """kill -9 of gc at random points (bounded rounds: half at any instant, half within the
    sweep; garbage made again when a run finished it): verify passes after each (objects are
    deleted parents first, so nothing left refers to something deleted), the kept paths are
    intact, and a last run finishes the job exactly."""
    url = f"local://{tmp_path / 'store'}"
    # the removed trees are many small files: a sweep long enough for kills to land inside it
    srcs = [make(tmp_path / f"t{i}", 300 + i, files=800 if i % 2 else 50, big=1_100_000 * (i == 1)) for i in range(4)]
    paths = imp(url, *srcs)
    cli("path", "rm", "--store", url, *paths[1::2])
    age()
    oracle = f"local://{tmp_path / 'oracle'}"
    imp(oracle, *srcs[0::2])
    clean = keys(oracle)
    base = [sys.executable, "-m", "tvix_store.cli", "gc", "--store", url, "--grace", "0s"]
    rng = random.Random(1)
    partial = rounds = 0
    span = 0.0
    while rounds < 16 and not (rounds >= 6 and partial >= 2):
        if keys(url) == clean:  # nothing left to collect: make garbage again
            assert imp(url, *srcs[1::2]) == paths[1::2]
            cli("path", "rm", "--store", url, *paths[1::2])
            age()
        if not span:  # how long a run takes up to its sweep (a dry run: the same work, no deletes)
            t0 = time.monotonic()
            gc(url, "--grace", "0s", "--dry-run")
            span = time.monotonic() - t0
        before = keys(url)
        proc = subprocess.Popen(base, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if rounds % 2:  # any instant of the run, reclaim() after the sweep included
            time.sleep(rng.uniform(0.1, 1.3 * span))
        else:  # within the sweep: from when it holds the lock exclusively
            _wait_for_sweep(tmp_path / "store", proc)
            time.sleep(rng.uniform(0, 0.04))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        rounds += 1
        after = keys(url)
        assert after <= before and clean <= after  # nothing reachable was deleted
        partial += clean < after < before
        verify_ok(url)
    gc(url, "--grace", "0s")
    assert keys(url) == clean
    for p, src in zip(paths[0::2], srcs[0::2], strict=True):
        nar_ok(url, p, src)
    verify_ok(url)
    assert partial >= 1, f"no kill of {rounds} landed inside a sweep"


def _wait_for_sweep(root: Path, proc: subprocess.Popen[bytes]) -> None:
    """Until a gc holds the store's lock exclusively (or ends): a shared try-lock then fails."""
    fd = os.open(root / "gc.lock", os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        while proc.poll() is None:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return
            fcntl.flock(fd, fcntl.LOCK_UN)
            time.sleep(0.001)
    finally:
        os.close(fd)


def test_a_pathinfo_put_after_a_sweep_is_checked_again(tmp_path: Path) -> None:
    """The daemon caches the NAR of each root it admitted; a sweep since may have deleted that
    closure, so after one the cache is void: a PathInfo Put naming the collected root is
    refused (FAILED_PRECONDITION), not stored with a hole."""
    url = f"local://{tmp_path / 'store'}"
    d = Daemon(url)
    try:
        (p,) = imp(d.url, make(tmp_path / "a", 1))
        with open_store(d.url) as s:
            info = s.pathinfos.get(StorePath.parse(p).digest)
        assert info is not None
        cli("path", "rm", "--store", url, p)
        age()
        assert gc(url, "--grace", "0s")["directories"][0] == 3
        with open_store(d.url) as s, pytest.raises(PreconditionError, match="incomplete"):
            s.pathinfos.put(info)
    finally:
        assert d.stop() == 0
    assert cli("path", "list", "--store", url).stdout == b""
    verify_ok(url)


# --- the lock, the durations -------------------------------------------------------------------


def test_durations() -> None:
    assert parse_duration("0s") == 0
    assert parse_duration("15m") == 900
    assert parse_duration("2h") == 7200
    assert parse_duration("1d") == 86400
    assert parse_duration("1h30m") == 5400
    assert parse_duration("1.5s") == 1.5
    for bad in ("", "5", "h", "1x", "-1s", "1h 2m", "1hh"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_the_sweep_waits_for_writers_and_holds_new_ones_back(tmp_path: Path) -> None:
    lock = GcLock(tmp_path)
    events: list[str] = []
    writer_in = threading.Event()
    release = threading.Event()

    def writer() -> None:
        with lock.shared():
            writer_in.set()
            release.wait(10)
            events.append("first writer done")

    def sweeper() -> None:
        with lock.exclusive():
            events.append("sweep")
            time.sleep(0.2)
            events.append("sweep done")

    def late_writer() -> None:
        with lock.shared():
            events.append("late writer")

    w = threading.Thread(target=writer)
    w.start()
    assert writer_in.wait(10)
    g = threading.Thread(target=sweeper)
    g.start()
    time.sleep(0.2)
    late = threading.Thread(target=late_writer)
    late.start()  # the gc is waiting: this one waits behind it
    time.sleep(0.2)
    assert events == []
    release.set()
    for t in (w, g, late):
        t.join(10)
    assert events == ["first writer done", "sweep", "sweep done", "late writer"]


# --- verify -----------------------------------------------------------------------------------


def _damage(tmp_path: Path, url: str) -> tuple[list[str], list[Path], dict[str, str]]:
    """Four paths, each damaged in one way: a flipped byte in a chunk, a missing chunk of a
    chunk list, a Directory whose child is gone, a PathInfo whose root is gone."""
    srcs = [make(tmp_path / f"v{i}", 400 + i, big=1_300_000 if i < 2 else 0) for i in range(4)]
    paths = imp(url, *srcs)
    with open_store(url) as s:
        o = _objects(s)
        infos = [s.pathinfos.get(StorePath.parse(p).digest) for p in paths]
        roots = [i.node for i in infos if i is not None]
        assert len(roots) == 4 and all(isinstance(r, DirectoryNode) for r in roots)

        def big_chunks(i: int) -> list[str]:
            d = s.directories.get(roots[i].digest)  # type: ignore[union-attr]
            big = d.lookup(b"big")  # type: ignore[union-attr]
            cs = s.blobs.chunks(big.digest)  # type: ignore[union-attr]
            assert cs is not None and len(cs) > 1
            return [c.digest.hex() for c in cs]

        flipped = big_chunks(0)[1]
        raw = bytearray(o.get(f"chunks/{flipped}") or b"")
        raw[100] ^= 0x01
        o.put(f"chunks/{flipped}", bytes(raw), replace=True)
        gone_chunk = big_chunks(1)[2]
        o.delete(f"chunks/{gone_chunk}")
        sub = s.directories.get(roots[2].digest).lookup(b"sub")  # type: ignore[union-attr]
        o.delete(f"directories/{sub.digest.hex()}")  # type: ignore[union-attr]
        o.delete(f"directories/{roots[3].digest.hex()}")  # type: ignore[union-attr]
    what = {
        "flipped": flipped,
        "chunk": gone_chunk,
        "child": sub.digest.hex(),  # type: ignore[union-attr]
        "root": roots[3].digest.hex(),  # type: ignore[union-attr]
        "parent": roots[2].digest.hex(),  # type: ignore[union-attr]
    }
    return paths, srcs, what


def test_verify_reports_each_problem_on_one_line(tmp_path: Path) -> None:
    url = f"local://{tmp_path / 'store'}"
    paths, _, what = _damage(tmp_path, url)
    p = cli("verify", "--store", url, check=False)
    lines = p.stdout.decode().splitlines()
    assert len(lines) == 4, lines
    assert any(line.startswith(f"chunk {what['flipped']} is corrupt") for line in lines), lines
    assert any(f"chunk {what['chunk']} is missing" in line for line in lines), lines
    assert any(line.startswith(f"directory {what['parent']}: child 'sub'") and what["child"] in line for line in lines)
    assert any(f"root directory {what['root']} is missing" in line and paths[3] in line for line in lines), lines
    one_line_error(p, 1, "4 problems")
    # a read of the flipped chunk is an error too (the CLI, not only verify)
    p = cli("nar", "--store", url, paths[0], check=False)
    err = p.stderr.decode()
    assert p.returncode == 1 and "Traceback" not in err
    assert err.splitlines()[-1].startswith("tvix-store: error: ") and what["flipped"] in err.splitlines()[-1]


def test_verify_repairs_from_a_daemon_with_good_copies(tmp_path: Path) -> None:
    url = f"local://{tmp_path / 'store'}"
    paths, srcs, what = _damage(tmp_path, url)
    good = f"local://{tmp_path / 'good'}"
    assert imp(good, *srcs) == paths
    empty = Daemon(f"local://{tmp_path / 'empty'}")
    try:  # a source without the objects: each says why, and the exit status says it is not whole
        p = cli("verify", "--store", url, "--repair-from", empty.url, check=False)
        out = p.stdout.decode()
        assert out.count("cannot repair") == 4, out
        one_line_error(p, 1, "4 problems remain")
    finally:
        assert empty.stop() == 0
    d = Daemon(good)
    try:
        p = cli("verify", "--store", url, "--repair-from", d.url)
        out = p.stdout.decode().splitlines()
        for key in (f"chunks/{what['flipped']}", f"chunks/{what['chunk']}", f"directories/{what['child']}"):
            assert any(line.startswith(f"repaired {key} from {d.url}") for line in out), out
        assert out[-1] == "ok after repair: 4 objects repaired", out
    finally:
        assert d.stop() == 0
    verify_ok(url)
    for path, src in zip(paths, srcs, strict=True):
        nar_ok(url, path, src)
