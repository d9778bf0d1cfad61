"""The object layer (`tvix_store.objects`): one contract over every backend (files, memory, the
bounded wrapper over files), and the bounded wrapper's own policy — a hard bound at every
moment, least recently used first, recency that survives a reopen."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import pytest
from fixtures import coexisting_disk_use, random_bytes
from mountutil import wait_until

from tvix_store.objects import ObjectStore
from tvix_store.objects.bounded import BoundedObjectStore, disk_charge
from tvix_store.objects.files import FileObjectStore
from tvix_store.objects.memory import MemoryObjectStore


@pytest.fixture(params=["files", "memory", "bounded"])
def objects(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    if request.param == "files":
        o: ObjectStore = FileObjectStore(tmp_path / "o")
    elif request.param == "memory":
        o = MemoryObjectStore()
    else:
        o = BoundedObjectStore(FileObjectStore(tmp_path / "o", exclusive=True), 1 << 30)
    try:
        yield o
    finally:
        o.close()


KEY = "chunks/" + "ab" * 32


def test_put_is_put_if_absent_unless_replace(objects: ObjectStore) -> None:
    assert objects.get(KEY) is None and objects.stat(KEY) is None and not objects.has(KEY)
    assert objects.put(KEY, b"first")
    assert not objects.put(KEY, b"second")
    assert objects.get(KEY) == b"first" and objects.stat(KEY) == 5 and objects.has(KEY)
    assert objects.put(KEY, b"third!", replace=True)
    assert objects.get(KEY) == b"third!"
    assert objects.get_range(KEY, 2, 3) == b"ird" and objects.get_range(KEY, 4, 100) == b"d!"


def test_staged_objects_are_invisible_until_committed(objects: ObjectStore) -> None:
    s = objects.stage(b"staged bytes")
    assert objects.get(KEY) is None and not [o for o in objects.list() if o.key == KEY]
    assert s.commit(KEY)
    assert objects.get(KEY) == b"staged bytes"
    d = objects.stage(b"dropped")
    d.discard()
    d.discard()  # idempotent
    other = "chunks/" + "cd" * 32
    assert objects.get(other) is None
    with pytest.raises(ValueError):
        d.commit(other)


def test_list_delete_and_keys(objects: ObjectStore) -> None:
    keys = ["chunks/" + "01" * 32, "blobs/" + "02" * 32, "directories/" + "03" * 32, "pathinfos/" + "x" * 32]
    for i, k in enumerate(keys):
        objects.put(k, bytes([i]) * (i + 1))
    assert sorted((o.key, o.size) for o in objects.list()) == sorted((k, i + 1) for i, k in enumerate(keys))
    assert [o.key for o in objects.list("blobs/")] == [keys[1]]
    assert objects.delete(keys[0]) and not objects.delete(keys[0])
    assert objects.get(keys[0]) is None
    for bad in ("nokind", "chunks/", "chunks/a/b", "other/x", "chunks/.hidden"):
        with pytest.raises(ValueError):
            objects.put(bad, b"x")


def test_file_objects_are_files_of_the_one_layout(tmp_path: Path) -> None:
    o = FileObjectStore(tmp_path / "o")
    o.put(KEY, b"x")
    o.put("pathinfos/" + "z" * 32, b"y")
    assert (tmp_path / "o" / "chunks" / "ab" / ("ab" * 32)).read_bytes() == b"x"
    assert (tmp_path / "o" / "pathinfos" / ("z" * 32)).read_bytes() == b"y"
    assert (tmp_path / "o" / "TVIX-STORE").read_text() == "tvix-store local store, layout 1\n"
    assert not list((tmp_path / "o" / "tmp").iterdir())


def test_touch_orders_uses_on_disk_even_in_quick_succession(tmp_path: Path) -> None:
    o = FileObjectStore(tmp_path / "o")
    keys = [f"chunks/{i:064x}" for i in range(50)]
    for k in keys:
        o.put(k, b"x")
    order = keys[25:] + keys[:25]
    for k in order:  # no sleeps: the stamps themselves are ordered
        o.touch(k)
    assert [x.key for x in sorted(o.list(), key=lambda x: x.mtime)] == order


def test_a_second_owner_of_an_exclusive_store_is_read_only(tmp_path: Path) -> None:
    first = FileObjectStore(tmp_path / "o", exclusive=True)
    first.put(KEY, b"x")
    second = FileObjectStore(tmp_path / "o", exclusive=True)
    try:
        assert first.writable and not second.writable
        assert second.get(KEY) == b"x"
        assert not second.put("chunks/" + "cd" * 32, b"y") and not second.delete(KEY)
    finally:
        second.close()
        first.close()


# --- the bounded wrapper -------------------------------------------------------------------------


def bounded(root: Path, limit: int) -> BoundedObjectStore:
    return BoundedObjectStore(FileObjectStore(root, exclusive=True), limit)


def test_bound_holds_at_every_moment_under_concurrent_writers(tmp_path: Path) -> None:
    limit = 600_000
    o = bounded(tmp_path / "o", limit)
    over: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            u = coexisting_disk_use(tmp_path / "o")
            if u > limit:
                over.append(u)

    w = threading.Thread(target=watch)
    w.start()
    try:

        def writer(k: int) -> None:
            for i in range(60):
                data = random_bytes(5_000 + (i * 997 + k * 131) % 40_000, seed=k * 1000 + i)
                o.put(f"chunks/{k:02x}{i:062x}", data)
                if i % 7 == 0:
                    o.get(f"chunks/{k:02x}{i // 2:062x}")

        with futures.ThreadPoolExecutor(4) as ex:
            list(ex.map(writer, range(4)))
    finally:
        stop.set()
        w.join()
    try:
        assert not over, f"{max(over)} bytes on disk, bound {limit}"
        assert o.counters.get("cache_evictions") > 0
        # once background eviction is idle, the accounting is exactly what is on disk
        wait_until(lambda: o.counters.get("cache_bytes") == coexisting_disk_use(tmp_path / "o"), 10)
        assert o.counters.get("cache_bytes") <= limit
        assert o.put("chunks/" + "ff" * 32, b"x" * (limit + 1)) is False  # larger than the bound
        assert o.counters.get("cache_uncacheable") == 1
    finally:
        o.close()


def test_foreground_eviction_alone_is_exact_and_least_recent_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tvix_store.objects.bounded as bounded_mod

    monkeypatch.setattr(bounded_mod, "HIGH_WATERMARK", 100.0)  # no background eviction
    datas = [random_bytes(9_000 + (i * 7919) % 21_000, seed=200 + i) for i in range(40)]
    keys = [f"chunks/{i:064x}" for i in range(40)]
    limit = 200_000
    o = bounded(tmp_path / "o", limit)
    try:
        for i, (k, data) in enumerate(zip(keys, datas, strict=True)):
            o.put(k, data)
            if i % 3 == 0:
                assert o.get(keys[0]) == datas[0]  # keep keys[0] recent
            use = coexisting_disk_use(tmp_path / "o")
            assert use <= limit
            if sum(disk_charge(len(x)) for x in datas[: i + 1]) > limit:
                assert use > limit - disk_charge(max(len(x) for x in datas)), "evicted more than needed"
        present = {x.key for x in o.list()}
        assert keys[0] in present and keys[-1] in present
        assert keys[1] not in present  # least recently used went first
    finally:
        o.close()


def test_reopen_rebuilds_recency_and_a_lower_bound_evicts_the_oldest(tmp_path: Path) -> None:
    keys = [f"chunks/{i:064x}" for i in range(6)]
    o = bounded(tmp_path / "o", 1 << 20)
    for k in keys:
        o.put(k, random_bytes(10_000, seed=int(k[-2:], 16)))
    for k in (keys[3], keys[0], keys[5]):  # most recent last
        o.get(k)
    o.close()
    o = bounded(tmp_path / "o", 3 * disk_charge(10_000))
    try:
        assert {x.key for x in o.list()} == {keys[3], keys[0], keys[5]}
        assert o.counters.get("cache_bytes") == coexisting_disk_use(tmp_path / "o")
    finally:
        o.close()


def test_over_a_read_only_store_the_wrapper_passes_reads_only(tmp_path: Path) -> None:
    owner = bounded(tmp_path / "o", 1 << 20)
    owner.put(KEY, b"owned")
    second = bounded(tmp_path / "o", 1 << 20)
    try:
        assert not second.writable
        assert second.get(KEY) == b"owned"
        assert not second.put("chunks/" + "cd" * 32, b"y")
        assert os.listdir(tmp_path / "o" / "chunks") == ["ab"]
    finally:
        second.close()
        owner.close()


def test_a_shared_file_store_removes_temp_files_of_dead_writers_on_open(tmp_path: Path) -> None:
    """Temp files of a dead writer of this PID namespace go at once; a live writer's stay
    however old; a writer of another namespace (unseen) is given an hour."""
    root = tmp_path / "o"
    FileObjectStore(root).close()
    ns = os.stat("/proc/self/ns/pid").st_ino
    p = subprocess.Popen(["true"])
    p.wait()
    tmp = root / "tmp"
    dead = tmp / f"{ns}.{p.pid}.abc.1"
    live_old = tmp / f"{ns}.{os.getpid()}.abc.2"
    other_fresh = tmp / f"{ns + 1}.{p.pid}.abc.3"
    other_old = tmp / f"{ns + 1}.{p.pid}.abc.4"
    legacy_old = tmp / f"{p.pid}.abc.5"  # the earlier naming, without a namespace
    for f in (dead, live_old, other_fresh, other_old, legacy_old):
        f.write_bytes(b"partial")
    long_ago = time.time() - 2 * 3600
    for f in (live_old, other_old, legacy_old):
        os.utime(f, (long_ago, long_ago))
    s = FileObjectStore(root)
    assert sorted(f.name for f in tmp.iterdir()) == sorted([live_old.name, other_fresh.name])
    s.close()
